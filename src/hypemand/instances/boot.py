"""Boot a guest: the one path every instance start (and later restore) goes through.

It turns a root disk plus a :class:`GuestConfig` into a running VM:

1. :func:`launch_guest` refuses a directory whose VMM still runs (before touching any disk),
   gives the VM directory its writable overlay disk (created once, kept across restarts) and a
   fresh config disk (rewritten at every boot, so start-time overrides take effect), and has the
   hypervisor launch the VM with the kernel and initrd named by their versioned paths;
2. :func:`await_guest` waits for the guest's console markers and connects the agent. A program
   that ends at once is a normal life, not a boot failure: its exit marker ends the wait, and
   the outcome carries the exit instead of an agent. Only a guest that never reaches its program
   (no markers in time, or QEMU dying without an exit marker) is a boot failure.

:func:`boot_guest` is both in one call. The instance manager uses only :func:`launch_guest`: it
returns from a create as soon as QEMU runs, and its watcher follows the markers from there
(``lifecycle.py``); :func:`await_guest` and :func:`boot_guest` serve the benches and tests that
boot a guest without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from hypemand.errors import Conflict
from hypemand.fsutil import exclusive_lock
from hypemand.guest.client import AgentClient, AgentDisconnected, AgentError
from hypemand.guest.config_disk import GuestConfig, GuestNetwork, make_overlay_disk, write_config_disk
from hypemand.guest.markers import (
    ConsoleMarkers,
    GuestBootTimeout,
    GuestExit,
    Marker,
    parse_markers,
    read_console,
    wait_for_markers,
)
from hypemand.hypervisor.base import Board, DiskConfig, Hypervisor, PortForward, VMConfig, VMHandle
from hypemand.hypervisor.qemu_cmdline import free_virtio_slots
from hypemand.instances.volume_disk import replay_journal
from hypemand.layout import InstancePaths
from hypemand.system.files import SystemFiles

log = logging.getLogger(__name__)

ROOT_SERIAL = "hm-root"
OVERLAY_SERIAL = "hm-overlay"
CONFIG_SERIAL = "hm-config"
DEFAULT_BOOT_TIMEOUT = 60.0  # generous: under TCG with both cores busy a boot can take 10 s+
# After the agent connection fails, how long a guest may take to finish powering off before the
# failure is taken for what it is (an agent that went away while the VM still runs).
EXIT_GRACE = 10.0


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
    network: bool = True  # a NIC: QEMU's user-mode one, or with ``tap`` the VM's TAP
    tap: bool = False  # the caller made the TAP and gives the guest its address in ``guest``
    mac: str | None = None  # None: derived from the VM id
    # Volumes (instances/volumes.py): their drives after the config disk, in order; overlay upper
    # disks to make where missing (path, size); read-only disks whose ext4 journal is replayed
    # first if a VM killed while writing left one (the guest cannot replay on a read-only disk).
    volume_disks: list[DiskConfig] = Field(default_factory=list)
    volume_uppers: list[tuple[Path, int]] = Field(default_factory=list)
    volume_replays: list[Path] = Field(default_factory=list)

    @property
    def paths(self) -> InstancePaths:
        return InstancePaths(self.directory)


@dataclass
class LaunchedGuest:
    """A VM whose VMM runs; ``console_offset`` is where this boot's console output begins."""

    handle: VMHandle
    console_offset: int


class RunningGuest:
    """A booted guest: its program started and its agent answers, or its program already ended
    (then :attr:`exit` is set and there is no agent: the guest powered off)."""

    def __init__(self, handle: VMHandle, agent: AgentClient | None, markers: ConsoleMarkers) -> None:
        self.handle = handle
        self._agent = agent
        self.markers = markers

    @property
    def exit(self) -> GuestExit | None:
        return self.markers.exit if self._agent is None else None

    @property
    def agent(self) -> AgentClient:
        if self._agent is None:
            raise AgentDisconnected(f"VM {self.handle.vm_id}: the program ended; the guest powered off")
        return self._agent

    async def close(self) -> None:
        """Drop our connections; the VM keeps running."""
        if self._agent is not None:
            await self._agent.close()
        await self.handle.close()


def vm_config(spec: GuestSpec, system: SystemFiles) -> VMConfig:
    paths = spec.paths
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
            DiskConfig(path=paths.overlay_disk, serial=OVERLAY_SERIAL),
            DiskConfig(path=paths.config_disk, readonly=True, serial=CONFIG_SERIAL),
            *spec.volume_disks,
        ],
        user_network=spec.network and not spec.tap,
        tap_network=spec.network and spec.tap,
        nic_mac=spec.mac,
        port_forwards=spec.port_forwards,
        # Every VM has a balloon, but one whose volumes were attached when they could still take
        # its virtio slot (before the balloon existed): it boots as it did.
        balloon=len(spec.volume_disks) <= free_virtio_slots(spec.board),
    )


def prepare_disks(spec: GuestSpec) -> None:
    paths = spec.paths
    spec.directory.mkdir(parents=True, exist_ok=True)
    if not paths.overlay_disk.exists():
        make_overlay_disk(paths.overlay_disk, spec.overlay_size_bytes)
    for upper, size in spec.volume_uppers:
        if not upper.exists():
            make_overlay_disk(upper, size, label="hm-vol-upper")
    for disk in spec.volume_replays:
        replay_journal(disk)
    guest = spec.guest
    if spec.network and guest.network is None:
        guest = guest.model_copy(update={"network": GuestNetwork.user_mode()})
    write_config_disk(paths.config_disk, guest)


