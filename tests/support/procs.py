"""What /proc says of a process, for tests that end or watch one."""

from __future__ import annotations

from pathlib import Path


def process_state(pid: int) -> str | None:
    """The process's state letter (R, S, Z, ...), or None once it is gone. A process reaped while
    it is read fails the open (ENOENT) or the read itself (ESRCH): both mean gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_running(pid: int) -> bool:
    """Alive, as opposed to gone or a zombie its parent has not reaped yet."""
    return process_state(pid) not in (None, "Z", "X")
