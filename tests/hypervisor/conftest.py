"""Fixtures for the hypervisor tests: a test guest, a QEMU backend, and VMs that are always killed."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from hypemand.hypervisor.base import Board, PortForward, VMConfig
from hypemand.hypervisor.qemu import QemuHypervisor, QemuVMHandle
from tests.hypervisor.guest_image import READY_LINE, GuestImage, ensure_test_guest

BOOT_TIMEOUT = 90.0  # TCG on 2 shared cores: 3-10 s usually, more when other suites boot VMs

Launcher = Callable[..., Awaitable[QemuVMHandle]]


@pytest.fixture(scope="session")
def test_guest() -> GuestImage:
    return ensure_test_guest()


@pytest.fixture(scope="session")
def accel_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hypervisor-state")


@pytest.fixture
def hypervisor(accel_cache_dir: Path) -> QemuHypervisor:
    return QemuHypervisor(state_dir=accel_cache_dir)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def guest_config(
    guest: GuestImage,
    directory: Path,
    *,
    board: Board = Board.QEMU_MICROVM,
    forwards: list[PortForward] | None = None,
    vm_id: str = "vm1",
) -> VMConfig:
    return VMConfig(
        vm_id=vm_id,
        directory=directory,
        board=board,
        vcpus=1,
        memory_mib=256,
        kernel=guest.kernel,
        initrd=guest.initrd,
        user_network=forwards is not None,
        port_forwards=forwards or [],
    )


@pytest.fixture
async def launch(hypervisor: QemuHypervisor) -> AsyncIterator[Launcher]:
    """Start VMs through the backend; every one of them is killed when the test ends."""
    handles: list[QemuVMHandle] = []

    async def _launch(config: VMConfig) -> QemuVMHandle:
        handle = await hypervisor.start(config)
        handles.append(handle)
        return handle

    try:
        yield _launch
    finally:
        for handle in handles:
            if handle.is_alive():
                await handle.kill()
            await handle.close()


def console_text(handle: QemuVMHandle) -> str:
    try:
        return handle.console_log_path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


async def wait_for_console(
    handle: QemuVMHandle,
    needle: str,
    timeout: float = BOOT_TIMEOUT,  # noqa: ASYNC109 - fails with the console tail, not CancelledError
) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        text = console_text(handle)
        if needle in text:
            return text
        if not handle.is_alive():
            raise AssertionError(f"QEMU exited before {needle!r}; console:\n{text[-2000:]}")
        if loop.time() > deadline:
            raise AssertionError(f"no {needle!r} within {timeout} s; console:\n{text[-2000:]}")
        await asyncio.sleep(0.1)


async def wait_ready(handle: QemuVMHandle) -> str:
    return await wait_for_console(handle, READY_LINE)


def long_directory(base: Path) -> Path:
    """A VM directory deep enough that its socket paths exceed the 108-byte Unix limit."""
    directory = base / ("d" * 60) / ("e" * 60)
    assert len(str(directory / "qemu.sock")) > 108
    return directory


def kill_pid_if_ours(pid: int, directory: Path) -> None:
    """Cleanup for VMs started outside this process: SIGKILL only if it is still that VMM."""
    from hypemand.hypervisor.process import ProcessRecord, ProcessWatch

    record = ProcessRecord.load(directory / "vmm.json")
    if record is None or record.pid != pid:
        return
    watch = ProcessWatch.open(record)
    if watch is not None:
        watch.send_signal(9)
        watch.close()
