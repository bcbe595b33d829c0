"""Image references and platforms, normalised the way Docker does it.

Pure functions only: no I/O. ``alpine`` becomes ``docker.io/library/alpine:latest``;
``localhost:5000/app@sha256:...`` keeps its registry host and digest. The grammar follows
the distribution reference format (domain, lowercase path components, tag, digest).
"""

from __future__ import annotations

import platform as host
import re
from dataclasses import dataclass

from hypemand.errors import BadRequest
from hypemand.images.errors import InvalidName, InvalidPlatform

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

# The one grammar of repository names, tags and digests: pull references here and the /v2 push
# endpoints (``uploads.py``) both use these. Always matched with ``fullmatch`` (``$`` would let
# a trailing newline through); character classes are spelled out because ``\w`` would accept any
# Unicode letter.
#
# A repository path (what follows ``/v2/``, or a reference's name without its registry host):
# lowercase alphanumeric components separated by ``.``, ``_``, ``__`` or dashes, joined by ``/``
# (the OCI distribution spec's ``<name>``).
PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_PATH_RE = re.compile(rf"{PATH_COMPONENT}(?:/{PATH_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# The only digest algorithm stored here.
SHA256_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_DOMAIN_RE = re.compile(_DOMAIN)
# Any well-formed digest (so that ``@md5:...`` is reported as unsupported, not as garbage).
_DIGEST_RE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_ANONYMOUS_ID_RE = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class Reference:
    """A normalised reference: ``domain/path`` plus a tag, a digest, or both."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        """``docker.io/library/alpine``: the name without tag or digest."""
        return f"{self.domain}/{self.path}"

    @property
    def is_digest(self) -> bool:
        return self.digest is not None

    def __str__(self) -> str:
        text = self.repository
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.domain, self.path, tag=tag)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.domain, self.path, digest=digest)

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/`` on the wire: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG


def validate_digest(digest: str) -> str:
    """Only sha256 digests are stored; anything else is refused."""
    if not isinstance(digest, str) or not SHA256_DIGEST_RE.fullmatch(digest):
        raise InvalidName(f"invalid digest {digest!r}: expected sha256:<64 lowercase hex>")
    return digest


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    is_domain = slash and (any(c in first for c in ".:") or first == "localhost" or first.lower() != first)
    if not is_domain:
        domain, remainder = DEFAULT_DOMAIN, name
    else:
        domain, remainder = first, rest
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def parse_reference(text: str) -> Reference:
    """Parse and normalise ``text``; raise :class:`InvalidName` (400 ``invalid_name``)."""
    if not isinstance(text, str) or not text or text != text.strip():
        raise InvalidName(f"invalid reference format: {text!r}")
    name, at, digest = text.partition("@")
    if at:
        if not _DIGEST_RE.fullmatch(digest):
            raise InvalidName(f"invalid reference format: bad digest in {text!r}")
        validate_digest(digest)
    tag: str | None = None
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not TAG_RE.fullmatch(tag):
            raise InvalidName(f"invalid reference format: bad tag in {text!r}")
    if not name:
        raise InvalidName(f"invalid reference format: empty name in {text!r}")
    if _ANONYMOUS_ID_RE.fullmatch(name):
        raise InvalidName(f"invalid repository name {name!r}: cannot be a 64-character hex string")
    domain, path = _split_domain(name)
    if not _DOMAIN_RE.fullmatch(domain):
        raise InvalidName(f"invalid reference format: bad registry host in {text!r}")
    if path.lower() != path:
        raise InvalidName(f"invalid reference format: repository name must be lowercase: {text!r}")
    if not REPOSITORY_PATH_RE.fullmatch(path):
        raise InvalidName(f"invalid reference format: {text!r}")
    if len(f"{domain}/{path}") > NAME_TOTAL_LENGTH_MAX:
        raise InvalidName(f"repository name must not be longer than {NAME_TOTAL_LENGTH_MAX} characters")
    if tag is None and not at:
        tag = DEFAULT_TAG
    return Reference(domain=domain, path=path, tag=tag, digest=digest if at else None)


def validate_repository_path(path: str) -> str:
    """A repository name as a push names it (``team/app`` in ``/v2/team/app/...``).

    Beyond the grammar, the name must also be a valid image name once normalised like a pull
    reference (``docker.io/team/app``), because every push becomes an image of that name: so
    a bare 64-character hex name, a first component that reads as a registry host but is not
    one (``a_b.c/app``) and a name too long once ``docker.io/library/`` is added are refused
    here, before anything is stored. Raises :class:`InvalidName`.
    """
    if not isinstance(path, str) or not REPOSITORY_PATH_RE.fullmatch(path):
        raise InvalidName(f"invalid repository name {path!r}")
    parse_reference(path)
    return path


def pushed_image_reference(repository: str, reference: str) -> Reference:
    """The image name a push to ``/v2/<repository>/manifests/<reference>`` creates.

    ``team/app`` + ``v1`` -> ``docker.io/team/app:v1``; a ``sha256:`` reference pins a digest.
    """
    validate_repository_path(repository)
    separator = "@" if reference.startswith("sha256:") else ":"
    return parse_reference(f"{repository}{separator}{reference}")


# ---- platforms ---------------------------------------------------------------------------

SUPPORTED_PLATFORMS = ("linux/amd64", "linux/arm64")

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    def matches(self, os: str | None, architecture: str | None, variant: str | None) -> bool:
        """Does an index entry's platform satisfy this one? A missing wanted variant matches any."""
        arch = _ARCH_ALIASES.get(architecture or "", architecture)
        if (os or "").lower() != self.os or arch != self.architecture:
            return False
        if self.variant is None:
            return True
        entry_variant = variant or ("v8" if self.architecture == "arm64" else None)
        return entry_variant == self.variant


def parse_platform(text: str) -> Platform:
    """Parse ``os/arch[/variant]``; only linux on amd64 or arm64 is accepted (400 ``invalid_platform``)."""
    parts = text.strip().split("/") if isinstance(text, str) else []
    if len(parts) not in (2, 3) or not all(parts):
        raise InvalidPlatform(f"invalid platform {text!r}: expected os/arch[/variant]")
    os_name = parts[0].lower()
    arch = _ARCH_ALIASES.get(parts[1].lower())
    variant = parts[2].lower() if len(parts) == 3 else None
    if arch == "arm64" and variant == "v8":
        variant = None
    if os_name != "linux" or arch is None or (variant is not None):
        raise InvalidPlatform(
            f"unsupported platform {text!r}: supported platforms are {', '.join(SUPPORTED_PLATFORMS)}"
        )
    return Platform(os=os_name, architecture=arch)


def host_platform() -> Platform:
    arch = _ARCH_ALIASES.get(host.machine().lower(), "amd64")
    return Platform(os="linux", architecture=arch)


def check_registry_allowed(ref: Reference, allowed: frozenset[str] | None) -> None:
    """Refuse, before any lookup or connection, a registry a server may not reach (``allowed``
    names hosts or host:port; None allows any)."""
    if allowed is None:
        return
    domain = ref.domain.lower()
    host = domain.rsplit(":", 1)[0] if not domain.endswith("]") else domain
    if domain not in allowed and host not in allowed:
        raise BadRequest(
            f"registry {ref.domain} is not one this server may pull from "
            f"(allowed: {', '.join(sorted(allowed))})",
            code="registry_not_allowed",
        )
