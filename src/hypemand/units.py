"""Human-readable sizes and durations, as the Hypeman API spells them.

Sizes use binary units whatever the suffix says ("1GB" is 1 GiB), as the reference does;
durations use Go's syntax ("30s", "5m", "2m30s", "1h", "500ms").
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(I?B?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_SIZE = 1 << 60


class UnitError(ValueError):
    pass


def parse_size(text: str) -> int:
    """``"512MB"`` -> 536870912. A bare number is bytes; suffixes K, M, G, T, P (with optional
    B, iB) are powers of 1024."""
    match = _SIZE.match(text)
    if not match:
        raise UnitError(
            f"invalid size {text!r}: expected a number with an optional unit (e.g. 512MB, 1GB, 2GiB)"
        )
    number, prefix, suffix = match.groups()
    if suffix.upper() == "I" or (suffix.upper() == "IB" and not prefix):
        raise UnitError(f"invalid size {text!r}")
    value = float(number) * (1024 ** _POWERS[prefix.upper()])
    if value > MAX_SIZE:
        raise UnitError(f"size {text!r} is too large")
    return int(value)


def round_up(value: int, granule: int) -> int:
    """``value`` rounded up to a multiple of ``granule``: round_up(1, 4096) -> 4096."""
    return -(-value // granule) * granule


def format_size(size: int) -> str:
    """The largest whole unit: 1073741824 -> "1GB", 536870912 -> "512MB", 1000 -> "1000B"."""
    for unit, power in (("TB", 4), ("GB", 3), ("MB", 2), ("KB", 1)):
        if size and size % (1024**power) == 0:
            return f"{size // 1024**power}{unit}"
    return f"{size}B"


def parse_duration(text: str) -> float:
    """Go duration syntax to seconds: ``"2m30s"`` -> 150.0; ``"0s"`` or ``"0"`` -> 0.0."""
    stripped = text.strip()
    if stripped == "0":
        return 0.0
    position = 0
    total = 0.0
    for match in _DURATION_PART.finditer(stripped):
        if match.start() != position:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if position != len(stripped) or position == 0:
        raise UnitError(f"invalid duration {text!r}: expected Go syntax such as 30s, 5m, 2h30m")
    return total


def format_duration(seconds: float) -> str:
    """Seconds in Go syntax, to the millisecond: 0 -> "0s", 0.25 -> "250ms", 1.5 -> "1.5s",
    150 -> "2m30s", 3723 -> "1h2m3s"."""
    millis = max(0, round(seconds * 1000))
    if millis < 1000:
        return f"{millis}ms" if millis else "0s"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, fraction = divmod(rest, 1000)
    text = f"{hours}h" if hours else ""
    if hours or minutes:
        text += f"{minutes}m"
    return text + (f"{whole}.{fraction:03d}".rstrip("0") if fraction else f"{whole}") + "s"


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(bps|bit/s|B/s|Bps)?\s*$")
_RATE_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
MAX_RATE = 1 << 50  # bytes per second: far beyond any NIC, small enough for tc


def parse_rate(text: str) -> int:
    """A bandwidth to bytes per second, as the reference reads it: bit rates ``"1Gbps"``,
    ``"100Mbit/s"`` or byte rates ``"125MB/s"`` (decimal prefixes, as network rates are); a bare
    number is bytes per second."""
    match = _RATE.match(text)
    if not match:
        raise UnitError(f"invalid bandwidth {text!r}: expected a rate such as 1Gbps, 100Mbps or 125MB/s")
    number, prefix, unit = match.groups()
    value = float(number) * 1000 ** _RATE_POWERS[prefix.upper()]
    if unit in ("bps", "bit/s"):
        value /= 8
    elif unit is None and prefix:
        raise UnitError(f"invalid bandwidth {text!r}: say bps (bits) or B/s (bytes) after {prefix}")
    rate = int(value)
    if rate < 1:
        raise UnitError(f"bandwidth {text!r} is less than one byte per second")
    if rate > MAX_RATE:
        raise UnitError(f"bandwidth {text!r} is too large")
    return rate


def format_rate(rate: int) -> str:
    """Bytes per second as the largest whole bit rate: 125000000 -> "1Gbps"; else bytes."""
    bits = rate * 8
    for unit, power in (("Tbps", 4), ("Gbps", 3), ("Mbps", 2), ("Kbps", 1)):
        if bits % 1000**power == 0:
            return f"{bits // 1000**power}{unit}"
    return f"{bits}bps"
