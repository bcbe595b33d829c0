"""The host side of the VM network: one bridge, one TAP per VM, NAT, shaping, reconciled.

:class:`NetworkHost` keeps nothing of its own: every answer is read from the kernel of its
namespace, every change is idempotent, and a new ``NetworkHost`` on a namespace set up by an
earlier server (killed, restarted) adopts what it finds. All kernel work runs in one thread
that lives in the namespace (:class:`~hypemand.network.namespace.NamespaceWorker`); the async
methods await it, so they never block the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from socket import AF_INET
from typing import ParamSpec, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from hypemand.network import firewall, shaping, tap
from hypemand.network.config import (
    InterfaceAddress,
    InterfaceRoute,
    NetworkConfig,
    NetworkConfigError,
    address_offset,
    choose_uplink,
    find_subnet_conflicts,
    is_tap_name,
    tap_name,
)
from hypemand.network.namespace import NamespaceWorker, ensure_namespace
from hypemand.network.shaping import BandwidthLimits

log = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_UPLOAD_CAPACITY = 10_000_000_000 // 8  # 10 Gbit/s, when the uplink does not say
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"


@dataclass(frozen=True)
class ReconcileReport:
    removed_taps: tuple[str, ...]
    removed_upload_classes: tuple[int, ...]
    rules_rewritten: bool


class NetworkHost:
    """Bridge, TAPs, rules and shapers of one server, in ``config.namespace`` (or the
    server's own namespace for None)."""

    def __init__(self, config: NetworkConfig, upload_capacity: int | None = None) -> None:
        """``upload_capacity``: bytes per second shared by every VM's upload (the HTB root);
        None reads the uplink's link speed, else 10 Gbit/s."""
        self.config = config
        self._upload_capacity = upload_capacity
        self._worker: NamespaceWorker | None = None
        # Makes sockets for the server's own connections to VMs (health probes): a thread of its
        # own, so a probe never waits behind a slow change of devices or rules.
        self._sockets: NamespaceWorker | None = None
        self.uplink: str | None = None
        self.capacity: int = upload_capacity or DEFAULT_UPLOAD_CAPACITY

    # ---- start and reconcile -------------------------------------------------------------------

    async def start(self, expected_vm_ids: set[str] | None = None,
                    sleeping: set[IPv4Address] | None = None) -> ReconcileReport:
        """Create the namespace if missing, then :meth:`reconcile`. Raises
        :class:`NetworkConfigError` for a subnet in use or an uplink that does not exist."""
        if self._worker is None:
            if self.config.namespace is not None:
                await asyncio.to_thread(ensure_namespace, self.config.namespace)
            self._worker = NamespaceWorker(self.config.namespace)
            self._sockets = NamespaceWorker(self.config.namespace, label="sockets")
        return await self.reconcile(expected_vm_ids, sleeping)

    async def reconcile(self, expected_vm_ids: set[str] | None = None,
                        sleeping: set[IPv4Address] | None = None) -> ReconcileReport:
        """Bring the namespace to what it must be: bridge, forwarding, rules, the upload root;
        when ``expected_vm_ids`` is given, delete the TAPs of every other VM and upload classes
        no TAP uses; when ``sleeping`` is given, make it the set of addresses of VMs in standby
        (see :meth:`set_sleeping`). Idempotent: a second call changes nothing."""
        return await self._run(self._reconcile_sync, expected_vm_ids, sleeping)

    def _reconcile_sync(self, expected_vm_ids: set[str] | None,
                        sleeping: set[IPv4Address] | None = None) -> ReconcileReport:
        config = self.config
        with IPRoute() as ipr:
            names = {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
            addresses = [InterfaceAddress(names.get(int(a["index"]), "?"),
                                          IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"))
                         for a in ipr.get_addr(family=2)]
            routes, default_ifaces = self._routes(ipr, names)
            problems = find_subnet_conflicts(config, addresses, routes)
            if problems:
                raise NetworkConfigError(f"subnet {config.subnet} cannot be used in {config.where()}: "
                                         + "; ".join(problems))
            uplink = choose_uplink(config, names.values(), default_ifaces)
            if uplink is not None:
                self._ensure_forwarding()
            tap.ensure_bridge(ipr, config.bridge, str(config.gateway),
                                             config.subnet.prefixlen)
            if self._upload_capacity is None:
                self.capacity = (_link_speed(uplink) if uplink else None) or DEFAULT_UPLOAD_CAPACITY
            ifb_index = shaping.ensure_upload_root(ipr, config.ifb, self.capacity)
            removed: list[str] = []
            stray_classes: list[int] = []
            if expected_vm_ids is not None:
                keep = {tap_name(vm_id) for vm_id in expected_vm_ids}
                for name in sorted(n for n in names.values() if is_tap_name(n) and n not in keep):
                    self._delete_tap(ipr, name, ifb_index)
                    removed.append(name)
                used = {shaping.tap_upload_offset(ipr, index)
                        for index, name in names.items() if is_tap_name(name) and name in keep}
                for offset in sorted(shaping.upload_class_offsets(ipr, ifb_index) - used):
                    shaping.release_upload(ipr, ifb_index, offset)
                    stray_classes.append(offset)
        rewritten = firewall.ensure_rules(config, uplink, sleeping)
        if uplink is None and self.uplink is None:
            log.warning("network %s: %s has no default route and no uplink is named: VMs reach "
                        "the gateway but nothing beyond it", config.bridge, config.where())
        self.uplink = uplink
        if removed or stray_classes or rewritten:
            log.info("network %s reconciled: removed TAPs %s, upload classes %s, rules %s",
                     config.bridge, removed or "none", stray_classes or "none",
                     "rewritten" if rewritten else "unchanged")
        return ReconcileReport(tuple(removed), tuple(stray_classes), rewritten)

    def _routes(self, ipr: IPRoute, names: dict[int, str]) -> tuple[list[InterfaceRoute], list[str]]:
        routes: list[InterfaceRoute] = []
        default_ifaces: list[str] = []
        for route in ipr.get_routes(family=2, table=254):
            oif = route.get_attr("RTA_OIF")
            if oif is None:
                continue
            iface = names.get(int(oif), "?")
            if route["dst_len"] == 0:
                default_ifaces.append(iface)
            else:
                destination = IPv4Network(f"{route.get_attr('RTA_DST')}/{route['dst_len']}", strict=False)
                routes.append(InterfaceRoute(iface, destination))
        return routes, default_ifaces

    def _ensure_forwarding(self) -> None:
        """IPv4 forwarding is per namespace: hypemand turns it on in its own namespace; in the
        host's it only checks, as the reference does, since it is the host's policy."""
        with open(IP_FORWARD) as current:
            if current.read().strip() == "1":
                return
        if self.config.namespace is None:
            raise NetworkConfigError("IPv4 forwarding is off in the host namespace: "
                                     "sysctl -w net.ipv4.ip_forward=1")
        with open(IP_FORWARD, "w") as setting:
            setting.write("1")

    # ---- TAPs ----------------------------------------------------------------------------------

    async def create_tap(self, vm_id: str, ip: IPv4Address | None = None,
                         limits: BandwidthLimits | None = None) -> str:
        """The VM's TAP on the bridge (made, or adopted when it exists), with its limits.
        ``ip`` (the VM's address) is needed only for an upload limit. Returns the TAP's name."""
        return await self._run(self._create_tap_sync, vm_id, ip, limits or BandwidthLimits())

    def _create_tap_sync(self, vm_id: str, ip: IPv4Address | None, limits: BandwidthLimits) -> str:
        name = tap_name(vm_id)
        with IPRoute() as ipr:
            bridge_index = tap.link_index(ipr, self.config.bridge)
            if bridge_index is None:
                raise tap.TapError(f"bridge {self.config.bridge} is missing: reconcile first")
            index, created = tap.ensure_tap(ipr, name, bridge_index)
            try:
                self._apply_limits(ipr, index, ip, limits)
            except Exception:
                if created:
                    self._delete_tap(ipr, name, self._ifb_index(ipr))
                raise
        return name

    async def set_limits(self, vm_id: str, ip: IPv4Address | None, limits: BandwidthLimits) -> None:
        """Change (or, with None rates, lift) the limits of an existing TAP."""
        def change() -> None:
            with IPRoute() as ipr:
                index = tap.link_index(ipr, tap_name(vm_id))
                if index is None:
                    raise tap.TapError(f"TAP {tap_name(vm_id)} does not exist")
                self._apply_limits(ipr, index, ip, limits)
        await self._run(change)

    def _apply_limits(self, ipr: IPRoute, index: int, ip: IPv4Address | None,
                      limits: BandwidthLimits) -> None:
        config = self.config
        shaping.set_download(ipr, index, limits.download, config.download_burst_multiplier)
        if limits.upload is not None and ip is None:
            raise ValueError("an upload limit needs the VM's address")
        offset = address_offset(config.subnet, ip) if ip is not None else 0
        if ip is not None and ip in (config.gateway, config.subnet.network_address,
                                     config.subnet.broadcast_address):
            raise ValueError(f"{ip} is not a VM address of {config.subnet}")
        shaping.set_upload(ipr, index, self._ifb_index(ipr), offset, ip or config.gateway,
                           limits.upload, config.upload_burst_multiplier, self.capacity)

    def _ifb_index(self, ipr: IPRoute) -> int:
        index = tap.link_index(ipr, self.config.ifb)
        if index is None:
            raise tap.TapError(f"upload device {self.config.ifb} is missing: reconcile first")
        return index

    async def delete_tap(self, vm_id: str) -> bool:
        """Remove the VM's TAP and its upload class. True when the TAP existed."""
        def delete() -> bool:
            with IPRoute() as ipr:
                return self._delete_tap(ipr, tap_name(vm_id), tap.link_index(ipr, self.config.ifb))
        return await self._run(delete)

    def _delete_tap(self, ipr: IPRoute, name: str, ifb_index: int | None) -> bool:
        index = tap.link_index(ipr, name)
        if index is None:
            return False
        offset = shaping.tap_upload_offset(ipr, index)
        if offset is not None and ifb_index is not None:
            shaping.release_upload(ipr, ifb_index, offset)
        return tap.delete_link(ipr, name)

    async def set_sleeping(self, ip: IPv4Address, asleep: bool) -> None:
        """Whether the VM at ``ip`` is in standby (no TAP, its address kept): while it is, TCP
        from this namespace to it is reset at once instead of waiting for ARP to give up, so
        the ingress proxy's dial fails fast and is retried while the VM is woken."""
        await self._run(firewall.set_sleeping, self.config, ip, asleep)

    async def forget_connections(self, ip: IPv4Address) -> int:
        """Drop the conntrack entries of a released address (connections from or to it), so
        replies of its old NATed connections cannot reach the next VM given that address.
        For stop and delete, never for standby: a restored VM keeps its connections."""
        def forget() -> int:
            from pyroute2 import Conntrack
            from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

            dropped = 0
            with Conntrack() as conntrack:
                for side in ({"saddr": str(ip)}, {"daddr": str(ip)}):
                    match = NFCTAttrTuple(family=AF_INET, **side)
                    for entry in list(conntrack.dump_entries(tuple_orig=match)):
                        with contextlib.suppress(NetlinkError):  # gone meanwhile
                            conntrack.delete(entry)
                            dropped += 1
            return dropped
        return await self._run(forget)

    async def open_tap(self, vm_id: str, vnet_hdr: bool = True) -> int:
        """An fd on the VM's TAP for QEMU's ``-netdev tap,fd=N,vhost=off`` (the caller closes
        its copy once QEMU has it). One fd at a time: a second open while QEMU holds the TAP
        fails with :class:`~hypemand.network.tap.TapError`."""
        def open_fd() -> int:
            with IPRoute() as ipr:
                return tap.open_tap_fd(ipr, tap_name(vm_id), vnet_hdr)
        return await self._run(open_fd)

    async def list_taps(self) -> dict[str, int | None]:
        """Every TAP named like hypemand's, with the address offset of its upload class."""
        def listing() -> dict[str, int | None]:
            with IPRoute() as ipr:
                return {str(link.get_attr("IFLA_IFNAME")): shaping.tap_upload_offset(ipr, int(link["index"]))
                        for link in ipr.get_links() if is_tap_name(str(link.get_attr("IFLA_IFNAME")))}
        return await self._run(listing)

    # ---- the server's own connections to VMs ----------------------------------------------------

    async def connect_socket(self) -> socket.socket:
        """A non-blocking TCP socket made in the network's namespace, for the event loop to
        connect to a VM's address (``loop.sock_connect``, ``asyncio.open_connection(sock=)``):
        a socket belongs to the namespace it was made in, whichever thread uses it later.
        The caller closes it."""
        if self._sockets is None:
            raise RuntimeError("NetworkHost.start() first")
        made = await self._sockets.run(_server_socket)
        made.setblocking(False)
        return made

    # ---- teardown ------------------------------------------------------------------------------

    async def remove_everything(self) -> None:
        """Delete every TAP, the IFB, the bridge and the rules (not the namespace)."""
        def remove() -> None:
            with IPRoute() as ipr:
                for link in ipr.get_links():
                    name = str(link.get_attr("IFLA_IFNAME"))
                    if is_tap_name(name):
                        tap.delete_link(ipr, name)
                tap.delete_link(ipr, self.config.ifb)
                tap.delete_link(ipr, self.config.bridge)
            firewall.remove_rules(self.config)
        await self._run(remove)

    def close(self) -> None:
        """Stop the namespace thread; the network stays as it is (VMs keep running)."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self._sockets is not None:
            self._sockets.close()
            self._sockets = None

    async def _run(self, function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        if self._worker is None:
            raise RuntimeError("NetworkHost.start() first")
        return await self._worker.run(function, *args, **kwargs)


def _link_speed(ifname: str) -> int | None:
    """The interface's speed in bytes per second, from ethtool, if it reports one."""
    try:
        from pyroute2.ethtool.ioctl import IoctlEthtool

        ethtool = IoctlEthtool(ifname)
        try:
            mbps = int(ethtool.get_cmd().speed)
        finally:
            ethtool.close()
    except Exception:  # no ethtool support on this device: fall back to the default
        return None
    if mbps <= 0 or mbps >= 0xFFFF:  # unknown speed
        return None
    return mbps * 1_000_000 // 8


def _server_socket() -> socket.socket:
    """A TCP socket marked as the server's own (``firewall.SERVER_CONNECTION_MARK``): its flows
    are not a client's activity."""
    made = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        made.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, firewall.SERVER_CONNECTION_MARK)
    except BaseException:
        made.close()
        raise
    return made
