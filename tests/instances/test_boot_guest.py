"""The boot path end to end: a busybox ext4 root booted through the QEMU backend, the real
kernel and initrd, the C init and agent; then the lifecycle around it (program exit, pause and
resume, a program that ends at once, a guest that never boots)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from hypemand.guest.client import AgentClient, AgentDisconnected
from hypemand.guest.config_disk import GuestConfig
from hypemand.guest.markers import GuestBootTimeout, Marker, wait_for_markers
from hypemand.hypervisor.base import VMStatus
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.instances.boot import GuestSpec, RunningGuest, boot_guest
from hypemand.system.files import SystemFiles
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


async def test_a_vm_that_powers_off_before_the_agent_connects_ends_with_its_exit(
    hypervisor: QemuHypervisor,
    system_files: SystemFiles,
    busybox_ext4: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A program that ends at once powers the guest off; if that happens before the agent
    connection is up, the boot returns the program's exit (a normal, short life), without
    retrying the dead socket until the timeout."""
    spec = spec_for(tmp_path / "vm3", busybox_ext4, GuestConfig(entrypoint=["/bin/sh", "-c", "exit 3"]))
    real_connect = AgentClient.connect

    async def connect_after_poweroff(socket_path: Path, timeout: float) -> AgentClient:  # noqa: ASYNC109
        # Lose the race on purpose: connect only once QEMU is gone.
        while qemu_pids_for(spec.directory):  # noqa: ASYNC110 - nothing to wait on but /proc
            await asyncio.sleep(0.1)
        return await real_connect(socket_path, timeout=timeout)

    monkeypatch.setattr(AgentClient, "connect", connect_after_poweroff)
    guest = await boot_guest(hypervisor, system_files, spec, timeout=30)
    try:
        assert guest.exit is not None and guest.exit.code == 3
        with pytest.raises(AgentDisconnected):
            _ = guest.agent
        assert not qemu_pids_for(spec.directory), "no QEMU is left running"
    finally:
        await guest.close()


async def test_a_program_that_exits_at_once_is_a_normal_life_every_time(
    hypervisor: QemuHypervisor, system_files: SystemFiles, busybox_ext4: Path, tmp_path: Path
) -> None:
    """The guest powers off while the agent handshake may be under way: whichever wins, the
    boot reports the exit code, never an agent error."""
    for attempt in range(5):
        config = GuestConfig(entrypoint=["/bin/sh", "-c", "exit 5"])
        spec = spec_for(tmp_path / f"quick{attempt}", busybox_ext4, config)
        guest = await boot_guest(hypervisor, system_files, spec, timeout=60)
        try:
            markers = await wait_for_markers(guest.handle.console_log_path, {Marker.EXIT}, 60, lambda: True)
            assert markers.exit is not None and markers.exit.code == 5, attempt
        finally:
            with contextlib.suppress(Exception):
                await guest.handle.kill()
            await guest.close()


async def test_pause_freezes_the_guest_and_resume_continues(service: RunningGuest) -> None:
    guest = service
    await guest.handle.pause()
    assert await guest.handle.status() == VMStatus.PAUSED
    # A paused guest cannot answer: the exec must not complete while paused.
    pending = asyncio.ensure_future(guest.agent.run(["/bin/echo", "after-resume"]))
    await asyncio.sleep(1.0)  # part of the test: time in which a running guest would have answered
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
                    b"qemu-system" in (entry / "cmdline").read_bytes().split(b"\0")[0]:  # QEMU, not its shim
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids
