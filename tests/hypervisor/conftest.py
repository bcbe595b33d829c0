"""Fixtures for the hypervisor tests: the real system files and busybox root, the QEMU backend."""

from __future__ import annotations

from pathlib import Path

from hypemand.hypervisor.process import ProcessRecord, ProcessWatch
from tests.support.guest import accel_cache_dir, busybox_ext4, busybox_tree, hypervisor, system_files

__all__ = ["accel_cache_dir", "busybox_ext4", "busybox_tree", "hypervisor", "system_files"]


def long_directory(base: Path) -> Path:
    """A VM directory deep enough that its socket paths exceed the 108-byte Unix limit."""
    directory = base / ("d" * 60) / ("e" * 60)
    assert len(str(directory / "qemu.sock")) > 108
    return directory


def kill_pid_if_ours(pid: int, directory: Path) -> None:
    """Cleanup for VMs started outside this process: SIGKILL only if it is still that VMM."""
    record = ProcessRecord.load(directory / "vmm.json")
    if record is None or record.pid != pid:
        return
    watch = ProcessWatch.open(record)
    if watch is not None:
        watch.send_signal(9)
        watch.close()
