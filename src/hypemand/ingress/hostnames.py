"""The grammar of an ingress rule's names, pure: hostnames and hostname patterns, the target's
reference to a capture, the TLS allow-list, and the one regular-expression escape Caddy needs.

A hostname is a *literal* (``api.example.com``: the Host header, or the TLS server name, must be
exactly it, case aside) or a *pattern*: labels in which ``{name}`` captures part of the host
(``{instance}.example.com``, ``api-{instance}.example.com``). A capture matches one DNS label's
characters and never a dot. The target's instance is then a template over the captures
(``{instance}``, or ``vm-{instance}``), resolved by Caddy at request time.

Every function raises ``ValueError`` with a sentence for a person; the models turn it into a
400 ``invalid_request`` naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HOSTNAME = 253
LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
CAPTURE = re.compile(r"\{([a-z_][a-z0-9_]{0,31})\}")
# What one capture matches: the characters of a DNS label, never a dot (RE2 syntax).
CAPTURE_RE2 = "[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
# A stand-in for a capture when a label's shape is checked.
_SAMPLE = "x"


@dataclass(frozen=True)
class Hostname:
    """A parsed ``match.hostname``: lowercased, with its captures in order (none for a literal)."""

    text: str
    captures: tuple[str, ...]

    @property
    def is_pattern(self) -> bool:
        return bool(self.captures)

    @property
    def key(self) -> str:
        """What two rules on one port may not share: the literal, or the pattern with its
        capture names erased (``{a}.test`` and ``{b}.test`` match the same hosts)."""
        return CAPTURE.sub("{}", self.text)

    def regex(self) -> str:
        """An RE2 expression matching the hosts of a pattern (case-insensitive, whole host, no
        port), each capture a named group."""
        parts, position = [], 0
        for found in CAPTURE.finditer(self.text):
            parts.append(_literal_re2(self.text[position:found.start()]))
            parts.append(f"(?P<{found.group(1)}>{CAPTURE_RE2})")
            position = found.end()
        parts.append(_literal_re2(self.text[position:]))
        return "(?i)^" + "".join(parts) + "$"

    def certificate_name(self) -> str:
        """The name a certificate for this hostname carries: the literal, or for a pattern the
        wildcard of its first label (``api-{x}.example.com`` -> ``*.example.com``).

        A wildcard covers one label only, and OpenSSL-based clients refuse one with fewer than
        two labels after the star (``*.test``), so a pattern whose captures lie beyond its first
        label, or whose parent has a single label, cannot have one."""
        if not self.is_pattern:
            return self.text
        rest = self.text.partition(".")[2]
        if CAPTURE.search(rest):
            raise ValueError(f"{self.text!r}: with tls, captures may only be in the first label "
                             "(a wildcard certificate covers one label)")
        if rest.count(".") < 1:
            raise ValueError(f"{self.text!r}: with tls, a pattern needs at least two labels after "
                             f"the captured one (clients refuse the wildcard *.{rest})")
        return f"*.{rest}"


def parse_hostname(value: str) -> Hostname:
    text = value.strip().lower().rstrip(".")
    if not text:
        raise ValueError("hostname is empty")
    if len(text) > MAX_HOSTNAME:
        raise ValueError(f"hostname is longer than {MAX_HOSTNAME} characters")
    if "*" in text:
        raise ValueError(f"{value!r}: use a pattern such as {{instance}}.example.com, not a *")
    captures = tuple(found.group(1) for found in CAPTURE.finditer(text))
    if len(set(captures)) != len(captures):
        raise ValueError(f"{value!r}: a capture name appears twice")
    for label in text.split("."):
        if "}{" in label:
            raise ValueError(f"{value!r}: two captures side by side cannot be told apart")
        shape = CAPTURE.sub(_SAMPLE, label)
        if not LABEL.fullmatch(shape) or "{" in shape or "}" in shape:
            raise ValueError(
                f"{value!r}: {label!r} is not a DNS label (1-63 letters, digits and '-', not at "
                "either end; captures are {name}, lowercase letters, digits and '_')")
    return Hostname(text, captures)


def parse_target(value: str, hostname: Hostname) -> str:
    """``target.instance``: an instance name or id for a literal hostname; for a pattern, a name
    or a template whose ``{capture}`` references are captures of the hostname."""
    text = value.strip()
    used = CAPTURE.findall(text)
    if used and not hostname.is_pattern:
        raise ValueError(f"target instance {value!r} refers to a capture, but hostname "
                         f"{hostname.text!r} has none")
    unknown = [name for name in used if name not in hostname.captures]
    if unknown:
        raise ValueError(f"target instance {value!r} refers to {{{unknown[0]}}}, which hostname "
                         f"{hostname.text!r} does not capture")
    if not LABEL.fullmatch(CAPTURE.sub(_SAMPLE, text)) or "." in text:
        raise ValueError(f"target instance {value!r} is not an instance name or id "
                         "(or a template of one, such as {instance})")
    return text


def target_template(target: str, placeholder: str) -> str:
    """The target with each ``{capture}`` replaced by ``placeholder.format(capture)``."""
    return CAPTURE.sub(lambda found: placeholder.format(found.group(1)), target)


def is_template(target: str) -> bool:
    return CAPTURE.search(target) is not None


# ---- TLS_ALLOWED_DOMAINS -------------------------------------------------------------------------


def check_allowed_domain(entry: str) -> str:
    """One entry of ``TLS_ALLOWED_DOMAINS``: ``*``, ``*.example.com`` (one label) or a name."""
    text = entry.strip().lower().rstrip(".")
    if text == "*":
        return text
    name = text[2:] if text.startswith("*.") else text
    if not name or not all(LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"TLS_ALLOWED_DOMAINS: {entry!r} is not '*', '*.example.com' or a hostname")
    return text


def domain_allowed(certificate_name: str, allowed: tuple[str, ...]) -> bool:
    """Whether a certificate for ``certificate_name`` (a name or a ``*.`` wildcard) is allowed.
    ``*.example.com`` allows the names one label below example.com, and the same wildcard; not
    example.com itself."""
    for entry in allowed:
        if entry in ("*", certificate_name):
            return True
        if entry.startswith("*.") and not certificate_name.startswith("*."):
            first, _, rest = certificate_name.partition(".")
            if first and rest == entry[2:]:
                return True
    return False


# ---- regular expressions for Caddy (RE2) -------------------------------------------------------


def _literal_re2(text: str) -> str:
    """A hostname's literal part: only letters, digits, '-' and '.', of which '.' needs a '\\'."""
    return text.replace(".", r"\.")


def exact_re2(value: str) -> str:
    """An RE2 expression matching exactly ``value``: every character that is not a letter or a
    digit is written as a ``\\x{..}`` escape, so nothing in it can be a metacharacter (or a
    Caddy placeholder)."""
    escaped = "".join(ch if ch.isascii() and ch.isalnum() else f"\\x{{{ord(ch):x}}}" for ch in value)
    return f"^{escaped}$"
