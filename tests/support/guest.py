"""Real guests for tests, booted through the project's own code and nothing else.

Every VM test boots the prepared system files (Debian kernel, our initrd and C init) with
``QemuHypervisor``: either the whole instance path (``instances.boot.boot_guest`` with a
``GuestSpec``), or, for hypervisor-level tests, a ``VMConfig`` built from the same pieces. The
root disk is a busybox tree as ext4 or erofs: the smallest image with a shell.

Fixtures (import them into a ``conftest.py`` to use them): ``system_files`` (session, the shared
system dir), ``busybox_tree`` / ``busybox_ext4`` (session), ``accel_cache_dir`` (session) and
``hypervisor`` (a ``QemuHypervisor`` whose TCG/KVM decision is probed once per session).
Context managers ``booted_guest`` / ``launched_guest`` always kill their VM, also when the test
fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

from hypemand.guest.config_disk import GuestConfig
from hypemand.guest.markers import ConsoleMarkers, Marker, wait_for_markers
from hypemand.hypervisor.base import VMConfig, VMHandle
from hypemand.hypervisor.process import ProcessWatch
from hypemand.hypervisor.qemu import QemuHypervisor, QemuVMHandle
from hypemand.instances.boot import GuestSpec, RunningGuest, boot_guest, prepare_disks, vm_config
from hypemand.system.files import SystemFiles, ensure_system_files

# TCG on 2 shared cores: a boot takes 3-10 s, much more while other suites boot VMs too.
BOOT_TIMEOUT = 120.0
# Test overlays stay small: a sparse file, but mkfs and the guest's ext4 mount scale with it.
TEST_OVERLAY_BYTES = 64 << 20


def shared_system_dir() -> Path:
    return Path(os.environ.get("HYPEMAND_SYSTEM_DIR", "/var/lib/hypemand/system"))


# --- images -------------------------------------------------------------------------------


def make_busybox_tree(root: Path) -> Path:
    """A directory holding static busybox with its applet links: the smallest useful image."""
    busybox = shutil.which("busybox")
    assert busybox, "busybox-static is needed for VM tests"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "bin/busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    for directory in ("etc", "tmp", "proc", "sys", "dev", "run", "root"):
        (root / directory).mkdir(exist_ok=True)
    return root


def make_ext4_image(tree: Path, image: Path, size_mb: int = 16) -> Path:
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), f"{size_mb}M"],
        check=True,
        capture_output=True,
    )
    return image


def make_erofs_image(tree: Path, image: Path) -> Path:
    subprocess.run(["mkfs.erofs", "-zlz4hc", str(image), str(tree)], check=True, capture_output=True)
    return image


# --- booting ------------------------------------------------------------------------------


def guest_spec(directory: Path, root_disk: Path, config: GuestConfig, **fields: Any) -> GuestSpec:
    """A spec named after its directory, with a small overlay disk."""
    fields.setdefault("overlay_size_bytes", TEST_OVERLAY_BYTES)
    return GuestSpec(vm_id=directory.name, directory=directory, root_disk=root_disk, guest=config, **fields)


async def _kill_and_close(handle: VMHandle) -> None:
    try:
        if handle.is_alive():
            await handle.kill()
    finally:
        await handle.close()
        if isinstance(handle, QemuVMHandle):
            # A handle the test closed (adoption tests) no longer sees its VMM: find the
            # process again by its recorded identity, which never matches a reused PID.
            watch = ProcessWatch.open(handle.record)
            if watch is not None:
                watch.send_signal(signal.SIGKILL)
                watch.close()


@contextlib.asynccontextmanager
async def booted_guest(
    hypervisor: QemuHypervisor,
    system: SystemFiles,
    spec: GuestSpec,
    timeout: float = BOOT_TIMEOUT,  # noqa: ASYNC109 - passed to boot_guest, which reports the console
) -> AsyncIterator[RunningGuest]:
    """``boot_guest``: the program started and the agent answers. The VM is killed at the end."""
    guest = await boot_guest(hypervisor, system, spec, timeout=timeout)
    try:
        yield guest
    finally:
        with contextlib.suppress(Exception):
            await guest.agent.close()
        await _kill_and_close(guest.handle)


def prepared_vm_config(system: SystemFiles, spec: GuestSpec) -> VMConfig:
    """The disks and ``VMConfig`` that ``boot_guest`` would use, for tests that start VMs themselves."""
    prepare_disks(spec)
    return vm_config(spec, system)


@contextlib.asynccontextmanager
async def launched_guest(
    hypervisor: QemuHypervisor, system: SystemFiles, spec: GuestSpec
) -> AsyncIterator[QemuVMHandle]:
    """The VM of ``boot_guest`` (same disks, same ``VMConfig``), started without waiting for it:
    for guests whose program ends, or never starts. The VM is killed at the end."""
    async with launched_vm(hypervisor, prepared_vm_config(system, spec)) as handle:
        yield handle


@contextlib.asynccontextmanager
async def launched_vm(hypervisor: QemuHypervisor, config: VMConfig) -> AsyncIterator[QemuVMHandle]:
    """``hypervisor.start(config)``; the VM is killed at the end."""
    handle = await hypervisor.start(config)
    try:
        yield handle
    finally:
        await _kill_and_close(handle)


# --- watching -----------------------------------------------------------------------------


def console_text(handle: VMHandle) -> str:
    try:
        return handle.console_log_path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


async def wait_for_console(
    handle: VMHandle,
    needle: str,
    timeout: float = BOOT_TIMEOUT,  # noqa: ASYNC109 - fails with the console tail, not CancelledError
) -> str:
    """Wait until ``needle`` is on the console; returns the whole console text."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        alive = handle.is_alive()  # sampled first: a last line written before exit still counts
        text = console_text(handle)
        if needle in text:
            return text
        if not alive:
            raise AssertionError(f"QEMU exited before {needle!r}; console:\n{text[-3000:]}")
        if loop.time() > deadline:
            raise AssertionError(f"no {needle!r} within {timeout} s; console:\n{text[-3000:]}")
        await asyncio.sleep(0.1)


