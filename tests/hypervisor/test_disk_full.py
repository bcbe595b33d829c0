"""A full host disk, on a small filesystem each test makes and always unmounts.

- Reserved guest RAM reads as holes (sparse copies stay cheap), verified on ext4 and tmpfs.
- A reservation that does not fit is refused with InsufficientStorage and changes nothing.
- A guest touching all its memory on a full disk survives; unreserved, the same guest's QEMU dies
  of SIGBUS and its exit record says so (finding 2 of issue 13, reproduced).
- A guest filling its writable disk pauses in io-error with the disk "nospace"; once space is
  freed, resume() continues it (finding 1).
- Saving the device state on a full disk is InsufficientStorage and the VM keeps running.

The console and VMM logs are kept off the small filesystem (``logs`` is a symlink): these tests
watch the guest through its console, which is not what they are about.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

import hypemand.hypervisor.qemu_launch as launch_module
from hypemand.errors import InsufficientStorage
from hypemand.guest.config_disk import GuestConfig
from hypemand.hypervisor import storage
from hypemand.hypervisor.base import Accel, DiskIOStatus, VMConfig, VMPaths, VMStatus
from hypemand.hypervisor.process import list_pids, process_cwd
from hypemand.hypervisor.qemu import QemuHypervisor, QemuLaunchRecord
from hypemand.hypervisor.qemu_cmdline import build_qemu_argv
from hypemand.hypervisor.qemu_launch import prepare_restore
from hypemand.hypervisor.storage import free_bytes, reserve_memory_file
from hypemand.instances.boot import OVERLAY_SERIAL
from hypemand.savedvm.sparse import copy_sparse, data_extents
from hypemand.system.files import SystemFiles
from tests.support.guest import guest_spec, launched_vm, prepared_vm_config, wait_for_console
from tests.support.smallfs import MIB, fill, mounted_ext4, mounted_tmpfs

pytestmark = pytest.mark.vm

GUEST_RAM_MIB = 128
METADATA_SLACK = 16 << 10
TICK = "HM-DISKFULL-TICK"
TOUCHED = "HM-TOUCHED-ALL-MEMORY"
FILLED = "HM-FILLED-THE-DISK"
# All the memory the guest has available but 12 MiB (no OOM kill), through a tmpfs: every page
# the guest hands it is written.
TOUCH_ALL_MEMORY = GuestConfig(
    entrypoint=["/bin/sh", "-c"],
    cmd=[
        "mib=$(awk '/MemAvailable/ {print int($2 / 1024) - 12}' /proc/meminfo); echo available-mib $mib; "
        "mkdir -p /mnt/t && mount -t tmpfs -o size=100m t /mnt/t && "
        f"dd if=/dev/zero of=/mnt/t/fill bs=1M count=$mib 2>&1 && echo {TOUCHED}; "
        f"while true; do echo {TICK}; sleep 0.5; done"
    ],
)
# 48 MiB onto the overlay disk, flushed: more than the host filesystem has left.
FILL_THE_DISK = GuestConfig(
    entrypoint=["/bin/sh", "-c"],
    cmd=[f"dd if=/dev/zero of=/big bs=1M count=48 conv=fsync 2>&1 && echo {FILLED}; sleep 100000"],
)


def vm_on_small_fs(
    system_files: SystemFiles,
    root_disk: Path,
    directory: Path,
    outside: Path,
    guest: GuestConfig,
    *,
    overlay_outside: bool,
    overlay_bytes: int = 64 << 20,
) -> VMConfig:
    """A VM whose directory (RAM file included) is on the small filesystem, logs outside it, and
    its overlay disk inside or outside it."""
    directory.mkdir()
    logs = outside / "logs"
    logs.mkdir(parents=True)
    VMPaths(directory).console_log.parent.symlink_to(logs)
    spec = guest_spec(
        directory, root_disk, guest, network=False, memory_mib=GUEST_RAM_MIB, overlay_size_bytes=overlay_bytes
    )
    config = prepared_vm_config(system_files, spec)
    if not overlay_outside:
        return config
    disks = []
    for disk in config.disks:
        if disk.serial == OVERLAY_SERIAL:
            moved = outside / disk.path.name
            shutil.move(disk.path, moved)
            disk = disk.model_copy(update={"path": moved})
        disks.append(disk)
    return config.model_copy(update={"disks": disks})


def processes_in(directory: Path) -> list[int]:
    resolved = directory.resolve()
    return [pid for pid in list_pids() if process_cwd(pid) == resolved]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    with mounted_ext4(tmp_path / "ext4", 300) as mountpoint:
        yield mountpoint


# --- reserving RAM files, without a VM --------------------------------------------------------


@pytest.mark.parametrize("kind", ["ext4", "tmpfs"])
def test_a_reserved_ram_file_reads_as_holes_and_copies_sparse(kind: str, tmp_path: Path) -> None:
    mount = mounted_ext4(tmp_path / "fs", 128) if kind == "ext4" else mounted_tmpfs(tmp_path / "fs", 128)
    with mount as fs:
        ram = fs / "memory.ram"
        free_before = free_bytes(fs)
        reserve_memory_file(ram, 64 * MIB, fresh=True)
        assert ram.stat().st_size == 64 * MIB
        assert ram.stat().st_blocks * 512 >= 64 * MIB  # the blocks are taken...
        assert free_before - free_bytes(fs) >= 64 * MIB
        assert data_extents(ram) == []  # ...yet it all reads as a hole (unwritten extents)
        with open(ram, "r+b") as file:
            file.seek(8 * MIB)
            file.write(b"\x01" * 4096)
        assert data_extents(ram) == [(8 * MIB, 4096)]
        copy = fs / "copy.ram"
        copy_sparse(ram, copy)
        # A copy holds only the data: the reservation is the running VM's, not the snapshot's.
        assert data_extents(copy) == [(8 * MIB, 4096)]
        assert copy.stat().st_blocks * 512 == 4096
        assert digest(copy) == digest(ram)


@pytest.mark.parametrize("past_the_precheck", [False, True])
def test_a_saved_ram_file_that_cannot_be_reserved_is_left_as_it_was(
    past_the_precheck: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mounted_ext4(tmp_path / "fs", 128) as fs:
        ram = fs / "memory.ram"
        with open(ram, "wb") as file:  # a saved VM's RAM: sparse, a few pages written
            file.truncate(64 * MIB)
            for offset in (0, 5 * MIB, 63 * MIB):
                file.seek(offset)
                file.write(os.urandom(4096))
        extents, content, blocks = data_extents(ram), digest(ram), ram.stat().st_blocks
        fill(fs, leave=16 * MIB)
        free_before = free_bytes(fs)
        if past_the_precheck:  # the filesystem itself says no, halfway through
            monkeypatch.setattr(storage, "free_bytes", lambda _path: 1 << 50)
        with pytest.raises(InsufficientStorage, match=r"memory\.ram .* needs 64 MiB, \d+ MiB free") as failed:
            reserve_memory_file(ram, 64 * MIB, fresh=False)
        assert failed.value.status == 507
        monkeypatch.undo()
        assert (data_extents(ram), digest(ram)) == (extents, content)
        # The blocks it took are given back (the file's extent tree may keep a block more).
        assert ram.stat().st_blocks * 512 - blocks * 512 <= METADATA_SLACK
        assert free_bytes(fs) >= free_before - METADATA_SLACK


def test_a_restore_reserves_its_own_ram_file_and_a_fork_none(tmp_path: Path) -> None:
    """A VM's own RAM file is mapped shared (guest writes reach it: reserve it); a fork maps the
    snapshot's file privately (share=off, copy-on-write in anonymous memory: it never writes it)."""
    config = VMConfig(vm_id="own", directory=tmp_path / "own", kernel=Path("/vmlinux"), memory_mib=64)
    argv = build_qemu_argv(config, binary=Path("/usr/bin/qemu-system-x86_64"), accel=Accel.TCG, tsc_khz=None)
    launch = QemuLaunchRecord(
        qemu_version="7.2.22", qemu_binary=argv[0], machine="microvm", accel=Accel.TCG, tsc_khz=None,
        config=config, argv=argv, launched_at=datetime.now(UTC),
    )  # fmt: skip
    fork = launch.for_fork(tmp_path / "fork", "fork")
    assert launch.maps_memory_shared and not fork.maps_memory_shared
    for record in (launch, fork):
        directory = record.config.directory
        directory.mkdir()
        with open(record.config.paths.memory_file, "wb") as ram:
            ram.truncate(64 * MIB)  # a saved VM's RAM, all holes
        prepare_restore(record.for_restore(directory))
    assert VMPaths(tmp_path / "own").memory_file.stat().st_blocks * 512 >= 64 * MIB
    assert VMPaths(tmp_path / "fork").memory_file.stat().st_blocks == 0


