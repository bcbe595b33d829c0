"""Real QEMU guests through the backend: boot, pause/resume, shutdown, kill, networking, adoption.

The guests are the real thing: the prepared kernel and initrd, our init, a busybox root, with the
disks and ``VMConfig`` that ``instances.boot`` makes (``prepared_vm_config``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

import hypemand.hypervisor.process as process_module
import hypemand.hypervisor.qemu as qemu_module
import hypemand.hypervisor.qemu_launch as launch_module
import hypemand.hypervisor.qemu_spawn as spawn_module
import hypemand.hypervisor.qemu_vm as vm_module
from hypemand.errors import Conflict, InvalidState
from hypemand.guest.client import AgentClient
from hypemand.guest.config_disk import GuestConfig
from hypemand.guest.markers import Marker, parse_markers
from hypemand.hypervisor.base import Accel, Board, PortForward, ShutdownOutcome, VMConfig, VMStatus
from hypemand.hypervisor.process import ProcessRecord, host_boot_id, process_cmdline, process_start_time
from hypemand.hypervisor.qemu import QemuHypervisor, QemuLaunchRecord
from hypemand.system.files import SystemFiles
from tests.hypervisor.conftest import kill_pid_if_ours, long_directory
from tests.support.event_loop import LoopSpy
from tests.support.guest import (
    console_text,
    guest_spec,
    http_get,
    launched_vm,
    prepared_vm_config,
    wait_for_console,
    wait_for_guest_markers,
)
from tests.support.net import free_port

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]

HTTP_BODY = "hello-from-the-guest"
SERVICE_UP = "HM-SERVICE-UP"
# A service that stops cleanly on SIGTERM (what `docker stop` expects of a program).
SERVICE = GuestConfig(
    entrypoint=["/bin/sh", "-c"],
    cmd=[
        "trap 'echo got-term; exit 0' TERM; ip -4 addr show eth0; "
        f"mkdir -p /tmp/www && echo {HTTP_BODY} > /tmp/www/index.html && httpd -p 80 -h /tmp/www; "
        f"echo {SERVICE_UP}; while true; do sleep 0.2; done"
    ],
)
TICK = "HM-TEST-TICK"
TICKER = GuestConfig(
    entrypoint=["/bin/sh", "-c"], cmd=[f"i=0; while true; do echo {TICK} $i; i=$((i + 1)); sleep 0.5; done"]
)
SLEEPER = GuestConfig(cmd=["/bin/sleep", "100000"])


def sleeper_vm(system_files: SystemFiles, root: Path, directory: Path) -> VMConfig:
    return prepared_vm_config(system_files, guest_spec(directory, root, SLEEPER, network=False))


def tick_count(text: str) -> int:
    return text.count(TICK)


@pytest.mark.parametrize("board", [Board.QEMU_MICROVM, Board.QEMU])
async def test_boot_status_port_forward_and_graceful_shutdown(
    board: Board, hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    port = free_port()
    forward = PortForward(host_port=port, guest_port=80)
    spec = guest_spec(tmp_path / "vm", busybox_ext4, SERVICE, board=board, port_forwards=[forward])
    async with launched_vm(hypervisor, prepared_vm_config(system_files, spec)) as vm:
        text = await wait_for_console(vm, SERVICE_UP)
        # Disks found and network up on either virtio transport (microvm: mmio, q35: PCI).
        assert "inet 10.0.2.15/24" in text
        assert await vm.status() is VMStatus.RUNNING
        assert vm.vmm_log_path.is_file()
        assert vm.memory_file.is_file()  # guest RAM lives in the VM directory

        launch_record = QemuLaunchRecord.load(vm.directory)
        assert launch_record is not None
        assert launch_record.config.board is board
        # Whichever the host's probe decided (TCG on PVM hosts, KVM where it works).
        assert launch_record.accel is (await hypervisor.acceleration()).accel
        assert launch_record.machine == ("microvm" if board is Board.QEMU_MICROVM else "q35")
        assert launch_record.qemu_version == QemuHypervisor().version()
        assert process_cmdline(vm.pid) == launch_record.argv
        process_record = json.loads((vm.directory / "vmm.json").read_text())
        assert process_record["pid"] == vm.pid
        assert process_record["start_time"] == process_start_time(vm.pid)
        assert process_record["boot_id"] == host_boot_id()

        # The port forward reaches the program's server.
        assert (await http_get(port)).strip() == HTTP_BODY

        # The ACPI power button: the init stops the program with SIGTERM and powers off.
        outcome = await vm.shutdown(timeout=60)
        console = console_text(vm)
        assert outcome is ShutdownOutcome.GUEST_POWEROFF, console
        assert "got-term" in console.splitlines()
        markers = parse_markers(console)
        assert markers.exit is not None
        assert (markers.exit.code, markers.exit.message) == (0, "exited normally")
        assert not vm.is_alive()
        assert await vm.status() is VMStatus.EXITED
        assert not vm.memory_file.exists()
        assert await vm.shutdown() is ShutdownOutcome.ALREADY_EXITED


async def test_pause_freezes_the_guest_and_a_paused_vm_is_shut_down_by_quit(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    spec = guest_spec(tmp_path / "vm", busybox_ext4, TICKER, network=False)
    async with launched_vm(hypervisor, prepared_vm_config(system_files, spec)) as vm:
        await wait_for_console(vm, f"{TICK} 1")

        await vm.pause()
        assert await vm.status() is VMStatus.PAUSED
        frozen = tick_count(console_text(vm))
        await asyncio.sleep(2.5)  # the program prints a line every 0.5 s while the guest runs
        assert tick_count(console_text(vm)) == frozen

        await vm.resume()
        assert await vm.status() is VMStatus.RUNNING
        await wait_for_console(vm, f"{TICK} {frozen + 1}", timeout=60)

        # A paused guest cannot see the power button: the VMM is told to quit instead.
        await vm.pause()
        assert await vm.shutdown(timeout=5) is ShutdownOutcome.VMM_QUIT
        assert "HYPEMAN-EXIT" not in console_text(vm)
        assert not vm.is_alive()


async def test_kill(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    spec = guest_spec(tmp_path / "vm", busybox_ext4, SLEEPER, network=False)
    async with launched_vm(hypervisor, prepared_vm_config(system_files, spec)) as vm:
        assert await vm.status() is VMStatus.RUNNING  # no need to wait for the guest to boot
        await vm.kill()
        assert not vm.is_alive()
        assert process_start_time(vm.pid) != vm.record.start_time  # gone (None) or a new process
        assert await vm.status() is VMStatus.EXITED
        assert not vm.memory_file.exists()
        with pytest.raises(InvalidState):
            await vm.pause()


async def test_long_paths_disks_by_serial_and_agent_channel(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    directory = long_directory(tmp_path)  # socket paths > 108 bytes: QMP and the agent must still work
    program = GuestConfig(
        entrypoint=["/bin/sh", "-c"],
        cmd=[
            'for b in /sys/block/vd*; do echo "HM-DISK ${b##*/} $(cat $b/serial)"; done; '
            "echo HM-DISKS-LISTED; exec sleep 100000"
        ],
    )
    config = prepared_vm_config(system_files, guest_spec(directory, busybox_ext4, program, network=False))
    config.disks = list(reversed(config.disks))  # the guest finds its disks by serial, not by order
    async with launched_vm(hypervisor, config) as vm:
        text = await wait_for_console(vm, "HM-DISKS-LISTED")
        assert await vm.status() is VMStatus.RUNNING
        assert "HM-DISK vda hm-config" in text
        assert "HM-DISK vdb hm-overlay" in text
        assert "HM-DISK vdc hm-root" in text

        assert len(str(vm.agent_socket_path)) > 108
        agent = await AgentClient.connect(vm.agent_socket_path, timeout=60)
        try:
            reply = await agent.run(["echo", "ping-through-virtio-serial"], timeout=60)
        finally:
            await agent.close()
        assert reply.stdout == b"ping-through-virtio-serial\n"


async def test_adopt_after_dropping_the_handle(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    config = sleeper_vm(system_files, busybox_ext4, tmp_path / "vm")
    async with launched_vm(hypervisor, config) as vm:
        await wait_for_guest_markers(vm, [Marker.PROGRAM_START])
        await vm.close()  # what a server restart does to its handles

        adopted = await hypervisor.adopt(config.directory)
        assert adopted is not None
        try:
            assert adopted.pid == vm.pid
            assert adopted.config == vm.config
            assert await adopted.status() is VMStatus.RUNNING
            await adopted.pause()
            assert await adopted.status() is VMStatus.PAUSED
            await adopted.resume()

            # A second VMM for the same directory is refused while the first one runs.
            with pytest.raises(Conflict):
                await hypervisor.start(config)
            assert adopted.is_alive()
        finally:
            outcome = await adopted.shutdown(timeout=60)
            await adopted.close()
        assert outcome is ShutdownOutcome.GUEST_POWEROFF, console_text(vm)
        assert await hypervisor.adopt(config.directory) is None  # nothing left to adopt


async def test_adopt_refuses_a_record_that_names_another_process(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    config = sleeper_vm(system_files, busybox_ext4, tmp_path / "vm")
    async with launched_vm(hypervisor, config) as vm:
        await vm.close()  # adoption concerns the VMM process: the guest need not have booted
        record_path = config.directory / "vmm.json"
        genuine = ProcessRecord.model_validate_json(record_path.read_bytes())

        # Same PID, other start time: what a reused PID looks like.
        record_path.write_text(
            genuine.model_copy(update={"start_time": genuine.start_time - 1}).model_dump_json()
        )
        assert await hypervisor.adopt(config.directory) is None
        # Recorded on another host boot.
        record_path.write_text(
            genuine.model_copy(update={"boot_id": "00000000-0000-0000-0000-000000000000"}).model_dump_json()
        )
        assert await hypervisor.adopt(config.directory) is None
        # A live process with a matching start time but that is not this VM's QEMU (this test).
        me = os.getpid()
        own_start = process_start_time(me)
        assert own_start is not None
        impostor = genuine.model_copy(update={"pid": me, "start_time": own_start})
        record_path.write_text(impostor.model_dump_json())
        assert await hypervisor.adopt(config.directory) is None
        # A command line that is not the recorded one.
        record_path.write_text(genuine.model_dump_json())
        launch_path = config.paths.launch_record
        saved_launch = launch_path.read_bytes()
        tampered = QemuLaunchRecord.model_validate_json(saved_launch)
        launch_path.write_text(tampered.model_copy(update={"argv": [*tampered.argv, "-S"]}).model_dump_json())
        assert await hypervisor.adopt(config.directory) is None

        # The VM itself was never touched, and the genuine records adopt it.
        launch_path.write_bytes(saved_launch)
        adopted = await hypervisor.adopt(config.directory)
        assert adopted is not None
        try:
            assert adopted.pid == vm.pid
            assert await adopted.status() is VMStatus.RUNNING
        finally:
            await adopted.kill()
            await adopted.close()


STARTER = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from hypemand.hypervisor.base import VMConfig
    from hypemand.hypervisor.qemu import QemuHypervisor

    async def main() -> None:
        config = VMConfig.model_validate_json(sys.argv[1])
        handle = await QemuHypervisor(state_dir=Path(sys.argv[2])).start(config)
        print(json.dumps({"pid": handle.pid}), flush=True)
        # Exit without shutting anything down, as a crashing server would.

    asyncio.run(main())
    """
)


