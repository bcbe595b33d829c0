"""The image references a Dockerfile needs from the image store. Pure: no I/O.

This is a scanner, not an interpreter: buildah reads the Dockerfile in the builder VM. What is
read here is only what names an image, so that the server can have each one in its store (and
export it to the VM) before the build starts:

* ``FROM [--flags] <image> [AS <name>]``, less ``scratch`` and the names of earlier stages;
* ``COPY --from=<x>`` and ``RUN --mount=...,from=<x>``, less stage names and stage indexes.

The Dockerfile's lexical rules are honoured as BuildKit's parser has them: the parser
directives at the top (``# escape=`` changes the line-continuation character), comments, blank
lines, continuation lines, case-insensitive instructions. ``ARG`` before the first ``FROM``
gives ``FROM`` its variables (defaults only: builds take no build args), with ``$VAR``,
``${VAR}``, ``${VAR:-word}``, ``${VAR-word}``, ``${VAR:+word}``, ``${VAR+word}``; the automatic
platform ARGs (``TARGETARCH``, ``BUILDPLATFORM``, ...) are the host's. Each reference is
normalised like a pull's (``busybox`` -> ``docker.io/library/busybox:latest``).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from hypemand.errors import BadRequest
from hypemand.images.errors import InvalidName
from hypemand.images.reference import host_platform, parse_reference

SCRATCH = "scratch"
# A parser directive, only in the lines before anything else; unknown names end them (they are
# comments then), as do a comment, a blank line or an instruction.
_DIRECTIVE = re.compile(r"#\s*([A-Za-z][A-Za-z0-9]*)\s*=\s*(.*?)\s*")
_DIRECTIVES = {"syntax", "escape", "check"}
_ESCAPES = ("\\", "`")
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+])(.*))?", re.DOTALL)

Args = Mapping[str, str | None]  # an ARG's value; None: declared without a default


class InvalidDockerfile(BadRequest):
    code = "invalid_dockerfile"


@dataclass(frozen=True)
class Instruction:
    line: int  # the first physical line, for messages
    keyword: str  # lowercase
    args: str

    def refuse(self, why: str) -> InvalidDockerfile:
        return InvalidDockerfile(f"Dockerfile line {self.line}: {why}")


def base_images(text: str) -> list[str]:
    """The normalised references of the images the Dockerfile builds on or copies from, in the
    order of first use, each once. 400 ``invalid_dockerfile`` naming the line and the word when
    there is no ``FROM``, a ``FROM`` is malformed, a variable it uses has no value, or a
    reference does not parse."""
    steps = instructions(text)
    stages = [_parse_from(step) for step in steps if step.keyword == "from"]
    if not stages:
        raise InvalidDockerfile("the Dockerfile has no FROM instruction: it must name its base image "
                                "(or 'FROM scratch')")
    every_stage_name = {name for _, name in stages if name}
    global_args: dict[str, str | None] = dict(platform_args())
    scope = global_args  # before the first FROM, an ARG is global: FROM sees those only
    earlier_stages: set[str] = set()
    found: list[str] = []
    for step in steps:
        if step.keyword == "arg":
            for name, value in _arg_pairs(step):
                if value is None and scope is not global_args:
                    scope[name] = global_args.get(name)  # a stage's bare ARG takes the global's value
                else:
                    scope[name] = None if value is None else _expand(value, scope, step)
        elif step.keyword == "from":
            image, stage = _parse_from(step)
            image = _expand(image, global_args, step)
            if image.lower() not in earlier_stages and image.lower() != SCRATCH:
                found.append(_normalise(image, step))
            if stage:
                earlier_stages.add(stage)
            scope = {}  # a stage sees the ARGs it declares itself
        elif step.keyword in ("copy", "run"):
            for source in _from_flags(step):
                source = _expand(source, scope, step)
                if not (source.isdigit() or source.lower() in every_stage_name):
                    found.append(_normalise(source, step))
    return list(dict.fromkeys(found))


def platform_args() -> dict[str, str]:
    """The automatic platform ARGs, for a build on this host's platform."""
    platform = host_platform()
    parts = {"PLATFORM": str(platform), "OS": platform.os, "ARCH": platform.architecture, "VARIANT": ""}
    return {f"{side}{key}": value for side in ("TARGET", "BUILD") for key, value in parts.items()}


