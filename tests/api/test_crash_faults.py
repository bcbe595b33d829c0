"""Crashes told truthfully, and operations a server crash interrupted finished or undone, through
a real `hypemand serve` and the official SDK in strict mode.

* A QEMU killed from outside, watched or while no server ran, is a crash: ``Stopped`` with the
  signal in ``state_error`` and ``exit_message``, and ``stopped_at`` when it died (from the
  VMM's supervisor), not when the console was last written.
* A guest kernel panic is a crash too, with the panic's reason.
* A DELETE interrupted by a server SIGKILL is finished at the next start: the instance is not
  listed, its directory and VMM are gone (before: a gutted instance listed ``Stopped``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypeman import Hypeman
from hypeman.lib.exec import exec as sdk_exec

from hypemand.images import demo
from tests.api.conftest import SMALL
from tests.support.harness import Harness, ServerProcess, strict_client
from tests.support.procs import process_running

pytestmark = pytest.mark.vm

SERVICE = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["echo up; while true; do sleep 1; done"]}
# Ignores the power button: a graceful stop or delete waits out the guest's grace period.
STUBBORN = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["trap '' TERM; while true; do sleep 1; done"]}


@dataclass
class Rig:
    harness: Harness
    data: Path
    server: ServerProcess

    def client(self) -> Hypeman:
        return strict_client(self.server)

    def kill_server(self) -> None:
        self.server.process.send_signal(signal.SIGKILL)
        self.server.process.wait()

    def restart(self) -> None:
        self.server = self.harness.start(self.data, port=self.server.port)


@pytest.fixture(scope="module")
def rig(module_harness: Harness) -> Iterator[Rig]:
    server = module_harness.start()
    demo.install(server.base_url, server.token, wait_seconds=300)
    yield Rig(module_harness, server.data_dir, server)


def qemu_of(data: Path, instance_id: str) -> int:
    """The QEMU process (not its supervisor) running in the instance's directory."""
    directory = (data / "guests" / instance_id).resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0")[0]
            if b"qemu-system" in argv0 and (entry / "cwd").resolve() == directory:
                found.append(int(entry.name))
        except OSError:
            continue
    assert len(found) == 1, found
    return found[0]


def running(rig: Rig, name: str, **extra: object) -> str:
    with rig.client() as sdk:
        created = sdk.instances.create(name=name, image=demo.DEMO_NAME, **{**SMALL, **SERVICE, **extra})  # type: ignore[arg-type]
        assert sdk.instances.wait(created.id, state="Running", api_timeout="120s").state == "Running"
    return created.id


def gone(pid: int) -> bool:
    """Ended: no such process, or a zombie its supervisor has not reaped yet."""
    return not process_running(pid)


def test_a_vmm_killed_while_watched_is_reported_as_a_crash(rig: Rig) -> None:
    instance_id = running(rig, "watched")
    pid = qemu_of(rig.data, instance_id)
    os.kill(pid, signal.SIGKILL)
    with rig.client() as sdk:
        assert sdk.instances.wait(instance_id, state="Stopped", api_timeout="30s").state == "Stopped"
        deadline = time.monotonic() + 30
        seen = sdk.instances.get(instance_id)
        while seen.state_error is None and time.monotonic() < deadline:
            seen = sdk.instances.get(instance_id)  # the watcher records the exit within moments
        assert seen.state == "Stopped"
        assert seen.state_error is not None and "SIGKILL" in seen.state_error, seen
        assert seen.exit_message is not None and "SIGKILL" in seen.exit_message, seen
        ops = "\n".join(sdk.instances.logs(instance_id, source="hypeman", tail=20))
        assert "crashed" in ops and "SIGKILL" in ops, ops
        sdk.instances.delete(instance_id)


def test_a_vmm_that_died_while_no_server_ran_is_a_crash_at_its_time(rig: Rig) -> None:
    """Killed while the server was down, a minute after its console last spoke: stopped_at is
    when it died, and the time it ran counts as running (before: the console's last write, and
    running time 0)."""
    instance_id = running(rig, "unwatched")
    console = rig.data / "guests" / instance_id / "logs" / "app.log"
    pid = qemu_of(rig.data, instance_id)
    rig.kill_server()
    # The console was last written at boot; make that long ago, so the two times differ plainly.
    an_hour_ago = time.time() - 3600
    os.utime(console, (an_hour_ago, an_hour_ago))
    killed_at = datetime.now(UTC)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not gone(pid):
        assert time.monotonic() < deadline
    rig.restart()
    with rig.client() as sdk:
        seen = sdk.instances.get(instance_id)
        assert seen.state == "Stopped", seen
        assert seen.state_error is not None and "SIGKILL" in seen.state_error, seen
        assert seen.stopped_at is not None
        assert abs((seen.stopped_at - killed_at).total_seconds()) < 10, (seen.stopped_at, killed_at)
        assert (seen.phase_durations_ms or {}).get("running", 0) > 0, seen.phase_durations_ms
        sdk.instances.delete(instance_id)


