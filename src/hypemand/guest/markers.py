"""Lines the guest init prints on the serial console, and waiting for them.

    HYPEMAN-AGENT-READY ts=<guest monotonic seconds>
    HYPEMAN-PROGRAM-START ts=<guest monotonic seconds>
    HYPEMAN-EXIT code=<n> message="<text, \\" and \\\\ escaped>"
    HYPEMAN-BOOT-ERROR <reason>          (always followed by HYPEMAN-EXIT code=127)

The program shares the console, so a marker may follow its output on the same line: markers
are searched anywhere in a line, not only at its start.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel

from hypemand.errors import DomainError

_AGENT_READY = re.compile(r"HYPEMAN-AGENT-READY ts=([0-9.]+)")
_PROGRAM_START = re.compile(r"HYPEMAN-PROGRAM-START ts=([0-9.]+)")
_EXIT = re.compile(r'HYPEMAN-EXIT code=(-?\d+) message="((?:[^"\\]|\\.)*)"')
_BOOT_ERROR = re.compile(r"HYPEMAN-BOOT-ERROR (.*)")
TAIL_LINES = 40


class Marker(StrEnum):
    AGENT_READY = "agent_ready"
    PROGRAM_START = "program_start"
    EXIT = "exit"


class GuestExit(BaseModel):
    code: int
    message: str


class ConsoleMarkers(BaseModel):
    agent_ready_ts: float | None = None
    program_start_ts: float | None = None
    exit: GuestExit | None = None
    boot_error: str | None = None

    def has(self, marker: Marker) -> bool:
        if marker is Marker.AGENT_READY:
            return self.agent_ready_ts is not None
        if marker is Marker.PROGRAM_START:
            return self.program_start_ts is not None
        return self.exit is not None


class GuestBootTimeout(DomainError):
    """The guest did not print the wanted markers: timed out, exited first, or QEMU died."""

    code = "guest_boot_failed"

    def __init__(self, reason: str, console_tail: str, markers: ConsoleMarkers) -> None:
        super().__init__(f"{reason}; console tail:\n{console_tail}")
        self.reason = reason
        self.console_tail = console_tail
        self.markers = markers


def _unescape(message: str) -> str:
    return re.sub(r"\\(.)", r"\1", message)


def parse_markers(text: str) -> ConsoleMarkers:
    """Markers found in console text; the last of each kind wins (a restarted VM appends)."""
    found = ConsoleMarkers()
    for line in text.splitlines():
        if "HYPEMAN-" not in line:
            continue
        if m := _AGENT_READY.search(line):
            found.agent_ready_ts = float(m.group(1))
        if m := _PROGRAM_START.search(line):
            found.program_start_ts = float(m.group(1))
        if m := _EXIT.search(line):
            found.exit = GuestExit(code=int(m.group(1)), message=_unescape(m.group(2)))
        if m := _BOOT_ERROR.search(line):
            found.boot_error = m.group(1).strip()
    return found


def console_tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def read_console(path: Path, offset: int = 0) -> str:
    """The console log from ``offset`` on (empty if there is none yet)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


async def wait_for_markers(
    console_log: Path,
    wanted: Iterable[Marker],
    timeout: float,  # noqa: ASYNC109 - expiry must raise with the console tail, not CancelledError
    is_alive: Callable[[], bool],
    offset: int = 0,
    poll_interval: float = 0.02,
) -> ConsoleMarkers:
    """Wait until every wanted marker appears in ``console_log`` (read from ``offset`` on).

    Raises GuestBootTimeout, with the last lines of the console, when the time runs out, when
    the guest exits (or fails to boot) before printing them, or when ``is_alive()`` says the
    VM process is gone.
    """
    wanted_set = set(wanted)
    deadline = time.monotonic() + timeout
    while True:
        alive = is_alive()  # sampled before reading, so a final write before death is seen
        text = read_console(console_log, offset)
        markers = parse_markers(text)
        if all(markers.has(m) for m in wanted_set):
            return markers
        reason = None
        if markers.exit is not None:
            detail = markers.boot_error or markers.exit.message
            reason = f"guest exited (code {markers.exit.code}: {detail}) before {_names(wanted_set, markers)}"
        elif not alive:
            reason = f"VM process ended before {_names(wanted_set, markers)}"
        elif time.monotonic() > deadline:
            reason = f"no {_names(wanted_set, markers)} within {timeout:.0f} s"
        if reason is not None:
            raise GuestBootTimeout(reason, console_tail(text), markers)
        await asyncio.sleep(poll_interval)


def _names(wanted: set[Marker], markers: ConsoleMarkers) -> str:
    missing = sorted(m.value for m in wanted if not markers.has(m))
    return ", ".join(f"HYPEMAN-{m.upper().replace('_', '-')}" for m in missing)
