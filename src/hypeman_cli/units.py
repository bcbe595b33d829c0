"""Small parsers and formatters: Go durations, KEY=VALUE lists, sizes and ages for people."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime

from rich.filesize import decimal

from hypeman_cli.errors import CLIError

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """A Go duration (``90s``, ``1m30s``, ``500ms``) or a bare number of seconds, in seconds."""
    value = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    position, total = 0, 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(value) or not value:
        raise CLIError(f"not a duration: {text!r} (examples: 30s, 5m, 1m30s)")
    return total


def key_values(pairs: Iterable[str], what: str) -> dict[str, str]:
    """``["A=1", "B=x=y"]`` -> ``{"A": "1", "B": "x=y"}``; a pair without ``=`` is an error."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"{what} must be KEY=VALUE, not {pair!r}")
        result[key] = value
    return result


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}


def parse_size(text: str, what: str) -> int:
    """``"512MB"`` -> 536870912: a bare number is bytes, K/M/G/T/P (with an optional B or iB) are
    powers of 1024, as the server reads sizes."""
    match = _SIZE.match(text)
    unit = match.group(3).lower() if match else ""
    if not match or unit == "i" or (unit == "ib" and not match.group(2)):
        raise CLIError(f"{what} must be a size like 512MB, 1GB or 1073741824, not {text!r}")
    number, prefix, _ = match.groups()
    return int(float(number) * 1024 ** _SIZE_POWERS[prefix.upper()])


def human_bytes(size: int | None) -> str:
    return "-" if size is None else decimal(size)


def short_id(identifier: str, length: int = 12) -> str:
    return identifier[:length]


def age(moment: datetime | str | None, now: datetime | None = None) -> str:
    """``"3 minutes ago"``, as ``docker ps`` shows it."""
    if moment is None:
        return "-"
    if isinstance(moment, str):
        try:
            moment = datetime.fromisoformat(moment.replace("Z", "+00:00"))
        except ValueError:
            return str(moment)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = max(0.0, ((now or datetime.now(UTC)) - moment).total_seconds())
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = int(seconds // length)
            return f"{count} {unit}{'s' if count != 1 else ''} ago"
    count = int(seconds)
    return f"{count} second{'s' if count != 1 else ''} ago"