def instructions(text: str) -> list[Instruction]:
    """The Dockerfile's logical lines, after its directives, comments and continuations."""
    lines = [line.rstrip("\r") for line in text.removeprefix("\ufeff").split("\n")]
    escape, first = "\\", 0
    while first < len(lines) and (directive := _DIRECTIVE.fullmatch(lines[first].strip())):
        name, value = directive[1].lower(), directive[2]
        if name not in _DIRECTIVES:
            break
        if name == "escape":
            if value not in _ESCAPES:
                raise InvalidDockerfile(f"Dockerfile line {first + 1}: the escape directive's value "
                                        f"{value!r} must be '\\' or '`'")
            escape = value
        first += 1
    continued = re.compile(re.escape(escape) + r"[ \t]*$")
    result: list[Instruction] = []
    pieces: list[str] = []
    start = 0
    for number, line in enumerate(lines[first:], start=first + 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue  # also inside a continued instruction, as BuildKit does
        if not pieces:
            start, line = number, line.lstrip()
        cut = continued.search(line)
        pieces.append(line[:cut.start()] if cut else line)
        if not cut:
            result.append(_instruction(start, "".join(pieces)))
            pieces = []
    if pieces:  # the last line ended with the escape character
        result.append(_instruction(start, "".join(pieces)))
    return result


def _instruction(line: int, text: str) -> Instruction:
    keyword, _, args = text.strip().replace("\t", " ").partition(" ")
    return Instruction(line, keyword.lower(), args.strip())


def _parse_from(step: Instruction) -> tuple[str, str | None]:
    """``FROM``'s image word and its stage name (lowercase, as stage names compare), flags
    (``--platform``) skipped."""
    words = [word for word in step.args.split() if not word.startswith("--")]
    if len(words) == 1:
        return words[0], None
    if len(words) == 3 and words[1].lower() == "as":
        return words[0], words[2].lower()
    raise step.refuse(f"FROM takes an image and an optional 'AS <name>', not {step.args!r}")


def _arg_pairs(step: Instruction) -> Iterator[tuple[str, str | None]]:
    try:
        words = shlex.split(step.args)
    except ValueError as exc:
        raise step.refuse(f"ARG {step.args!r}: {exc}") from exc
    for word in words:
        name, equals, value = word.partition("=")
        yield name, value if equals else None


def _from_flags(step: Instruction) -> Iterator[str]:
    """The ``--from=`` of a COPY and the ``from=`` of each ``--mount=`` of a RUN (flags lead)."""
    for word in step.args.split():
        if not word.startswith("--"):
            return
        flag, _, value = word.partition("=")
        if step.keyword == "copy" and flag.lower() == "--from":
            yield value
        elif step.keyword == "run" and flag.lower() == "--mount":
            for field in value.split(","):
                key, _, mount_from = field.partition("=")
                if key.strip().lower() == "from":
                    yield mount_from


def _expand(word: str, args: Args, step: Instruction) -> str:
    """``word`` with its variables substituted from ``args``; 400 for one that has no value."""
    out: list[str] = []
    index = 0
    while index < len(word):
        dollar = word.find("$", index)
        if dollar < 0:
            out.append(word[index:])
            break
        out.append(word[index:dollar])
        if word.startswith("{", dollar + 1):
            end = _closing_brace(word, dollar + 2, step)
            out.append(_substitute(word[dollar + 2:end], args, step))
            index = end + 1
        elif variable := _VARIABLE.match(word, dollar + 1):
            out.append(_value(variable[0], args, step))
            index = variable.end()
        else:
            out.append("$")
            index = dollar + 1
    return "".join(out)


def _substitute(body: str, args: Args, step: Instruction) -> str:
    parts = _BRACED.fullmatch(body)
    if parts is None:
        raise step.refuse(f"unsupported substitution '${{{body}}}'")
    name, operator, word = parts.groups()
    value = args.get(name)
    if operator is None:
        return _value(name, args, step)
    use_word = {":-": not value, "-": value is None, ":+": bool(value), "+": value is not None}[operator]
    if use_word:
        return _expand(word, args, step)
    return "" if operator.endswith("+") else value or ""


def _value(name: str, args: Args, step: Instruction) -> str:
    value = args.get(name)
    if value is None:
        why = "its ARG has no default" if name in args else "no ARG declares it where it is used"
        raise step.refuse(f"{step.keyword.upper()} uses ${name}, which has no value: {why} (builds "
                          "take no build arguments)")
    return value


def _closing_brace(word: str, start: int, step: Instruction) -> int:
    depth = 1
    for index in range(start, len(word)):
        depth += {"{": 1, "}": -1}.get(word[index], 0)
        if depth == 0:
            return index
    raise step.refuse(f"'{word}' has a '${{' without its '}}'")


def _normalise(text: str, step: Instruction) -> str:
    if not text:
        raise step.refuse(f"{step.keyword.upper()} names no image ({step.args!r})")
    try:
        return str(parse_reference(text))
    except InvalidName as exc:
        raise step.refuse(f"{text!r} is not an image reference: {exc}") from exc
