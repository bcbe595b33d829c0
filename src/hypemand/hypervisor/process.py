"""Identity and liveness of VMM processes that may outlive the server that started them.

A PID alone is not an identity: after a VMM exits its PID can be reused. A VMM is therefore
recorded (``vmm.json``) as PID + start time (``/proc/<pid>/stat`` field 22, clock ticks since host
boot) + host boot id, and a re-attaching server also checks that the process' working directory
is the VM directory (VMMs run with cwd = VM directory). Once verified, the process is held by a
pidfd, which refers to that exact process for good: no reuse race for signals or exit waits, and
it works for processes that are not our children (adopted after a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field

from hypemand.fsutil import write_model_atomic

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def host_boot_id() -> str:
    return BOOT_ID_PATH.read_text().strip()


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may contain spaces and parens)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    # Field 3 (state) is index 0 here, so field 22 (starttime) is index 19.
    return int(fields[19]) if fields else None


def parent_pid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def process_state(pid: int) -> str | None:
    """One-letter state (R, S, D, Z, X, ...) or None if there is no such process."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def process_cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def process_exe(pid: int) -> str | None:
    """The path of the process' executable as the kernel reports it (with " (deleted)" appended
    once that file was unlinked or replaced), or None: gone, a kernel thread, or not ours to read."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def list_pids() -> list[int]:
    """The PIDs of all processes at this moment (any of them may be gone when looked at)."""
    return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())


def process_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


class ProcessRecord(BaseModel):
    """``vmm.json``: which process is this VM's VMM."""

    pid: int
    start_time: int = Field(description="/proc/<pid>/stat field 22: clock ticks after host boot")
    boot_id: str
    directory: Path  # the VMM's working directory, resolved
    vm_id: str
    binary: str
    started_at: datetime
    # The VMM's supervisor (its parent, which records its exit in vmm-exit.json), identified the
    # same way; None in records of VMMs started without one.
    supervisor_pid: int | None = None
    supervisor_start_time: int | None = None

    @classmethod
    def for_child(
        cls, pid: int, directory: Path, vm_id: str, binary: str, supervisor_pid: int | None = None
    ) -> ProcessRecord:
        """The record of a process just started (and of its supervisor, if it has one)."""
        start_time = process_start_time(pid)
        if start_time is None:
            raise ProcessLookupError(pid)
        supervisor_start_time = process_start_time(supervisor_pid) if supervisor_pid is not None else None
        return cls(
            pid=pid,
            start_time=start_time,
            boot_id=host_boot_id(),
            directory=directory.resolve(),
            vm_id=vm_id,
            binary=binary,
            started_at=datetime.now(UTC),
            supervisor_pid=supervisor_pid if supervisor_start_time is not None else None,
            supervisor_start_time=supervisor_start_time,
        )

    def save(self, path: Path) -> None:
        write_model_atomic(path, self)

    @classmethod
    def load(cls, path: Path) -> ProcessRecord | None:
        try:
            return cls.model_validate_json(path.read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    def mismatch(self) -> str | None:
        """Why the live process with this PID is not the recorded VMM, or None if it is."""
        return self._mismatch(self.pid, self.start_time)

    def supervisor_mismatch(self) -> str | None:
        """Why the recorded supervisor is not running any more, or None if it still is."""
        if self.supervisor_pid is None or self.supervisor_start_time is None:
            return "no supervisor recorded"
        return self._mismatch(self.supervisor_pid, self.supervisor_start_time)

    def _mismatch(self, pid: int, recorded_start_time: int) -> str | None:
        if self.boot_id != host_boot_id():
            return "recorded on an earlier host boot"
        start_time = process_start_time(pid)
        if start_time is None:
            return "no such process"
        if start_time != recorded_start_time:
            return f"PID reused (start time {start_time}, recorded {recorded_start_time})"
        if process_state(pid) in ("Z", "X"):
            return "process has exited"
        if process_cwd(pid) != self.directory:
            return "process runs in another directory"
        return None


class ProcessWatch:
    """Holds a pidfd on a verified process; optionally also its ``Popen`` (to reap our children)."""

    def __init__(self, pid: int, pidfd: int, child: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self._pidfd: int | None = pidfd
        self._child = child
        self._exited = False
        self._exit: asyncio.Future[None] | None = None

    @classmethod
    def open(cls, record: ProcessRecord, child: subprocess.Popen[bytes] | None = None) -> ProcessWatch | None:
        """Open a pidfd for ``record`` if it still names the live VMM, else None."""
        return cls.open_verified(record.pid, lambda: record.mismatch() is None, child)

    @classmethod
    def open_supervisor(
        cls, record: ProcessRecord, child: subprocess.Popen[bytes] | None = None
    ) -> ProcessWatch | None:
        """Open a pidfd for the VMM's recorded supervisor if it still runs, else None."""
        if record.supervisor_pid is None:
            return None
        return cls.open_verified(record.supervisor_pid, lambda: record.supervisor_mismatch() is None, child)

    @classmethod
    def open_verified(
        cls, pid: int, is_expected: Callable[[], bool], child: subprocess.Popen[bytes] | None = None
    ) -> ProcessWatch | None:
        """Open a pidfd for ``pid`` if ``is_expected()`` (which looks at /proc/<pid>) holds both
        before and after ``pidfd_open``, else None."""
        if not is_expected():
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        # The PID could have been reused between the check and pidfd_open: check once more, now
        # that the pidfd pins whichever process it names.
        if not is_expected():
            os.close(pidfd)
            return None
        return cls(pid, pidfd, child)

    def is_alive(self) -> bool:
        """True until the process has exited. A closed watch reports False."""
        if self._exited or self._pidfd is None:
            return False
        if self._child is not None and self._child.poll() is not None:
            self._exited = True
            return False
        # A pidfd polls readable once the process has exited (also while it is an unreaped
        # zombie of some other parent, e.g. after the server that started it died).
        readable, _, _ = select.select([self._pidfd], [], [], 0)
        if readable:
            self._exited = True
            self._reap()
        return not self._exited

    def _reap(self) -> None:
        if self._child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._child.wait(timeout=1)

    async def wait(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait for the process to exit; False on timeout. Any number of waiters may share it."""
        if not self.is_alive():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._exit_future()), timeout)
        except TimeoutError:
            return False
        self._exited = True
        self._reap()
        return True

    def _exit_future(self) -> asyncio.Future[None]:
        """One future per event loop, resolved when the pidfd turns readable (the process exited).

        A single reader callback serves all waiters: ``add_reader`` on the same fd would replace
        an earlier waiter's callback.
        """
        assert self._pidfd is not None
        loop = asyncio.get_running_loop()
        future = self._exit
        if future is not None and future.get_loop() is loop:
            return future
        self._unregister()
        future = loop.create_future()
        pidfd = self._pidfd

        def on_readable() -> None:
            loop.remove_reader(pidfd)
            if not future.done():
                future.set_result(None)

        loop.add_reader(pidfd, on_readable)
        self._exit = future
        return future

    def _unregister(self) -> None:
        future, self._exit = self._exit, None
        if future is None or self._pidfd is None:
            return
        with contextlib.suppress(RuntimeError):  # its loop may be closed already
            future.get_loop().remove_reader(self._pidfd)
        if not future.done():
            future.cancel()

    def send_signal(self, signum: int) -> None:
        if self._pidfd is None or self._exited:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signum)

    def close(self) -> None:
        if self._pidfd is not None:
            self._unregister()
            os.close(self._pidfd)
            self._pidfd = None
        if self._child is not None:
            self._child.poll()  # reaps a child that has ended (no zombie); never waits
