"""boot_guest's disk preparation (mke2fs, fsync): off the event loop, one boot per directory."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

import hypemand.instances.boot as boot_module
from hypemand.errors import Conflict
from hypemand.guest.config_disk import GuestConfig
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.instances.boot import boot_guest
from hypemand.system.files import SystemFiles
from tests.support.guest import guest_spec


class _Stop(Exception):
    pass


async def test_disks_are_prepared_in_a_worker_thread(
    hypervisor: QemuHypervisor, system_files: SystemFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[threading.Thread] = []

    def record_thread(path: Path, size_bytes: int) -> None:
        threads.append(threading.current_thread())
        raise _Stop  # nothing further is needed: no VM starts

    monkeypatch.setattr(boot_module, "make_overlay_disk", record_thread)
    root = tmp_path / "root.img"
    root.write_bytes(b"")
    spec = guest_spec(tmp_path / "vm", root, GuestConfig(cmd=["/bin/true"]))
    with pytest.raises(_Stop):
        await boot_guest(hypervisor, system_files, spec)
    assert threads and threads[0] is not threading.main_thread()


async def test_a_second_boot_of_the_same_directory_does_not_touch_its_disks(
    hypervisor: QemuHypervisor, system_files: SystemFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []

    def slow_overlay(path: Path, size_bytes: int) -> None:
        calls.append(path)
        time.sleep(0.5)  # the second boot arrives meanwhile
        raise _Stop

    monkeypatch.setattr(boot_module, "make_overlay_disk", slow_overlay)
    root = tmp_path / "root.img"
    root.write_bytes(b"")
    spec = guest_spec(tmp_path / "vm", root, GuestConfig(cmd=["/bin/true"]))
    results = await asyncio.gather(
        boot_guest(hypervisor, system_files, spec),
        boot_guest(hypervisor, system_files, spec),
        return_exceptions=True,
    )
    assert sorted(type(r).__name__ for r in results) == ["Conflict", "_Stop"]
    assert any(isinstance(r, Conflict) for r in results)
    assert len(calls) == 1
