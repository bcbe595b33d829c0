"""Orphaned QEMUs: spawned by a server that died before it wrote ``vmm.json`` (real QEMU runs).

Nothing adopts such a QEMU and it holds its overlay disk's write lock, so the VM could never start
again. ``QemuHypervisor.reap_orphans`` ends it, and nothing else: not a recorded VMM, not another
process in the VM directory, not a process that only looks like the recorded launch.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypemand.fsutil import exclusive_lock
from hypemand.guest.config_disk import GuestConfig
from hypemand.hypervisor.base import VMConfig, VMPaths, VMStatus, read_vmm_exit
from hypemand.hypervisor.process import ProcessRecord, process_start_time
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.system.files import SystemFiles
from tests.support.guest import guest_spec, launched_vm, prepared_vm_config

pytestmark = pytest.mark.vm

SLEEPER = GuestConfig(cmd=["/bin/sleep", "100000"])


def sleeper_config(system_files: SystemFiles, root_disk: Path, directory: Path) -> VMConfig:
    return prepared_vm_config(system_files, guest_spec(directory, root_disk, SLEEPER, network=False))


@contextlib.contextmanager
def running(argv: list[str], cwd: Path, executable: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A process of the test's own, killed (by its PID, it is our child) at the end."""
    process = subprocess.Popen(
        argv,
        executable=executable,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


async def test_reaper_ends_a_qemu_without_vmm_json_and_nothing_else(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    guests = tmp_path / "guests"
    orphan_config = sleeper_config(system_files, busybox_ext4, guests / "orphan")
    recorded_config = sleeper_config(system_files, busybox_ext4, guests / "recorded")
    sleep = shutil.which("sleep")
    assert sleep is not None
    # Both VMs are killed by launched_vm whatever happens; the guests need not boot for this.
    async with (
        launched_vm(hypervisor, orphan_config) as orphan,
        launched_vm(hypervisor, recorded_config) as recorded,
    ):
        (orphan.directory / "vmm.json").unlink()  # the crash window: QEMU runs, never recorded
        assert orphan.memory_file.is_file()

        # Not QEMU, but in the orphan's directory.
        bystander_argv = [sleep, "600"]
        # Not QEMU, but started as argv[0] = the QEMU path, with the recorded argv of its directory.
        impostor_dir = guests / "impostor"
        impostor_dir.mkdir()
        impostor_argv = [orphan.launch.qemu_binary, "600"]
        impostor_launch = orphan.launch.model_copy(update={"argv": impostor_argv})
        VMPaths(impostor_dir).launch_record.write_text(impostor_launch.model_dump_json())
        with (
            running(bystander_argv, cwd=orphan.directory) as bystander,
            running(impostor_argv, cwd=impostor_dir, executable=sleep) as impostor,
        ):
            found = await asyncio.to_thread(hypervisor.find_orphans, guests)
            assert [(o.pid, o.directory, o.vm_id, o.reason) for o in found] == [
                (orphan.pid, orphan.directory.resolve(), "orphan", "no valid vmm.json")
            ]

            # A start in progress holds the start lock and looks just like an orphan: skipped.
            with exclusive_lock(VMPaths(orphan.directory).start_lock, "held by the test"):
                assert await hypervisor.reap_orphans(guests) == []
            assert orphan.is_alive()

            reaped = await hypervisor.reap_orphans(guests)
            assert [o.pid for o in reaped] == [orphan.pid]
            assert not orphan.is_alive()
            # Its supervisor recorded the kill and was gone before the reaper returned.
            shim_pid = orphan.record.supervisor_pid
            assert shim_pid is not None and reaped[0].supervisor_pid == shim_pid
            # (A zombie here: this test process started it and reaps it when the handle does.)
            assert orphan.record.supervisor_mismatch() in ("no such process", "process has exited")
            ended = read_vmm_exit(orphan.directory)
            assert ended is not None and (ended.pid, ended.signal) == (orphan.pid, "SIGKILL")
            # Kept: an orphan may be a restore being started from a saved VM, whose RAM it is.
            assert orphan.memory_file.exists()

            assert await recorded.status() is VMStatus.RUNNING
            assert recorded.memory_file.is_file()
            assert bystander.poll() is None
            assert impostor.poll() is None
            assert await asyncio.to_thread(hypervisor.find_orphans, guests) == []

            # A vmm.json that names another live process does not claim this QEMU either
            # (find_orphans only: nothing is signalled).
            record_path = recorded.directory / "vmm.json"
            genuine = record_path.read_bytes()
            other = ProcessRecord.model_validate_json(genuine).model_copy(
                update={"pid": bystander.pid, "start_time": process_start_time(bystander.pid)}
            )
            record_path.write_text(other.model_dump_json())
            try:
                [misrecorded] = await asyncio.to_thread(hypervisor.find_orphans, guests)
            finally:
                record_path.write_bytes(genuine)
            assert misrecorded.pid == recorded.pid
            assert misrecorded.reason == f"vmm.json names another process (pid {bystander.pid})"
            assert recorded.is_alive()