# --- with QEMU ----------------------------------------------------------------------------------


async def test_a_boot_whose_ram_cannot_be_reserved_is_refused_and_leaves_nothing(
    hypervisor: QemuHypervisor,
    system_files: SystemFiles,
    busybox_ext4: Path,
    small_ext4: Path,
    tmp_path: Path,
) -> None:
    config = vm_on_small_fs(
        system_files, busybox_ext4, small_ext4 / "vm", tmp_path / "outside", TOUCH_ALL_MEMORY,
        overlay_outside=True,
    )  # fmt: skip
    fill(small_ext4, leave=GUEST_RAM_MIB * MIB // 2)
    free_before = free_bytes(small_ext4)
    before = sorted(path.name for path in config.directory.iterdir())
    with pytest.raises(InsufficientStorage, match=rf"needs {GUEST_RAM_MIB} MiB, \d+ MiB free"):
        async with launched_vm(hypervisor, config):
            pass
    assert processes_in(config.directory) == []
    # No RAM file, no launch or process record; only the (empty) start lock every start takes.
    assert sorted(path.name for path in config.directory.iterdir()) == sorted([*before, ".vmm.lock"])
    assert free_bytes(small_ext4) == free_before


async def test_a_guest_touching_all_its_memory_on_a_full_disk_survives_and_a_save_is_refused(
    hypervisor: QemuHypervisor,
    system_files: SystemFiles,
    busybox_ext4: Path,
    small_ext4: Path,
    tmp_path: Path,
) -> None:
    config = vm_on_small_fs(
        system_files, busybox_ext4, small_ext4 / "vm", tmp_path / "outside", TOUCH_ALL_MEMORY,
        overlay_outside=True,
    )  # fmt: skip
    async with launched_vm(hypervisor, config) as vm:
        fill(small_ext4)  # before the guest has touched most of its memory
        assert free_bytes(small_ext4) < MIB
        await wait_for_console(vm, TOUCHED)
        assert await vm.status() is VMStatus.RUNNING
        # The guest wrote most of its RAM file on the full disk, into the blocks reserved for it.
        touched = sum(length for _start, length in await asyncio.to_thread(data_extents, vm.memory_file))
        assert touched >= GUEST_RAM_MIB * MIB * 3 // 4

        state_file = config.directory / "standby.state"
        with pytest.raises(InsufficientStorage, match="saving the device state"):
            await hypervisor.save_state(vm, state_file)
        assert await vm.status() is VMStatus.RUNNING  # never paused
        assert not state_file.exists()
        ticks = (await asyncio.to_thread(vm.console_log_path.read_text)).count(TICK)
        await wait_for_console(vm, f"{TICK}\n" * (ticks + 2))
        assert vm.is_alive()


async def test_unreserved_ram_on_a_full_disk_kills_qemu_with_sigbus_and_the_record_says_so(
    hypervisor: QemuHypervisor,
    system_files: SystemFiles,
    busybox_ext4: Path,
    small_ext4: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the reservation prevents, reproduced: QEMU creates the sparse RAM file itself."""
    monkeypatch.setattr(launch_module, "reserve_memory_file", lambda *args, **kwargs: None)
    config = vm_on_small_fs(
        system_files, busybox_ext4, small_ext4 / "vm", tmp_path / "outside", TOUCH_ALL_MEMORY,
        overlay_outside=True,
    )  # fmt: skip
    async with launched_vm(hypervisor, config) as vm:
        fill(small_ext4)
        assert await vm.wait_exit(300), "the guest touched its memory on a full disk and lived"
        ended = await vm.exit_info()
    # Written on the full disk: the shim reserved its record's block when it started.
    assert ended is not None
    assert ended.signal == "SIGBUS", ended


async def test_a_guest_filling_its_disk_pauses_in_io_error_nospace_and_resumes_when_space_is_back(
    hypervisor: QemuHypervisor,
    system_files: SystemFiles,
    busybox_ext4: Path,
    small_ext4: Path,
    tmp_path: Path,
) -> None:
    config = vm_on_small_fs(
        system_files, busybox_ext4, small_ext4 / "vm", tmp_path / "outside", FILL_THE_DISK,
        overlay_outside=False, overlay_bytes=256 << 20,
    )  # fmt: skip
    async with launched_vm(hypervisor, config) as vm:
        ballast = fill(small_ext4, leave=16 * MIB)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 300
        while (status := await vm.status()) is not VMStatus.IO_ERROR:
            assert status is VMStatus.RUNNING, status
            assert loop.time() < deadline, "the guest never ran out of disk"
            await asyncio.sleep(0.2)
        assert await vm.disk_io_status() == {
            "hm-root": DiskIOStatus.OK, OVERLAY_SERIAL: DiskIOStatus.NOSPACE, "hm-config": DiskIOStatus.OK
        }
        assert FILLED not in vm.console_log_path.read_text()

        await asyncio.to_thread(ballast.unlink)
        await vm.resume()
        await wait_for_console(vm, FILLED)  # the write that failed was retried: the guest never knew
        assert await vm.status() is VMStatus.RUNNING
        assert set((await vm.disk_io_status()).values()) == {DiskIOStatus.OK}