async def start_in_another_process(config: VMConfig, accel_cache_dir: Path) -> int:
    """Start ``config``'s VM from a process that then exits (as a crashing server would); the
    QEMU's pid."""
    starter = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", STARTER, config.model_dump_json(), str(accel_cache_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert starter.returncode == 0, starter.stderr
    pid: int = json.loads(starter.stdout)["pid"]
    return pid


async def test_vm_survives_the_death_of_the_process_that_started_it(
    hypervisor: QemuHypervisor,
    accel_cache_dir: Path,
    system_files: SystemFiles,
    busybox_ext4: Path,
    tmp_path: Path,
) -> None:
    config = sleeper_vm(system_files, busybox_ext4, tmp_path / "vm")
    pid = await start_in_another_process(config, accel_cache_dir)
    try:
        adopted = await hypervisor.adopt(config.directory)
        assert adopted is not None, "the VM did not survive its starter"
        try:
            assert adopted.pid == pid
            await wait_for_guest_markers(adopted, [Marker.PROGRAM_START])
            assert await adopted.status() is VMStatus.RUNNING
            assert await adopted.shutdown(timeout=60) is ShutdownOutcome.GUEST_POWEROFF
            assert not adopted.is_alive()  # exit seen through the pidfd: it is not our child
            # Recorded by its supervisor, which the adopting process does not own either.
            ended = await adopted.exit_info()
            assert ended is not None and (ended.pid, ended.code) == (pid, 0)
        finally:
            await adopted.close()
    finally:
        kill_pid_if_ours(pid, config.directory)