def console_size(path: Path) -> int:
    """Where the next boot's console output starts: a restarted VM appends to the same log."""
    return path.stat().st_size if path.exists() else 0


async def wait_for_guest_markers(
    handle: VMHandle,
    wanted: Iterable[Marker],
    timeout: float = BOOT_TIMEOUT,  # noqa: ASYNC109 - fails with the console tail
    offset: int = 0,
) -> ConsoleMarkers:
    return await wait_for_markers(handle.console_log_path, wanted, timeout, handle.is_alive, offset=offset)


async def wait_for_power_off(
    handle: VMHandle,
    timeout: float = BOOT_TIMEOUT,  # noqa: ASYNC109 - fails with the console tail
    offset: int = 0,
) -> ConsoleMarkers:
    """The guest's HYPEMAN-EXIT marker, then QEMU ending *by itself* (nobody stops it here)."""
    markers = await wait_for_guest_markers(handle, [Marker.EXIT], timeout, offset)
    exited = await handle.wait_exit(60)
    assert exited, f"QEMU did not exit after the guest's exit marker:\n{console_text(handle)}"
    return markers


async def http_get(port: int, attempts: int = 100) -> str:
    """GET http://127.0.0.1:<port>/, retrying while the guest's server is still starting."""

    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            return str(response.read().decode())

    for _ in range(attempts - 1):
        try:
            return await asyncio.to_thread(fetch)
        except OSError:
            await asyncio.sleep(0.2)
    return await asyncio.to_thread(fetch)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def system_files() -> SystemFiles:
    return ensure_system_files(shared_system_dir())


@pytest.fixture(scope="session")
def busybox_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_busybox_tree(tmp_path_factory.mktemp("busybox") / "tree")


@pytest.fixture(scope="session")
def busybox_ext4(busybox_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ext4_image(busybox_tree, tmp_path_factory.mktemp("images") / "busybox.ext4")


@pytest.fixture(scope="session")
def accel_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where ``QemuHypervisor`` caches its acceleration probe: probed once per session."""
    return tmp_path_factory.mktemp("hypervisor-state")


@pytest.fixture
def hypervisor(accel_cache_dir: Path) -> QemuHypervisor:
    return QemuHypervisor(state_dir=accel_cache_dir)
