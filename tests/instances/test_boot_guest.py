"""The boot path end to end: a busybox ext4 root booted through the QEMU backend, the real
kernel and initrd, the C init and agent; then the lifecycle around it (program exit, pause and
resume, a guest that never boots, and a server restart that adopts the VM)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

import hypemand.instances.boot as boot_module
from hypemand.guest.client import AgentClient
from hypemand.guest.config_disk import GuestConfig
from hypemand.guest.markers import GuestBootTimeout, Marker, wait_for_markers
from hypemand.hypervisor.base import VMStatus
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.instances.boot import GuestSpec, RunningGuest, boot_guest
from hypemand.system.files import SystemFiles
from tests.conftest import start_server
from tests.support.guest import booted_guest, guest_spec

# One event loop for the module: the shared guest's agent connection lives across tests.
pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

SERVICE = GuestConfig(entrypoint=["/bin/sh", "-c"],
                      cmd=["echo app-started; while true; do sleep 3600; done"], env={"GREETING": "hi"})


def spec_for(directory: Path, root: Path, config: GuestConfig = SERVICE) -> GuestSpec:
    return guest_spec(directory, root, config)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(
    accel_cache_dir: Path,
    system_files: SystemFiles,
    busybox_ext4: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RunningGuest]:
    """One booted service guest for the tests that only exec in it or pause it."""
    directory = tmp_path_factory.mktemp("instances") / "service"
    hypervisor = QemuHypervisor(state_dir=accel_cache_dir)
    async with booted_guest(hypervisor, system_files, spec_for(directory, busybox_ext4)) as guest:
        yield guest


async def test_program_runs_with_its_env_and_the_agent_answers(service: RunningGuest) -> None:
    guest = service
    console = guest.handle.console_log_path.read_text()
    assert "HYPEMAN-PROGRAM-START" in console
    result = await guest.agent.run(["/bin/sh", "-c", "echo $GREETING; hostname; ls /bin/busybox"])
    assert result.exit_code == 0
    # Like `docker exec`, exec sessions run in the image's root with the instance's environment.
    assert result.stdout.decode().splitlines() == ["hi", "hypeman", "/bin/busybox"]
    # The program (not the agent) got the configured environment.
    environ = await guest.agent.run(["/bin/sh", "-c", "cat /proc/$(pidof sleep | cut -d' ' -f1)/environ"])
    assert b"GREETING=hi" in environ.stdout


async def test_exec_environment_defaults_and_request_overrides(service: RunningGuest) -> None:
    """PATH/HOME come from the program's defaults; a request's variables win over the instance's."""
    result = await service.agent.run(
        ["/bin/sh", "-c", "echo $GREETING $HOME $PATH; echo ${TERM:-no-term}"], env={"GREETING": "override"}
    )
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "override /root /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert lines[1] == "no-term"  # PID 1's own TERM=linux is not the instance's


async def test_exit_marker_and_vm_stops_when_the_program_ends(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    config = GuestConfig(entrypoint=["/bin/sh", "-c", "sleep 1; echo bye; exit 7"])
    spec = spec_for(tmp_path / "vm2", busybox_ext4, config)
    async with booted_guest(hypervisor, system_files, spec) as guest:
        markers = await wait_for_markers(guest.handle.console_log_path, {Marker.EXIT}, 60, lambda: True)
        assert markers.exit is not None
        assert markers.exit.code == 7
        assert await guest.handle.wait_exit(timeout=30), "QEMU should exit after the guest powers off"
        assert await guest.handle.status() == VMStatus.EXITED


async def test_a_vm_that_powers_off_before_the_agent_connects_is_reported_with_its_exit(
    hypervisor: QemuHypervisor,
    system_files: SystemFiles,
    busybox_ext4: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A program that ends at once powers the guest off; if that happens before the agent
    connection is up, the boot must report the exit, not retry the dead socket until timeout."""
    spec = spec_for(tmp_path / "vm3", busybox_ext4, GuestConfig(entrypoint=["/bin/sh", "-c", "exit 3"]))
    real_connect = AgentClient.connect

    async def connect_after_poweroff(socket_path: Path, timeout: float) -> AgentClient:  # noqa: ASYNC109
        # Lose the race on purpose: connect only once QEMU is gone.
        while qemu_pids_for(spec.directory):  # noqa: ASYNC110 - nothing to wait on but /proc
            await asyncio.sleep(0.1)
        return await real_connect(socket_path, timeout=timeout)

    monkeypatch.setattr(boot_module.AgentClient, "connect", connect_after_poweroff)
    with pytest.raises(GuestBootTimeout) as info:
        await boot_guest(hypervisor, system_files, spec, timeout=30)
    assert info.value.markers.exit is not None and info.value.markers.exit.code == 3
    assert "exited" in info.value.reason
    assert not qemu_pids_for(spec.directory), "no QEMU is left running"


async def test_pause_freezes_the_guest_and_resume_continues(service: RunningGuest) -> None:
    guest = service
    await guest.handle.pause()
    assert await guest.handle.status() == VMStatus.PAUSED
    # A paused guest cannot answer: the exec must not complete while paused.
    pending = asyncio.ensure_future(guest.agent.run(["/bin/echo", "after-resume"]))
    await asyncio.sleep(1.0)
    assert not pending.done()
    await guest.handle.resume()
    assert await guest.handle.status() == VMStatus.RUNNING
    result = await asyncio.wait_for(pending, 30)
    assert result.stdout == b"after-resume\n"


async def test_a_guest_that_never_boots_is_killed_and_reported_with_its_console(
    hypervisor: QemuHypervisor, system_files: SystemFiles, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.img"
    garbage.write_bytes(os.urandom(4 << 20))
    spec = spec_for(tmp_path / "vm4", garbage)
    with pytest.raises(GuestBootTimeout) as info:
        await boot_guest(hypervisor, system_files, spec, timeout=60)
    assert info.value.console_tail.strip(), "the report carries the guest's console"
    assert await hypervisor.adopt(spec.directory) is None, "no QEMU is left running"


def qemu_pids_for(directory: Path) -> list[int]:
    """Every QEMU process on this machine whose working directory is ``directory``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(f"/proc/{entry.name}/cwd").resolve() == directory.resolve() and \
                    b"qemu-system" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


async def test_server_restart_adopts_the_running_vm(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    directory = data_dir / "guests" / "adoptme"
    async with booted_guest(hypervisor, system_files, spec_for(directory, busybox_ext4)) as guest:
        pid = guest.handle.pid
        await guest.agent.run(["/bin/sh", "-c", "echo kept > /tmp/marker"])
        await guest.agent.close()
        for round_number in (1, 2):
            server = start_server(data_dir, tmp_path / f"server{round_number}.log")
            try:
                assert f"adopted VM adoptme (pid {pid})" in server.log()
            finally:
                server.stop()
            # Stopping the server neither kills nor duplicates the VM.
            assert guest.handle.is_alive()
            assert qemu_pids_for(directory) == [pid]
        # The VM is the same one, with its state, and its agent still answers.
        adopted = await hypervisor.adopt(directory)
        assert adopted is not None and adopted.pid == pid
        try:
            agent = await AgentClient.connect(adopted.agent_socket_path, timeout=30)
            try:
                assert (await agent.run(["/bin/cat", "/tmp/marker"])).stdout == b"kept\n"
            finally:
                await agent.close()
        finally:
            await adopted.close()

