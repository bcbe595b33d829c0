"""The one entry point for system files: kernel, initrd and guest binary, ready to boot."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

from hypemand.guest.build import build_guest_binary
from hypemand.layout import SystemPaths
from hypemand.system.initrd import build_initrd
from hypemand.system.kernel import FAST_BOOT_ARGS, GUEST_MEMORY_ARGS, install_kernel


class SystemFiles(BaseModel):
    kernel_path: Path  # uncompressed ELF vmlinux (PVH boot)
    kernel_bzimage_path: Path  # the same kernel as a bzImage, for machines without PVH
    kernel_version: str
    kernel_package_version: str
    initrd_path: Path
    initrd_version: str
    guest_binary_path: Path
    # Extra kernel arguments for this kernel that shorten boot under TCG (see README) and let the
    # memory balloon return memory (GUEST_MEMORY_ARGS); the VM launcher appends them to its own
    # (console=ttyS0 quiet panic=-1, tsc_early_khz on microvm).
    kernel_args: str = f"{FAST_BOOT_ARGS} {GUEST_MEMORY_ARGS}"


@contextmanager
def _system_lock(system: SystemPaths) -> Iterator[None]:
    """Several processes (server, setup, test sessions) may prepare the same dir at once."""
    system.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(system.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_system_files(system_dir: Path) -> SystemFiles:
    """Make sure kernel, guest binary and initrd exist in ``system_dir`` (the root of a
    :class:`hypemand.layout.SystemPaths`); fast (tens of ms) when they do.

    Blocking: call it through ``asyncio.to_thread`` from async code.
    """
    system = SystemPaths(system_dir)
    with _system_lock(system):
        kernel = install_kernel(system)
        guest_binary = build_guest_binary(system)
        initrd = build_initrd(system, kernel, guest_binary)
    return SystemFiles(
        kernel_path=kernel.vmlinux,
        kernel_bzimage_path=kernel.vmlinuz,
        kernel_version=kernel.info.version,
        kernel_package_version=kernel.info.package_version,
        initrd_path=initrd.path,
        initrd_version=initrd.info.version,
        guest_binary_path=guest_binary,
    )