async def launch_guest(hypervisor: Hypervisor, system: SystemFiles, spec: GuestSpec) -> LaunchedGuest:
    """Prepare the disks and start the VMM; returns as soon as the VMM answers."""
    config = vm_config(spec, system)
    paths = spec.paths
    # One boot per VM directory at a time (across processes): a second one must not rewrite the
    # disks of a VM that is being started.
    spec.directory.mkdir(parents=True, exist_ok=True)
    busy = f"VM {spec.vm_id}: another boot of {spec.directory} is in progress"
    with exclusive_lock(paths.boot_lock, busy):
        # A VM that still runs keeps its disks: find out before rewriting its config disk.
        running = await hypervisor.adopt(spec.directory)
        if running is not None:
            await running.close()
            raise Conflict(
                f"VM {spec.vm_id}: a VMM is already running in {spec.directory} (pid {running.pid})"
            )
        await asyncio.to_thread(prepare_disks, spec)  # mke2fs and fsync: not on the event loop
        console = paths.console_log
        offset = console.stat().st_size if console.exists() else 0
        handle = await hypervisor.start(config)
    return LaunchedGuest(handle=handle, console_offset=offset)


async def await_guest(
    launched: LaunchedGuest,
    timeout: float = DEFAULT_BOOT_TIMEOUT,  # noqa: ASYNC109 - expiry must report the console tail
    *,
    need_agent: bool = True,
) -> RunningGuest:
    """Wait until the program started and (with ``need_agent``) the agent answers, or until the
    program ended. Raises GuestBootTimeout if the guest never got that far; the VM is left as it
    is (the caller decides whether to kill it)."""
    handle = launched.handle
    console = handle.console_log_path
    wanted = {Marker.PROGRAM_START, Marker.AGENT_READY} if need_agent else {Marker.PROGRAM_START}
    try:
        markers = await wait_for_markers(
            console, wanted, timeout, handle.is_alive, offset=launched.console_offset
        )
    except GuestBootTimeout as exc:
        # An init that could not set the guest up (HYPEMAN-BOOT-ERROR) failed to boot; a program
        # that ran and ended, even at once or as "command not found", lived a normal life.
        if exc.markers.exit is None or exc.markers.boot_error is not None:
            raise
        return await _ended(launched, exc.markers)
    if markers.exit is not None:
        return await _ended(launched, markers)
    if not need_agent:
        return RunningGuest(handle, None, markers)
    try:
        agent = await _connect_agent(handle, timeout)
    except AgentError:
        # The program may have ended and the guest powered off while we connected: that is the
        # program's normal end, known by its exit marker once QEMU is gone.
        if not await handle.wait_exit(EXIT_GRACE):
            raise
        ended = parse_markers(read_console(console, launched.console_offset))
        if ended.exit is None:
            raise
        return RunningGuest(handle, None, ended)
    if agent is None:
        ended = parse_markers(read_console(console, launched.console_offset))
        if ended.exit is None:
            raise GuestBootTimeout("VM process ended before the agent answered", "", ended)
        return RunningGuest(handle, None, ended)
    return RunningGuest(handle, agent, markers)


async def _ended(launched: LaunchedGuest, markers: ConsoleMarkers) -> RunningGuest:
    """The exit marker is there: the guest powers off next. Wait for QEMU to go (bounded) so that
    callers see a finished VM, not one in its last milliseconds."""
    await launched.handle.wait_exit(EXIT_GRACE)
    return RunningGuest(launched.handle, None, markers)


async def boot_guest(
    hypervisor: Hypervisor,
    system: SystemFiles,
    spec: GuestSpec,
    timeout: float = DEFAULT_BOOT_TIMEOUT,  # noqa: ASYNC109 - expiry kills the VM and reports its console
) -> RunningGuest:
    """Boot and return once the program started and the agent answers, or the program ended.
    A guest that fails to boot is killed and reported with its console tail."""
    launched = await launch_guest(hypervisor, system, spec)
    try:
        return await await_guest(launched, timeout)
    except BaseException as exc:
        if isinstance(exc, GuestBootTimeout):
            log.warning("VM %s did not boot: %s", spec.vm_id, exc.reason)
        with contextlib.suppress(Exception):
            await launched.handle.kill()
        await launched.handle.close()
        raise


async def _connect_agent(handle: VMHandle, timeout: float) -> AgentClient | None:  # noqa: ASYNC109
    """Connect to the agent unless the VM ends first (then None: there is nothing to connect to,
    and retrying a socket that is gone until the timeout would only delay the news)."""
    connecting = asyncio.ensure_future(AgentClient.connect(handle.agent_socket_path, timeout=timeout))
    exited = asyncio.ensure_future(handle.wait_exit())
    try:
        await asyncio.wait({connecting, exited}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
        if not connecting.done():
            connecting.cancel()
        await asyncio.gather(connecting, exited, return_exceptions=True)
    if connecting.done() and not connecting.cancelled() and connecting.exception() is None:
        agent = connecting.result()
        if not handle.is_alive():
            await agent.close()
            return None
        return agent
    if not connecting.cancelled() and (error := connecting.exception()) is not None:
        raise error
    return None