async def test_start_cancelled_while_qemu_is_being_spawned_leaves_no_qemu(
    hypervisor: QemuHypervisor,
    system_files: SystemFiles,
    busybox_ext4: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The spawn runs in a thread; a cancellation arriving meanwhile must not orphan the QEMU the
    thread started (it would hold the overlay disk's write lock, unrecorded)."""
    real_spawn = spawn_module.spawn_supervised
    spawned: list[spawn_module.SpawnedVMM] = []
    started = threading.Event()

    def slow_spawn(shim: Path, *args: Any) -> spawn_module.SpawnedVMM:
        result = real_spawn(shim, *args)
        spawned.append(result)
        started.set()
        threading.Event().wait(1.0)  # the caller is cancelled in this window
        return result

    monkeypatch.setattr(spawn_module, "spawn_supervised", slow_spawn)
    config = sleeper_vm(system_files, busybox_ext4, tmp_path / "vm")
    task = asyncio.create_task(hypervisor.start(config))
    try:
        assert await asyncio.to_thread(started.wait, 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        [result] = spawned
        assert result.vmm is not None
        assert not result.vmm.is_alive(), "QEMU left running after a cancelled start"
        assert result.supervisor.poll() is not None, "its supervisor left running"
    finally:
        for result in spawned:
            if result.vmm is not None:
                result.vmm.send_signal(signal.SIGKILL)
                result.vmm.close()
            await asyncio.to_thread(result.supervisor.wait)


async def test_start_and_kill_do_their_blocking_work_off_the_event_loop(
    hypervisor: QemuHypervisor,
    system_files: SystemFiles,
    busybox_ext4: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first TSC measurement sleeps 50 ms, ``qemu --version`` runs a process, the records are
    fsynced, a RAM file of GBs takes a while to unlink or reserve, the VMM supervisor may need
    compiling: none of it may stall the server's loop."""
    spy = LoopSpy()

    blocking = [
        (qemu_module, "host_tsc_khz", "tsc"),
        (qemu_module, "qemu_version", "version"),
        (launch_module, "write_model_atomic", "qemu-config.json"),
        (process_module, "write_model_atomic", "vmm.json"),
        (vm_module, "_remove_memory_file", "RAM file"),
        (launch_module, "reserve_memory_file", "RAM reservation"),
        (qemu_module, "ensure_vmm_shim", "shim build"),
    ]
    for module, attribute, name in blocking:
        monkeypatch.setattr(module, attribute, spy.wrap(name, getattr(module, attribute)))
    # TCG explicitly: only TCG guests get the TSC rate.
    config = sleeper_vm(system_files, busybox_ext4, tmp_path / "vm").model_copy(update={"accel": Accel.TCG})
    async with launched_vm(hypervisor, config) as vm:
        await vm.kill()
    assert spy.called == {
        "tsc", "version", "qemu-config.json", "vmm.json", "RAM file", "RAM reservation", "shim build"
    }
    assert spy.on_the_loop == []
