"""An instance's place on the VM network: its address, its TAP and its bandwidth.

Two models (``capabilities.network.model``):

* **bridge**: the server's :class:`~hypemand.network.NetworkHost` is up (a bridge, NAT, one TAP
  per VM, isolated ports). Each VM holds an IP and a MAC of the subnet while it runs or is in
  standby; a stopped VM holds none (its last pair is kept in its record only as the one to try
  first at its next start).
* **nat**: the fallback where the server may not build a bridge (no privileges, or chosen with
  ``HYPEMAND_NETWORK_MODE=user``): QEMU's user-mode NIC, egress only, the same fixed address in
  every VM.

**No allocation file.** Who holds which pair is derived on every allocation from what is real:
every instance whose VMM runs or whose saved VM waits in standby (their records say which pair),
plus the allocations of boots, restores and forks in flight (in memory, between the choice and
the VMM holding it). The choice and its registration happen in one synchronous step, so two
concurrent creates never take the same pair.

The caller of :meth:`Networking.plugged` and :meth:`Networking.unplug` holds the instance's
lock (or owns the instance alone: a create or fork that has not answered yet).
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Literal

from pyroute2.netlink.exceptions import NetlinkError

from hypemand.errors import BadRequest, Conflict, DomainError
from hypemand.guest.config_disk import GuestNetwork
from hypemand.instances.live import InstanceTable, LiveInstance
from hypemand.instances.models import InstanceRecord, NetworkRequest
from hypemand.network import (
    AddressesExhausted,
    Allocation,
    BandwidthLimits,
    InstanceAddress,
    NetworkConfig,
    NetworkHost,
    allocate,
)
from hypemand.network.namespace import NamespaceError
from hypemand.units import UnitError, parse_rate

log = logging.getLogger(__name__)

NetworkModel = Literal["bridge", "nat"]
NicKind = Literal["tap", "user"]
# QEMU's user-mode network, as every guest sees it.
USER_MODE_GATEWAY = "10.0.2.2"
USER_MODE_SUBNET = "10.0.2.0/24"
NETWORK_OVERSUBSCRIPTION = 2.0  # the reference's OVERSUB_NETWORK default


@dataclass(frozen=True)
class NetworkFacts:
    """What /capabilities and /resources say of the network."""

    model: NetworkModel
    gateway: str
    subnet: str
    capacity: int  # bytes per second the VMs' uploads share; 0 when not limited
    source: str


def is_asleep(live: LiveInstance) -> bool:
    """In standby with an address: no VMM (and no TAP) behind the address it keeps."""
    return live.record.ip is not None and live.handle is None and live.record.phase == "standby"


def holds_address(live: LiveInstance) -> bool:
    """Whether the instance holds its IP and MAC now: its VMM runs (a handle), or its saved VM
    waits in standby, which comes back with the same identity."""
    return live.record.ip is not None and (live.handle is not None or live.record.phase == "standby")


class Networking:
    def __init__(self, table: InstanceTable, config: NetworkConfig | None, host: NetworkHost | None,
                 user_mode_reason: str | None = None) -> None:
        """``config`` and ``host`` None: user-mode networking from the start, for
        ``user_mode_reason``."""
        self.table = table
        self.config = config
        self.host = host
        self.user_mode_reason = user_mode_reason if host is None else None
        self._in_flight: dict[str, Allocation] = {}

    @property
    def model(self) -> NetworkModel:
        return "bridge" if self.host is not None else "nat"

    # ---- the server's start -------------------------------------------------------------------

    async def start(self, running_ids: set[str]) -> None:
        """Bring the network up (bridge, rules; TAPs of VMs that are not running removed), or
        fall back to user-mode networking where the server lacks the privileges. A bad
        configuration (subnet in use, no such uplink) is not a fallback: it raises
        :class:`~hypemand.network.NetworkConfigError`, and the server refuses to start."""
        if self.host is None:
            log.info("network: user-mode networking (%s)", self.user_mode_reason)
            return
        try:
            sleeping = {IPv4Address(live.record.ip) for live in self.table
                        if is_asleep(live) and live.record.ip}
            report = await self.host.start(running_ids, sleeping)
        except (NamespaceError, PermissionError, NetlinkError, OSError) as exc:
            if not _lacks_privileges(exc):
                raise
            self.host.close()
            self.host = None
            self.user_mode_reason = f"the server may not build a bridge network: {exc}"
            log.warning("network: falling back to user-mode networking: %s", exc)
            return
        assert self.config is not None
        log.info("network: bridge %s, gateway %s, subnet %s, in %s, uplink %s%s",
                 self.config.bridge, self.config.gateway, self.config.subnet, self.config.where(),
                 self.host.uplink, f"; removed stray TAPs {list(report.removed_taps)}"
                 if report.removed_taps else "")

    def close(self) -> None:
        """End the namespace thread; the network stays as it is (VMs outlive the server)."""
        if self.host is not None:
            self.host.close()

    # ---- what the API shows -------------------------------------------------------------------

    def facts(self) -> NetworkFacts:
        if self.host is None or self.config is None:
            return NetworkFacts("nat", USER_MODE_GATEWAY, USER_MODE_SUBNET, 0,
                                f"not limited (user-mode networking: {self.user_mode_reason})")
        return NetworkFacts("bridge", str(self.config.gateway), str(self.config.subnet), self.host.capacity,
                            f"uplink {self.host.uplink} link speed or NETWORK_LIMIT")

    def find_address(self, ref: str) -> InstanceAddress | None:
        """The instance named or numbered exactly ``ref`` and the address it holds now."""
        live = self.table.get(ref) or next((item for item in self.table if item.name == ref), None)
        if live is None or live.deleted:
            return None
        return InstanceAddress(live.id, live.name, live.record.ip if holds_address(live) else None,
                               asleep=is_asleep(live))

    # ---- a create's choices --------------------------------------------------------------------

    def bandwidth(
        self, request: NetworkRequest | None, vcpus: int, host_cpus: int
    ) -> tuple[int | None, int | None]:
        """Download and upload limits in bytes per second: what the request asks for, else the
        VM's share of the capacity (its vCPUs out of the host's), as the reference. None for
        both under user-mode networking, which cannot limit."""
        asked: dict[str, int | None] = {"download": None, "upload": None}
        for direction in asked:
            text = getattr(request, f"bandwidth_{direction}", None) if request else None
            if text:
                try:
                    asked[direction] = parse_rate(text)
                except UnitError as exc:
                    raise BadRequest(f"network.bandwidth_{direction}: {exc}",
                                     code=f"invalid_bandwidth_{direction}") from None
        if self.host is None:
            if any(asked.values()):
                raise BadRequest("network bandwidth limits need the bridge network; this server runs "
                                 f"user-mode networking ({self.user_mode_reason})", code="not_supported")
            return None, None
        share = max(1, self.host.capacity * min(vcpus, host_cpus) // max(1, host_cpus))
        return asked["download"] or share, asked["upload"] or share

    # ---- plugging and unplugging ----------------------------------------------------------------

    def nic_of(self, record: InstanceRecord) -> NicKind | None:
        """The NIC a fresh boot of ``record`` gets now."""
        if not record.network_enabled:
            return None
        return "tap" if self.host is not None else "user"

    def guest_network(self, record: InstanceRecord) -> GuestNetwork | None:
        """The guest's addresses, as its config disk and a fork's re-addressing give them."""
        if not record.network_enabled:
            return None
        if record.ip is None or self.config is None:
            return GuestNetwork.user_mode()
        return GuestNetwork(ip=record.ip, prefix=self.config.subnet.prefixlen,
                            gateway=str(self.config.gateway), dns=[str(self.config.dns)])

    def reserve(self, instance_id: str, prefer: InstanceRecord | None = None) -> Allocation:
        """Choose a pair no one holds (``prefer``'s own when it is free) and hold it for
        ``instance_id`` until :meth:`settle`. Synchronous on purpose: the choice and its
        registration cannot interleave with another's."""
        assert self.config is not None
        claims = self._claims(excluding=instance_id)
        if prefer is not None and prefer.ip is not None and prefer.mac.startswith("02:"):
            taken_ips = {ip for ip, _ in claims}
            taken_macs = {mac for _, mac in claims}
            if prefer.ip not in taken_ips and prefer.mac not in taken_macs:
                chosen = Allocation(IPv4Address(prefer.ip), prefer.mac)
                self._in_flight[instance_id] = chosen
                return chosen
        try:
            chosen = allocate(self.config.subnet, claims)
        except AddressesExhausted as exc:
            raise Conflict(f"no free address on the VM network {self.config.subnet}: {exc}",
                           code="insufficient_resources") from None
        self._in_flight[instance_id] = chosen
        return chosen

    def settle(self, instance_id: str) -> None:
        """The reservation ends: the VMM holds the pair now, or the boot failed."""
        self._in_flight.pop(instance_id, None)

    def _claims(self, excluding: str) -> list[tuple[str, str]]:
        held = [(live.record.ip, live.record.mac) for live in self.table
                if live.id != excluding and holds_address(live) and live.record.ip is not None]
        held += [(str(a.ip), a.mac) for key, a in self._in_flight.items() if key != excluding]
        return held

    @contextlib.asynccontextmanager
    async def plugged(self, live: LiveInstance, *, keep_identity: bool) -> AsyncIterator[None]:
        """Give the instance its TAP for the launch inside the block: a fresh boot takes a
        free pair (its last one if free), a restore (``keep_identity``) the pair it was saved
        with. A failure inside the block removes the TAP; the in-flight hold ends either way."""
        if self.host is None or not live.record.network_enabled:
            if keep_identity and live.record.ip is not None:
                raise DomainError(f"instance {live.name} was saved on the bridge network, which this "
                                  f"server does not have ({self.user_mode_reason})")
            yield
            return
        record = live.record
        if keep_identity:
            if record.ip is None:  # saved with a user-mode NIC: restored as it was saved
                yield
                return
            claims = self._claims(live.id)
            if any(ip == record.ip or mac == record.mac for ip, mac in claims):
                raise Conflict(f"instance {live.name}: its address {record.ip} ({record.mac}) is held by "
                               "another instance now", code="address_in_use")
            self._in_flight[live.id] = Allocation(IPv4Address(record.ip), record.mac)
        else:
            chosen = self.reserve(live.id, prefer=record)
            live.record = record.model_copy(update={"ip": str(chosen.ip), "mac": chosen.mac})
        try:
            held = live.record
            limits = BandwidthLimits(download=held.bandwidth_download, upload=held.bandwidth_upload)
            await self.host.create_tap(live.id, IPv4Address(held.ip), limits)
            try:
                yield
            except BaseException:
                await self.unplug(live, release=not keep_identity)
                raise
        finally:
            self.settle(live.id)

    async def unplug(self, live: LiveInstance, *, release: bool) -> None:
        """The VMM is gone: remove its TAP. ``release`` (stop, exit, delete) also forgets the
        address's connections; a standby keeps them, so they survive its restore. Never raises:
        what it could not remove, the next start's reconcile does."""
        if self.host is None or live.record.ip is None:
            return
        if not release:
            # Asleep from now on: connections to its address are reset at once (the ingress
            # retries them while it wakes the VM) rather than left to wait for ARP to give up.
            await self._set_sleeping(live.id, IPv4Address(live.record.ip), True)
        try:
            await self.host.delete_tap(live.id)
            if release:
                await self.host.forget_connections(IPv4Address(live.record.ip))
        except Exception as exc:
            log.warning("instance %s: could not remove its TAP: %s", live.id, exc)
        if release:
            await self._set_sleeping(live.id, IPv4Address(live.record.ip), False)

    async def _set_sleeping(self, instance_id: str, ip: IPv4Address, asleep: bool) -> None:
        """Never raises: what it could not change, the next start's reconcile does."""
        if self.host is None:
            return
        try:
            await self.host.set_sleeping(ip, asleep)
        except Exception as exc:
            log.warning("instance %s: could not mark its address %s %s: %s", instance_id, ip,
                        "asleep" if asleep else "awake", exc)

    async def open_tap(self, vm_id: str) -> int:
        """For the hypervisor: a descriptor of the VM's TAP, opened in the network's namespace.
        From now on frames for the VM wait in the TAP until its VMM reads them, so connections to
        its address are let through again: a restored guest finds the SYNs that wait for it as
        soon as it runs (a restore's address was refused while asleep; any other's is cleared of
        an entry left stale). A launch that fails puts a restore's back (``unplug``)."""
        if self.host is None:
            raise DomainError("no bridge network: a TAP NIC cannot be opened")
        fd = await self.host.open_tap(vm_id)
        plugging = self._in_flight.get(vm_id)  # every launch with a TAP is plugged in flight
        if plugging is not None:
            await self._set_sleeping(vm_id, plugging.ip, False)
        return fd


def _lacks_privileges(exc: BaseException | None) -> bool:
    if isinstance(exc, NamespaceError):
        return _lacks_privileges(exc.__cause__)
    if isinstance(exc, NetlinkError):
        return exc.code in (errno.EPERM, errno.EACCES)
    return isinstance(exc, OSError) and exc.errno in (errno.EPERM, errno.EACCES)