def test_a_guest_kernel_panic_is_reported_as_a_crash(rig: Rig) -> None:
    instance_id = running(rig, "panicky")
    with rig.client() as sdk:
        # The exec's connection dies with the guest; what it answers does not matter.
        panic = ["/bin/sh", "-c", "echo c > /proc/sysrq-trigger"]
        threading.Thread(target=lambda: _quietly(sdk, instance_id, panic), daemon=True).start()
        assert sdk.instances.wait(instance_id, state="Stopped", api_timeout="60s").state == "Stopped"
        deadline = time.monotonic() + 30
        seen = sdk.instances.get(instance_id)
        while seen.state_error is None and time.monotonic() < deadline:
            seen = sdk.instances.get(instance_id)
        assert seen.state_error is not None and "guest kernel panic" in seen.state_error, seen
        sdk.instances.delete(instance_id)


def _quietly(sdk: Hypeman, instance_id: str, command: list[str]) -> None:
    with contextlib.suppress(Exception):  # the guest dies under it, by design
        sdk_exec(sdk, instance_id, command)


def test_a_stop_is_not_a_crash(rig: Rig) -> None:
    instance_id = running(rig, "calm")
    with rig.client() as sdk:
        stopped = sdk.instances.stop(instance_id)
        assert stopped.state == "Stopped"
        assert stopped.state_error is None, stopped
        sdk.instances.delete(instance_id)


def test_a_delete_interrupted_by_a_server_crash_is_finished_at_the_next_start(rig: Rig) -> None:
    """A graceful delete of a guest that ignores the power button takes the grace period; the
    server is SIGKILLed in the middle. The next server finishes the delete: not listed, no
    directory, no VMM (before: the instance came back, and a kill during the removal of its
    files left it gutted but listed)."""
    instance_id = running(rig, "doomed", **STUBBORN)
    pid = qemu_of(rig.data, instance_id)
    directory = rig.data / "guests" / instance_id
    answered: list[object] = []

    def delete() -> None:
        try:
            with rig.client() as sdk:
                sdk.instances.delete(instance_id, extra_query={"graceful_shutdown": "true"})
            answered.append("deleted")
        except Exception as exc:  # the server dies under the request, by design
            answered.append(exc)

    deleting = threading.Thread(target=delete, daemon=True)
    deleting.start()
    deadline = time.monotonic() + 30
    while not (directory / ".deleting").exists():
        assert time.monotonic() < deadline, "the delete never began"
    rig.kill_server()
    deleting.join(30)
    assert answered and answered[0] != "deleted", answered
    assert directory.exists(), "the kill came after the delete finished: nothing was tested"
    rig.restart()
    with rig.client() as sdk:
        assert instance_id not in [i.id for i in sdk.instances.list()]
    assert not directory.exists()
    deadline = time.monotonic() + 10
    while not gone(pid):
        assert time.monotonic() < deadline, "the deleted instance's QEMU still runs"
    assert "removing deleted instance" in rig.server.log()


# The bounded shutdown cancels what is still running, and uvicorn says so at ERROR level, with
# the cancelled request's traceback: that is this test's point, and nothing else is accepted.
@pytest.mark.server_log_allows(
    r"Cancel \d+ running task\(s\), timeout graceful shutdown exceeded",
    r"Exception in ASGI application",
)
def test_a_sigterm_ends_the_server_even_with_requests_that_never_end(rig: Rig) -> None:
    """Requests that would not end for minutes (a long-poll ``wait``, an exec whose program never
    ends) must not hold the server's shutdown (before: SIGTERM waited for them); the VM outlives
    the server as always."""
    instance_id = running(rig, "sleeper")
    waiting_client = strict_client(rig.server, timeout=400)

    def long_poll() -> None:
        with contextlib.suppress(Exception):  # the server goes away under it, by design
            waiting_client.instances.wait(instance_id, state="Stopped", api_timeout="300s")

    with rig.client() as sdk:
        threading.Thread(target=long_poll, daemon=True).start()
        threading.Thread(
            target=lambda: _quietly(sdk, instance_id, ["/bin/sh", "-c", "exec sleep 100000"]), daemon=True
        ).start()
        deadline = time.monotonic() + 60
        while "sleep 100000" not in sdk_exec(sdk, instance_id, ["/bin/ps"]).output.decode():
            assert time.monotonic() < deadline, "the exec never started"
        rig.server.process.send_signal(signal.SIGTERM)
        try:
            rig.server.process.wait(timeout=60)  # a bound on a hang, not a speed target
        except subprocess.TimeoutExpired:
            raise AssertionError("the server did not stop within a minute of SIGTERM") from None
    waiting_client.close()
    rig.restart()
    with rig.client() as sdk:
        assert sdk.instances.get(instance_id).state == "Running"  # the VM outlived the server
        sdk.instances.delete(instance_id)
