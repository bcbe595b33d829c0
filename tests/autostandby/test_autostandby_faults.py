"""The server SIGKILLed while an auto-standby is being committed (its VM paused and saving, or
saved and not yet ended), then started again on the same data directory: the instance is in one
true state (Running with its QEMU and no saved state, or Standby with its saved state and no
QEMU), its idle countdown resumed from its record (it goes to Standby by itself, nothing new
connecting), and nothing of the guest is lost (a restore finds its RAM-only file)."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from hypeman import Hypeman
from hypeman.lib.exec import exec as sdk_exec

from hypemand.images import demo
from tests.autostandby.conftest import NEVER, qemu_of, running
from tests.network.lab import netns_supported
from tests.support.harness import Harness, ServerProcess, strict_client

pytestmark = [pytest.mark.vm, pytest.mark.netns]

SETTLE = 60.0
MARK = "echo in-memory > /dev/shm/marker"  # tmpfs: only the guest's RAM holds it


def guest_sh(sdk: Hypeman, instance: str, script: str) -> str:
    result = sdk_exec(sdk, instance, ["/bin/sh", "-c", script])
    assert result.exit_code == 0, result.output
    return result.output.decode(errors="replace").strip()


def recorded_idle_since(data: Path, instance: str) -> str | None:
    record = json.loads((data / "guests" / instance / "instance.json").read_text())
    memory = record.get("auto_standby_memory") or {}
    return memory.get("idle_since")


def kill_when(server: ServerProcess, sign: Callable[[], bool], done: Callable[[], bool]) -> bool:
    """SIGKILL the server as soon as ``sign`` holds (polled every millisecond), or once ``done``
    (the standby finished without the sign being seen). True when the sign was seen."""
    deadline = time.monotonic() + SETTLE
    seen = False
    while time.monotonic() < deadline:
        if sign():
            seen = True
            break
        if done():
            break
        time.sleep(0.001)  # the fault's timing: as soon after the sign as the poll allows
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    return seen


def test_killed_while_an_auto_standby_is_committed(harness: Harness) -> None:
    if (why := netns_supported()) is not None:
        pytest.skip(why)
    server = harness.start()
    demo.install(server.base_url, server.token, wait_seconds=300)
    data = server.data_dir
    with strict_client(server) as sdk:
        instance, _ = running(sdk, "sleeper")
        guest_sh(sdk, instance, MARK)
    directory = data / "guests" / instance
    rounds: list[tuple[str, Callable[[], bool]]] = [
        ("saving the device state", lambda: (directory / ".vm.state.partial").exists()),
        ("saved, QEMU not yet ended", lambda: (directory / "standby.json").exists()),
    ]
    seen = []
    for label, sign in rounds:
        with strict_client(server) as sdk:
            status = sdk.instances.auto_standby.status(instance)
            assert status.status == "idle_countdown", status
            sdk.instances.update(instance, auto_standby={"enabled": True, "idle_timeout": "1s"})

        def finished() -> bool:
            return (directory / "standby.json").exists() and not qemu_of(data, instance)

        seen.append((label, kill_when(server, sign, finished)))
        remembered = recorded_idle_since(data, instance)
        assert remembered is not None, f"{label}: the record lost its idle countdown"
        server = harness.start(data)
        with strict_client(server) as sdk:
            state = sdk.instances.get(instance).state
            assert state in ("Running", "Standby"), (label, state)
            saved = (directory / "standby.json").exists()
            assert saved == (state == "Standby"), (label, state, saved)
            assert bool(qemu_of(data, instance)) == (state == "Running"), (label, state)
            status = sdk.instances.auto_standby.status(instance)
            if status.idle_since is not None:  # resumed, not begun again
                assert status.idle_since == datetime.fromisoformat(remembered), (label, status, remembered)
            # The countdown (1s, long elapsed) resumed: Standby by itself.
            waited = sdk.instances.wait(instance, state="Standby", api_timeout=f"{SETTLE:.0f}s")
            assert waited.state == "Standby", (label, waited)
            assert not qemu_of(data, instance)
            # Nothing lost: the guest comes back with what only its RAM held.
            sdk.instances.update(instance, auto_standby={"enabled": True, "idle_timeout": NEVER})
            assert sdk.instances.restore(instance).state == "Running", label
            assert guest_sh(sdk, instance, "cat /dev/shm/marker") == "in-memory", label
            assert sdk.instances.auto_standby.status(instance).status in ("idle_countdown", "active")
    print(f"signs seen before the kill: {seen}")
