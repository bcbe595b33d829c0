"""Real QEMU guests through the backend: boot, pause/resume, shutdown, kill, networking, adoption."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from hypemand.errors import Conflict, InvalidState
from hypemand.hypervisor.base import Board, DiskConfig, PortForward, ShutdownOutcome, VMStatus
from hypemand.hypervisor.process import ProcessRecord, host_boot_id, process_cmdline, process_start_time
from hypemand.hypervisor.qemu import LAUNCH_RECORD, QemuHypervisor, QemuLaunchRecord
from hypemand.hypervisor.sockets import open_unix_connection
from tests.hypervisor.conftest import (
    Launcher,
    console_text,
    free_port,
    guest_config,
    kill_pid_if_ours,
    long_directory,
    wait_for_console,
    wait_ready,
)
from tests.hypervisor.guest_image import DISK_PREFIX, HTTP_BODY, POWEROFF_LINE, TICK_PREFIX, GuestImage

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]


def tick_count(text: str) -> int:
    return text.count(TICK_PREFIX)


@pytest.mark.parametrize("board", [Board.QEMU_MICROVM, Board.QEMU])
async def test_boot_status_and_graceful_shutdown(
    board: Board, launch: Launcher, test_guest: GuestImage, tmp_path: Path
) -> None:
    vm = await launch(guest_config(test_guest, tmp_path / "vm", board=board))
    await wait_ready(vm)
    assert await vm.status() is VMStatus.RUNNING
    assert vm.vmm_log_path.is_file()
    assert vm.memory_file.is_file()  # guest RAM lives in the VM directory

    launch_record = QemuLaunchRecord.load(vm.directory)
    assert launch_record is not None
    assert launch_record.config.board is board
    assert launch_record.accel.value == "tcg"
    assert launch_record.machine == ("microvm" if board is Board.QEMU_MICROVM else "q35")
    assert launch_record.qemu_version == QemuHypervisor().version()
    assert process_cmdline(vm.pid) == launch_record.argv
    process_record = json.loads((vm.directory / "vmm.json").read_text())
    assert process_record["pid"] == vm.pid
    assert process_record["start_time"] == process_start_time(vm.pid)
    assert process_record["boot_id"] == host_boot_id()

    outcome = await vm.shutdown(timeout=30)
    assert outcome is ShutdownOutcome.GUEST_POWEROFF
    assert POWEROFF_LINE in console_text(vm)
    assert not vm.is_alive()
    assert await vm.status() is VMStatus.EXITED
    assert not vm.memory_file.exists()
    assert await vm.shutdown() is ShutdownOutcome.ALREADY_EXITED


async def test_pause_freezes_the_guest_and_resume_continues(
    launch: Launcher, test_guest: GuestImage, tmp_path: Path
) -> None:
    vm = await launch(guest_config(test_guest, tmp_path / "vm"))
    await wait_for_console(vm, f"{TICK_PREFIX} 1\n")

    await vm.pause()
    assert await vm.status() is VMStatus.PAUSED
    frozen = tick_count(console_text(vm))
    await asyncio.sleep(2.5)  # the guest ticks every 0.5 s while it runs
    assert tick_count(console_text(vm)) == frozen

    await vm.resume()
    assert await vm.status() is VMStatus.RUNNING
    await wait_for_console(vm, f"{TICK_PREFIX} {frozen + 1}\n", timeout=30)


async def test_shutdown_of_a_paused_vm_quits_the_vmm(
    launch: Launcher, test_guest: GuestImage, tmp_path: Path
) -> None:
    vm = await launch(guest_config(test_guest, tmp_path / "vm"))
    await wait_ready(vm)
    await vm.pause()
    # A paused guest cannot see the power button: the VMM is told to quit instead.
    assert await vm.shutdown(timeout=5) is ShutdownOutcome.VMM_QUIT
    assert POWEROFF_LINE not in console_text(vm)
    assert not vm.is_alive()


async def test_kill(launch: Launcher, test_guest: GuestImage, tmp_path: Path) -> None:
    vm = await launch(guest_config(test_guest, tmp_path / "vm"))
    await wait_ready(vm)
    await vm.kill()
    assert not vm.is_alive()
    assert process_start_time(vm.pid) != vm.record.start_time  # gone (None) or a new process
    assert await vm.status() is VMStatus.EXITED
    with pytest.raises(InvalidState):
        await vm.pause()


async def test_port_forward_reaches_a_guest_service(
    launch: Launcher, test_guest: GuestImage, tmp_path: Path
) -> None:
    port = free_port()
    vm = await launch(
        guest_config(test_guest, tmp_path / "vm", forwards=[PortForward(host_port=port, guest_port=80)])
    )
    await wait_ready(vm)

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            return str(response.read().decode())

    body = ""
    for _ in range(50):  # httpd starts right after the READY line
        try:
            body = await asyncio.to_thread(fetch)
            break
        except OSError:
            await asyncio.sleep(0.2)
    assert body.strip() == HTTP_BODY


async def test_long_paths_disks_by_serial_and_agent_channel(
    launch: Launcher, test_guest: GuestImage, tmp_path: Path
) -> None:
    directory = long_directory(tmp_path)  # socket paths > 108 bytes: QMP must still work
    directory.mkdir(parents=True)
    data_disk = directory / "data.raw"
    data_disk.write_bytes(b"\0" * (1 << 20))
    shared_disk = tmp_path / "shared.raw"
    shared_disk.write_bytes(b"\0" * (1 << 20))
    config = guest_config(test_guest, directory)
    config.disks = [
        DiskConfig(path=data_disk, serial="hm-overlay"),
        DiskConfig(path=shared_disk, serial="hm-root", readonly=True),
    ]
    vm = await launch(config)
    text = await wait_ready(vm)
    assert await vm.status() is VMStatus.RUNNING
    assert f"{DISK_PREFIX} vda hm-overlay" in text
    assert f"{DISK_PREFIX} vdb hm-root" in text

    reader, writer = await open_unix_connection(vm.agent_socket_path)
    try:
        writer.write(b"ping-through-virtio-serial\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()
    assert reply == b"echo:ping-through-virtio-serial\n"


async def test_adopt_after_dropping_the_handle(
    launch: Launcher, hypervisor: QemuHypervisor, test_guest: GuestImage, tmp_path: Path
) -> None:
    config = guest_config(test_guest, tmp_path / "vm")
    vm = await launch(config)
    await wait_ready(vm)
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
        assert await adopted.shutdown(timeout=30) is ShutdownOutcome.GUEST_POWEROFF
        await adopted.close()
    assert await hypervisor.adopt(config.directory) is None  # nothing left to adopt


async def test_adopt_refuses_a_record_that_names_another_process(
    launch: Launcher, hypervisor: QemuHypervisor, test_guest: GuestImage, tmp_path: Path
) -> None:
    config = guest_config(test_guest, tmp_path / "vm")
    vm = await launch(config)
    await wait_ready(vm)
    await vm.close()
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
    record_path.write_text(genuine.model_copy(update={"pid": me, "start_time": own_start}).model_dump_json())
    assert await hypervisor.adopt(config.directory) is None
    # A command line that is not the recorded one.
    record_path.write_text(genuine.model_dump_json())
    launch_path = config.directory / LAUNCH_RECORD
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


async def test_vm_survives_the_death_of_the_process_that_started_it(
    hypervisor: QemuHypervisor, accel_cache_dir: Path, test_guest: GuestImage, tmp_path: Path
) -> None:
    config = guest_config(test_guest, tmp_path / "vm")
    starter = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", STARTER, config.model_dump_json(), str(accel_cache_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert starter.returncode == 0, starter.stderr
    pid = json.loads(starter.stdout)["pid"]
    try:
        adopted = await hypervisor.adopt(config.directory)
        assert adopted is not None, "the VM did not survive its starter"
        try:
            assert adopted.pid == pid
            await wait_ready(adopted)
            assert await adopted.status() is VMStatus.RUNNING
            assert await adopted.shutdown(timeout=30) is ShutdownOutcome.GUEST_POWEROFF
            assert not adopted.is_alive()  # exit seen through the pidfd: it is not our child
        finally:
            await adopted.close()
    finally:
        kill_pid_if_ours(pid, config.directory)
