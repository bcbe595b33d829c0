"""Boot a guest: the one path every instance start (and later restore) goes through.

It turns a root disk plus a :class:`GuestConfig` into a running VM whose program has started
and whose agent answers:

1. the VM directory gets its writable overlay disk (created once, kept across restarts) and a
   fresh config disk (rewritten at every boot, so start-time overrides take effect);
2. the hypervisor launches the VM from a :class:`VMConfig` naming the kernel and initrd by
   their versioned paths, so a VM that slept on one initrd wakes on the same one;
3. we wait for the guest's console markers; a guest that never reaches them is killed and
   reported with the tail of its console;
4. the agent client connects over the virtio-serial socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from hypemand.fsutil import exclusive_lock
from hypemand.guest.client import AgentClient
from hypemand.guest.config_disk import GuestConfig, GuestNetwork, make_overlay_disk, write_config_disk
from hypemand.guest.markers import (
    ConsoleMarkers,
    GuestBootTimeout,
    Marker,
    console_tail,
    parse_markers,
    read_console,
    wait_for_markers,
)
from hypemand.hypervisor.base import Board, DiskConfig, Hypervisor, PortForward, VMConfig, VMHandle
from hypemand.system.files import SystemFiles

log = logging.getLogger(__name__)

ROOT_SERIAL = "hm-root"
OVERLAY_SERIAL = "hm-overlay"
CONFIG_SERIAL = "hm-config"
OVERLAY_DISK = "overlay.raw"
CONFIG_DISK = "config.disk"
BOOT_LOCK = ".boot.lock"
DEFAULT_BOOT_TIMEOUT = 60.0  # generous: under TCG with both cores busy a boot can take 10 s+


class GuestSpec(BaseModel):
    """What to boot: one image disk, the program's configuration, and the VM's shape."""

    vm_id: str
    directory: Path
    root_disk: Path
    guest: GuestConfig
    board: Board = Board.QEMU_MICROVM
    vcpus: int = Field(default=1, ge=1)
    memory_mib: int = Field(default=256, ge=64)
    overlay_size_bytes: int = Field(default=1 << 30, ge=16 << 20)
    port_forwards: list[PortForward] = Field(default_factory=list)
    network: bool = True


@dataclass
class RunningGuest:
    handle: VMHandle
    agent: AgentClient
    markers: ConsoleMarkers

    async def close(self) -> None:
        """Drop our connections; the VM keeps running."""
        await self.agent.close()
        await self.handle.close()


def vm_config(spec: GuestSpec, system: SystemFiles) -> VMConfig:
    return VMConfig(
        vm_id=spec.vm_id,
        directory=spec.directory,
        board=spec.board,
        vcpus=spec.vcpus,
        memory_mib=spec.memory_mib,
        kernel=system.kernel_path,
        initrd=system.initrd_path,
        kernel_args=system.kernel_args.split(),
        disks=[
            DiskConfig(path=spec.root_disk, readonly=True, serial=ROOT_SERIAL),
            DiskConfig(path=spec.directory / OVERLAY_DISK, serial=OVERLAY_SERIAL),
            DiskConfig(path=spec.directory / CONFIG_DISK, readonly=True, serial=CONFIG_SERIAL),
        ],
        user_network=spec.network,
        port_forwards=spec.port_forwards,
    )


def prepare_disks(spec: GuestSpec) -> None:
    spec.directory.mkdir(parents=True, exist_ok=True)
    overlay = spec.directory / OVERLAY_DISK
    if not overlay.exists():
        make_overlay_disk(overlay, spec.overlay_size_bytes)
    guest = spec.guest
    if spec.network and guest.network is None:
        guest = guest.model_copy(update={"network": GuestNetwork.user_mode()})
    write_config_disk(spec.directory / CONFIG_DISK, guest)


async def boot_guest(
    hypervisor: Hypervisor,
    system: SystemFiles,
    spec: GuestSpec,
    timeout: float = DEFAULT_BOOT_TIMEOUT,  # noqa: ASYNC109 - expiry kills the VM and reports its console
) -> RunningGuest:
    """Boot and return once the program started and the agent answers."""
    config = vm_config(spec, system)
    console = config.paths.console_log
    # One boot per VM directory at a time (across processes): a second one must not rewrite the
    # disks of a VM that is being started.
    spec.directory.mkdir(parents=True, exist_ok=True)
    busy = f"VM {spec.vm_id}: another boot of {spec.directory} is in progress"
    with exclusive_lock(spec.directory / BOOT_LOCK, busy):
        await asyncio.to_thread(prepare_disks, spec)  # mke2fs and fsync: not on the event loop
        offset = console.stat().st_size if console.exists() else 0
        handle = await hypervisor.start(config)
    try:
        markers = await wait_for_markers(
            console, {Marker.PROGRAM_START, Marker.AGENT_READY}, timeout, handle.is_alive, offset=offset
        )
        agent = await _connect_agent(handle, console, offset, timeout)
    except BaseException as exc:
        if isinstance(exc, GuestBootTimeout):
            log.warning("VM %s did not boot: %s", spec.vm_id, exc.reason)
        with contextlib.suppress(Exception):
            await handle.kill()
        await handle.close()
        raise
    return RunningGuest(handle=handle, agent=agent, markers=markers)


async def _connect_agent(handle: VMHandle, console: Path, offset: int, timeout: float) -> AgentClient:  # noqa: ASYNC109
    """Connect to the agent unless the VM ends first. A program that ends at once powers the
    guest off, maybe before we are connected: then report its exit instead of retrying a socket
    that is gone until the timeout."""
    connecting = asyncio.ensure_future(AgentClient.connect(handle.agent_socket_path, timeout=timeout))
    exited = asyncio.ensure_future(handle.wait_exit())
    try:
        await asyncio.wait({connecting, exited}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
        if not connecting.done():
            connecting.cancel()
        await asyncio.gather(connecting, exited, return_exceptions=True)
    if not exited.cancelled() and exited.exception() is None and exited.result():
        if not connecting.cancelled() and connecting.exception() is None:
            await connecting.result().close()
        text = read_console(console, offset)
        markers = parse_markers(text)
        detail = f"code {markers.exit.code}: {markers.exit.message}" if markers.exit else "no exit marker"
        raise GuestBootTimeout(
            f"guest exited ({detail}) before the agent answered", console_tail(text), markers
        )
    return connecting.result()
