"""The Caddy process: started detached in the ingress namespace, adopted by the next server.

Caddy is started by a thread that joined the network namespace (a child is born in the
namespace of the thread that forks it), in a session of its own, working directory
``caddy/``, with a boot configuration that holds only the admin API (on the Unix socket
``caddy/admin.sock``), its log and its storage; the ingresses' configuration is loaded through
the admin API afterwards. It outlives the server that started it. ``caddy/caddy.pid`` records
which process it is (pid, start time, boot id, binary, directory, namespace): a new server adopts
the recorded process only when ``/proc`` still shows exactly that (start time, executable, working
directory, ``run`` command, network namespace) and its admin API answers; otherwise it stops
what it finds of it and starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from hypemand.errors import DependencyMissing
from hypemand.fsutil import write_atomic, write_model_atomic
from hypemand.hypervisor.process import (
    ProcessWatch,
    host_boot_id,
    process_cmdline,
    process_cwd,
    process_exe,
    process_start_time,
    process_state,
)
from hypemand.ingress.admin import CaddyAdmin
from hypemand.layout import CaddyPaths
from hypemand.network.namespace import NamespaceWorker, namespace_path

log = logging.getLogger(__name__)

READY_TIMEOUT = 15.0  # from exec to an answering admin API (it takes ~100 ms)
STOP_TIMEOUT = 5.0  # SIGTERM to exit; then SIGKILL
_POLL = 0.05


class CaddyRecord(BaseModel):
    """``caddy/caddy.pid``."""

    pid: int
    start_time: int  # /proc/<pid>/stat field 22
    boot_id: str
    binary: str
    directory: Path
    namespace: str | None
    started_at: datetime

    def mismatch(self, binary: Path, directory: Path, namespace: str | None) -> str | None:
        """Why the live process with this pid is not a Caddy of ours as configured now."""
        if self.boot_id != host_boot_id():
            return "recorded on an earlier boot"
        if process_start_time(self.pid) != self.start_time or process_state(self.pid) in (None, "Z", "X"):
            return "no longer running"
        exe = process_exe(self.pid) or ""
        if exe.removesuffix(" (deleted)") != self.binary or process_cwd(self.pid) != self.directory:
            return "another program"
        if process_cmdline(self.pid)[1:2] != ["run"]:
            return "another program"
        if self.binary != str(binary) or self.directory != directory:
            return "started with another binary or directory"
        if not _in_namespace(self.pid, namespace):
            return "runs in another network namespace"
        return None


def _in_namespace(pid: int, namespace: str | None) -> bool:
    try:
        theirs = os.stat(f"/proc/{pid}/ns/net")
        wanted = os.stat(namespace_path(namespace) if namespace else "/proc/self/ns/net")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (wanted.st_dev, wanted.st_ino)


def _environment(paths: CaddyPaths) -> dict[str, str]:
    """Caddy's whole environment: its home and XDG directories in the data directory, nothing of
    the server's (no proxies, no credentials)."""
    return {"HOME": str(paths.directory), "XDG_DATA_HOME": str(paths.storage),
            "XDG_CONFIG_HOME": str(paths.xdg_config), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def _spawn(binary: Path, paths: CaddyPaths) -> subprocess.Popen[bytes]:
    """Start Caddy; run in the namespace's thread."""
    with open(paths.output, "ab") as output:
        return subprocess.Popen(
            [str(binary), "run", "--config", str(paths.boot_config)],
            cwd=paths.directory, env=_environment(paths), stdin=subprocess.DEVNULL,
            stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,  # a server restart neither kills nor signals it
        )


class CaddyProcess:
    def __init__(self, paths: CaddyPaths, binary: Path, worker: NamespaceWorker) -> None:
        self.paths = paths
        self.binary = binary
        self.worker = worker
        self.admin = CaddyAdmin(paths.admin_socket)
        self.watch: ProcessWatch | None = None

    @property
    def pid(self) -> int | None:
        return self.watch.pid if self.watch is not None else None

    async def run(self, boot_config: dict[str, Any]) -> str:
        """Adopt the recorded Caddy if it is ours and answers, else start one: "adopted" or
        "started". Raises DependencyMissing without the binary, RuntimeError if it fails."""
        directory = await asyncio.to_thread(self._prepare, boot_config)
        record = await asyncio.to_thread(_load_record, self.paths.pid_file)
        if record is not None:
            namespace = self.worker.namespace
            why = await asyncio.to_thread(record.mismatch, self.binary, directory, namespace)
            if why is None:
                # /proc is read again around pidfd_open: the pid cannot have been reused under us.
                watch = await asyncio.to_thread(
                    ProcessWatch.open_verified, record.pid,
                    lambda: record.mismatch(self.binary, directory, namespace) is None)
                if watch is not None and await self.admin.ping():
                    self.watch = watch
                    return "adopted"
                if watch is not None:
                    log.warning("Caddy (pid %d) does not answer on its admin socket: replacing it",
                                record.pid)
                    await self._end(watch)
            elif why in ("runs in another network namespace", "started with another binary or directory"):
                log.info("Caddy (pid %d) %s: replacing it", record.pid, why)
                stale = await asyncio.to_thread(ProcessWatch.open_verified, record.pid, lambda: _ours(record))
                if stale is not None:
                    await self._end(stale)
        await self._start()
        return "started"

    def _prepare(self, boot_config: dict[str, Any]) -> Path:
        if not os.access(self.binary, os.X_OK):
            raise DependencyMissing(f"Caddy is not installed ({self.binary}): apt-get install caddy")
        for directory in (self.paths.directory, self.paths.storage, self.paths.xdg_config):
            directory.mkdir(parents=True, exist_ok=True)
        self.paths.directory.chmod(0o700)  # the admin socket and the CA's keys
        write_atomic(self.paths.boot_config, config_bytes(boot_config), mode=0o600)
        return self.paths.directory.resolve()

    async def _start(self) -> None:
        await asyncio.to_thread(self.paths.admin_socket.unlink, missing_ok=True)  # no live Caddy has it
        child = await self.worker.run(_spawn, self.binary, self.paths)
        watch = await asyncio.to_thread(self._record, child)
        if watch is None:
            await asyncio.to_thread(child.wait)
            raise RuntimeError(f"Caddy exited at once: {await asyncio.to_thread(self.output_tail)}")
        self.watch = watch
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
        while not await self.admin.ping(timeout=1.0):
            if not watch.is_alive():
                raise RuntimeError(f"Caddy exited: {await asyncio.to_thread(self.output_tail)}")
            if asyncio.get_running_loop().time() > deadline:
                await self._end(watch)
                raise RuntimeError(f"Caddy's admin API did not answer within {READY_TIMEOUT:.0f} s")
            await asyncio.sleep(_POLL)
        log.info("Caddy started (pid %d)", child.pid)

    def _record(self, child: subprocess.Popen[bytes]) -> ProcessWatch | None:
        """Hold the new child and write ``caddy.pid``; None if it is gone already. Blocking."""
        start_time = process_start_time(child.pid)
        watch = ProcessWatch.open_verified(child.pid, lambda: child.poll() is None, child)
        if start_time is None or watch is None:
            return None
        record = CaddyRecord(pid=child.pid, start_time=start_time, boot_id=host_boot_id(),
                             binary=str(self.binary), directory=self.paths.directory.resolve(),
                             namespace=self.worker.namespace, started_at=datetime.now(UTC))
        try:
            write_model_atomic(self.paths.pid_file, record)
        except BaseException:
            watch.send_signal(signal.SIGKILL)  # an unrecorded Caddy could never be adopted or stopped
            watch.close()
            raise
        return watch

    def output_tail(self, size: int = 2000) -> str:
        """The end of Caddy's output (its messages before its log opens, or its last words)."""
        try:
            with open(self.paths.output, "rb") as output:
                output.seek(max(0, output.seek(0, os.SEEK_END) - size))
                return output.read().decode(errors="replace").strip()
        except OSError:
            return "(no output)"

    async def wait_exit(self) -> None:
        """Return once the Caddy of this server exits."""
        if self.watch is not None:
            await self.watch.wait()

    async def stop(self) -> None:
        """Stop Caddy (SIGTERM, then SIGKILL) and forget its record."""
        watch, self.watch = self.watch, None
        if watch is not None:
            await self._end(watch)
        await asyncio.to_thread(self.paths.pid_file.unlink, missing_ok=True)

    def release(self) -> None:
        """Leave Caddy running (it outlives the server) and let go of it."""
        watch, self.watch = self.watch, None
        if watch is not None:
            watch.close()

    async def _end(self, watch: ProcessWatch) -> None:
        watch.send_signal(signal.SIGTERM)
        if not await watch.wait(STOP_TIMEOUT):
            log.warning("Caddy (pid %d) did not stop within %.0f s: killing it", watch.pid, STOP_TIMEOUT)
            watch.send_signal(signal.SIGKILL)
            await watch.wait(STOP_TIMEOUT)
        watch.close()


def _ours(record: CaddyRecord) -> bool:
    """The recorded process is still the Caddy that was recorded (wherever it runs)."""
    return record.mismatch(Path(record.binary), record.directory, record.namespace) is None


def _load_record(path: Path) -> CaddyRecord | None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return CaddyRecord.model_validate_json(path.read_bytes())
    return None


def config_bytes(config: dict[str, Any]) -> bytes:
    return json.dumps(config, indent=2).encode() + b"\n"
