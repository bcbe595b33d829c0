"""How a VMM ended, recorded by its supervisor (the shim): for VMMs this process watches, for
VMMs whose starter is gone (a crashed server), and for a clean quit. Real QEMU runs.

Signals are sent through a pidfd on the recorded QEMU process ("from outside": not through the
handle), the way a crash, the OOM killer or an operator's ``kill`` would end it.
"""

from __future__ import annotations

import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hypemand.guest.config_disk import GuestConfig
from hypemand.hypervisor.base import VMConfig, VMStatus, read_vmm_exit
from hypemand.hypervisor.process import ProcessRecord, ProcessWatch, process_cmdline, process_start_time
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.system.files import SystemFiles
from tests.hypervisor.conftest import kill_pid_if_ours
from tests.hypervisor.test_qemu_vm import start_in_another_process
from tests.support.guest import guest_spec, launched_vm, prepared_vm_config

pytestmark = pytest.mark.vm

SLEEPER = GuestConfig(cmd=["/bin/sleep", "100000"])
# Wall clock of the test host versus the shim's: the same clock, so only scheduling separates them.
CLOCK_SLACK = timedelta(seconds=1)


def sleeper_config(system_files: SystemFiles, root_disk: Path, directory: Path) -> VMConfig:
    return prepared_vm_config(system_files, guest_spec(directory, root_disk, SLEEPER, network=False))


def signal_from_outside(record: ProcessRecord, signum: int) -> None:
    watch = ProcessWatch.open(record)
    assert watch is not None, "the VMM is not running"
    try:
        watch.send_signal(signum)
    finally:
        watch.close()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGBUS, signal.SIGSEGV])
async def test_a_watched_vmm_killed_by_a_signal_is_reported_with_it(
    signum: signal.Signals,
    hypervisor: QemuHypervisor,
    system_files: SystemFiles,
    busybox_ext4: Path,
    tmp_path: Path,
) -> None:
    config = sleeper_config(system_files, busybox_ext4, tmp_path / "vm")
    async with launched_vm(hypervisor, config) as vm:
        assert await vm.exit_info() is None  # running
        # The shim is QEMU's parent, in its own session, and QEMU runs exactly the recorded argv.
        assert vm.record.supervisor_pid is not None
        shim_cmdline = process_cmdline(vm.record.supervisor_pid)
        assert shim_cmdline[3:] == vm.launch.argv
        assert process_cmdline(vm.pid) == vm.launch.argv
        before = datetime.now(UTC)
        signal_from_outside(vm.record, signum)
        assert await vm.wait_exit(30)
        ended = await vm.exit_info()
        after = datetime.now(UTC)
        assert await vm.status() is VMStatus.EXITED
    assert ended is not None
    assert (ended.pid, ended.start_time) == (vm.pid, vm.record.start_time)
    assert (ended.signal, ended.signal_number, ended.code) == (signum.name, int(signum), None)
    assert before - CLOCK_SLACK <= ended.at <= after + CLOCK_SLACK
    assert ended.describe().startswith(f"killed by {signum.name}")
    assert not ended.clean
    # The same record from the directory alone, and the supervisor is gone with its VMM.
    assert read_vmm_exit(config.directory) == ended
    assert process_start_time(vm.record.supervisor_pid) != vm.record.supervisor_start_time


async def test_a_vmm_killed_while_no_server_held_it_is_reported_after_the_fact(
    hypervisor: QemuHypervisor,
    accel_cache_dir: Path,
    system_files: SystemFiles,
    busybox_ext4: Path,
    tmp_path: Path,
) -> None:
    config = sleeper_config(system_files, busybox_ext4, tmp_path / "vm")
    pid = await start_in_another_process(config, accel_cache_dir)
    try:
        record = ProcessRecord.load(config.paths.process_record)
        assert record is not None and record.pid == pid
        before = datetime.now(UTC)
        signal_from_outside(record, signal.SIGBUS)  # nobody watches it: the "server" is down
        watch = ProcessWatch.open_supervisor(record)
        if watch is not None:  # still writing the record
            assert await watch.wait(30)
            watch.close()
        after = datetime.now(UTC)
    finally:
        kill_pid_if_ours(pid, config.directory)

    # The next server finds nothing to adopt, and learns from the directory what happened.
    assert await hypervisor.adopt(config.directory) is None
    ended = read_vmm_exit(config.directory)
    assert ended is not None
    assert (ended.pid, ended.start_time) == (record.pid, record.start_time)
    assert (ended.signal, ended.code) == ("SIGBUS", None)
    assert before - CLOCK_SLACK <= ended.at <= after + CLOCK_SLACK


async def test_a_clean_quit_is_reported_as_code_0_and_a_new_launch_forgets_the_old_record(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    config = sleeper_config(system_files, busybox_ext4, tmp_path / "vm")
    async with launched_vm(hypervisor, config) as vm:
        await vm.qmp("quit", timeout=10)
        assert await vm.wait_exit(30)
        ended = await vm.exit_info()
    assert ended is not None
    assert (ended.code, ended.signal, ended.clean) == (0, None, True)
    assert ended.describe() == "exited with code 0"

    async with launched_vm(hypervisor, config) as again:
        # A record is always about the last launched VMM: the old one is gone at launch.
        assert read_vmm_exit(config.directory) is None
        assert await again.exit_info() is None


async def test_a_vmm_that_fails_at_startup_says_how_it_ended(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    config = sleeper_config(system_files, busybox_ext4, tmp_path / "vm")
    broken = config.model_copy(update={"kernel": tmp_path / "no-such-kernel"})
    with pytest.raises(Exception, match="exited with code 1") as failure:
        async with launched_vm(hypervisor, broken):
            pass
    assert "no-such-kernel" in str(failure.value)
    ended = read_vmm_exit(config.directory)
    assert ended is not None and ended.code == 1
    assert ended.detail is not None and "no-such-kernel" in ended.detail
