"""The memory balloon through the backend, on real guests: a VM launched before the balloon
existed (its launch record says ``balloon: false``) restores without one and is refused, not
broken; a ballooned VM keeps its balloon across a standby; a fork refuses to inflate (QEMU would
punch its pages out of the RAM file the fork shares with its snapshot) and leaves that file as it
was. The guest's own count of its balloon (``/proc/vmstat``) is the judge."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path

import pytest

from hypemand.errors import InvalidState
from hypemand.guest.client import AgentClient
from hypemand.guest.config_disk import GuestConfig
from hypemand.hypervisor.base import ForkIdentity, VMHandle
from hypemand.hypervisor.qemu import QemuHypervisor, QemuLaunchRecord
from hypemand.layout import InstancePaths
from hypemand.savedvm.sparse import copy_sparse
from hypemand.system.files import SystemFiles
from tests.support.guest import guest_spec, launched_vm, prepared_vm_config, wait_for_console

pytestmark = pytest.mark.vm

MIB = 1 << 20
UP = "HM-BALLOON-TEST-UP"
IDLE = GuestConfig(entrypoint=["/bin/sh", "-c"], cmd=[f"echo {UP}; while true; do sleep 1; done"])
AGENT_TIMEOUT = 60.0
GUEST_LIMIT = 240.0


async def guest_balloon(handle: VMHandle) -> int:
    agent = await AgentClient.connect(handle.agent_socket_path, timeout=AGENT_TIMEOUT)
    try:
        done = await agent.run(["/bin/sh", "-c", "grep ^balloon_ /proc/vmstat"])
    finally:
        await agent.close()
    counters = dict(line.split() for line in done.stdout.decode().splitlines())
    return (int(counters["balloon_inflate"]) - int(counters["balloon_deflate"])) * 4096


async def until_balloon(handle: VMHandle, size: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GUEST_LIMIT
    while (held := await guest_balloon(handle)) != size:
        assert loop.time() < deadline, f"the guest's balloon holds {held}, not {size}"
        await asyncio.sleep(0.5)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        while chunk := data.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


async def test_a_vm_launched_without_balloon_restores_without_one_and_is_refused(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "old-vm"
    config = prepared_vm_config(system_files, guest_spec(directory, busybox_ext4, IDLE, network=False))
    config = config.model_copy(update={"balloon": False})  # what every launch record before had
    async with launched_vm(hypervisor, config) as vm:
        await wait_for_console(vm, UP)
        assert vm.balloon_refusal(inflate=True) is not None
        state = InstancePaths(directory).state_file
        await hypervisor.save_state(vm, state)
        await hypervisor.end_saved(vm)
    record = QemuLaunchRecord.load(directory)
    assert record is not None and not any("balloon" in arg for arg in record.argv)
    # The saved VM restores (its device state has no balloon either) and says why it has none.
    restored = await hypervisor.restore(directory, state)
    try:
        refusal = restored.balloon_refusal(inflate=True)
        assert refusal is not None and "no memory balloon" in refusal
        assert restored.balloon_refusal(inflate=False) == refusal
        assert await restored.guest_memory_bytes() == config.memory_mib * MIB
        with pytest.raises(InvalidState, match="no memory balloon"):
            await restored.set_guest_memory_target(64 * MIB)
        assert await guest_balloon(restored) == 0
    finally:
        await restored.kill()
        await restored.close()


async def test_balloon_survives_standby_and_a_fork_refuses_to_inflate(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    source_dir = tmp_path / "src"
    config = prepared_vm_config(system_files, guest_spec(source_dir, busybox_ext4, IDLE, network=False))
    assert config.balloon
    memory = config.memory_mib * MIB
    state = InstancePaths(source_dir).state_file
    async with launched_vm(hypervisor, config) as vm:
        await wait_for_console(vm, UP)
        assert vm.balloon_refusal(inflate=True) is None
        await vm.set_guest_memory_target(memory - 32 * MIB)
        await until_balloon(vm, 32 * MIB)
        assert await vm.guest_memory_bytes() == memory - 32 * MIB
        await hypervisor.save_state(vm, state)
        await hypervisor.end_saved(vm)
    restored = await hypervisor.restore(source_dir, state)
    try:
        assert await restored.guest_memory_bytes() == memory - 32 * MIB
        assert await guest_balloon(restored) == 32 * MIB
        await restored.set_guest_memory_target(memory)  # deflate
        await until_balloon(restored, 0)

        # A fork of it: mapped copy-on-write from the snapshot's RAM file.
        await hypervisor.save_state(restored, state)
        fork_dir = tmp_path / "fork"
        (fork_dir / "logs").mkdir(parents=True)
        src, dst = InstancePaths(source_dir), InstancePaths(fork_dir)
        for a, b in ((src.launch_record, dst.launch_record), (src.overlay_disk, dst.overlay_disk),
                     (src.config_disk, dst.config_disk), (state, dst.state_file)):
            await asyncio.to_thread(copy_sparse, a, b)
        await asyncio.to_thread(shutil.copyfile, src.memory_file, dst.memory_file)
        await restored.resume()
    finally:
        await restored.kill()
        await restored.close()
    await asyncio.to_thread(hypervisor.prepare_fork, fork_dir, ForkIdentity(vm_id="fork"))
    shared = await asyncio.to_thread(sha256, dst.memory_file)
    fork = await hypervisor.restore(fork_dir, dst.state_file)
    try:
        refusal = fork.balloon_refusal(inflate=True)
        assert refusal is not None and "fork" in refusal
        assert fork.balloon_refusal(inflate=False) is None  # giving memory back is harmless
        with pytest.raises(InvalidState, match="fork"):
            await fork.set_guest_memory_target(memory - 32 * MIB)
        await fork.set_guest_memory_target(memory)  # no change, allowed
        assert await guest_balloon(fork) == 0
    finally:
        await fork.kill(keep_memory=True)
        await fork.close()
    assert await asyncio.to_thread(sha256, dst.memory_file) == shared
