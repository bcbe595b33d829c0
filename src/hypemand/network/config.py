"""What a server's network is: subnet, bridge, namespace, uplink, DNS, and the names derived
from them. Everything here is pure (no kernel calls), so every refusal is unit-tested.

The checks that need the kernel's view (an address already on an interface, the uplink that
exists) take that view as plain values: :func:`find_subnet_conflicts`, :func:`choose_uplink`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

DEFAULT_SUBNET = "10.100.0.0/16"
DEFAULT_BRIDGE = "vmbr0"
DEFAULT_DNS = "1.1.1.1"

# The reference's multipliers (§5.4): the download bucket holds multiplier x rate / 250 bytes
# (4 ms of traffic per unit), and an upload class may borrow up to multiplier x its rate.
DOWNLOAD_BURST_MULTIPLIER = 4
UPLOAD_BURST_MULTIPLIER = 4

TAP_PREFIX = "hype-"
TAP_ID_CHARS = 8
IFNAMSIZ = 15  # usable characters of a Linux interface name
# The upload shaper's IFB is named after the bridge; its suffix must still fit IFNAMSIZ.
IFB_SUFFIX = "-up"
# Class minors and filter priorities are the VM address's offset in the subnet (16 bits), so
# the subnet may hold at most 2^16 addresses.
WIDEST_PREFIX = 16
NARROWEST_PREFIX = 30  # network, gateway, one VM, broadcast

_IFNAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")
_NETNS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")
_VM_ID = re.compile(rf"^[a-z0-9]{{{TAP_ID_CHARS},}}$")


class NetworkConfigError(ValueError):
    """A network setting that cannot work; the message says which and why, in one line."""


@dataclass(frozen=True)
class NetworkConfig:
    """A validated network configuration: build it with :meth:`parse`."""

    subnet: IPv4Network
    bridge: str
    namespace: str | None
    uplink: str | None
    dns: IPv4Address
    download_burst_multiplier: int = DOWNLOAD_BURST_MULTIPLIER
    upload_burst_multiplier: int = UPLOAD_BURST_MULTIPLIER

    @classmethod
    def parse(cls, subnet: str = DEFAULT_SUBNET, bridge: str = DEFAULT_BRIDGE,
              namespace: str | None = None, uplink: str | None = None,
              dns: str = DEFAULT_DNS) -> NetworkConfig:
        """Check every setting on its own; raises :class:`NetworkConfigError`."""
        return cls(subnet=parse_subnet(subnet), bridge=_bridge_name(bridge),
                   namespace=_namespace_name(namespace), uplink=_optional_ifname(uplink, "uplink"),
                   dns=_address(dns, "DNS server"))

    @property
    def gateway(self) -> IPv4Address:
        """The first address of the subnet, held by the bridge."""
        return self.subnet.network_address + 1

    @property
    def gateway_interface(self) -> IPv4Interface:
        return IPv4Interface(f"{self.gateway}/{self.subnet.prefixlen}")

    @property
    def ifb(self) -> str:
        """The IFB device where every VM's upload is shaped."""
        return self.bridge + IFB_SUFFIX

    @property
    def nft_table(self) -> str:
        """hypemand's own nftables table (family inet) for this bridge."""
        return "hypemand_" + re.sub(r"[^A-Za-z0-9_]", "_", self.bridge)

    def where(self) -> str:
        """'namespace NAME' or 'the host namespace', for messages."""
        return f"namespace {self.namespace}" if self.namespace else "the host namespace"


def parse_subnet(text: str) -> IPv4Network:
    """An IPv4 network given with its prefix, host bits zero, between /16 and /30."""
    try:
        subnet = IPv4Network(text, strict=True)
    except ValueError as err:
        raise NetworkConfigError(f"subnet {text!r} is not an IPv4 network like 10.100.0.0/16: {err}") \
            from None
    if "/" not in text:
        raise NetworkConfigError(f"subnet {text!r} needs a prefix length, like 10.100.0.0/16")
    if not WIDEST_PREFIX <= subnet.prefixlen <= NARROWEST_PREFIX:
        raise NetworkConfigError(
            f"subnet {subnet} must be between /{WIDEST_PREFIX} and /{NARROWEST_PREFIX} "
            f"(at most 65534 VM addresses, at least one)")
    if not subnet.is_private or subnet.is_loopback or subnet.is_link_local or subnet.is_multicast:
        raise NetworkConfigError(
            f"subnet {subnet} must be a private range (10/8, 172.16/12, 192.168/16, 100.64/10)")
    return subnet


def _address(text: str, what: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError:
        raise NetworkConfigError(f"{what} {text!r} is not an IPv4 address") from None


def check_ifname(name: str, what: str) -> str:
    if not name or len(name) > IFNAMSIZ or not _IFNAME.match(name) or name in (".", ".."):
        raise NetworkConfigError(
            f"{what} {name!r} is not a valid interface name (1-{IFNAMSIZ} of A-Z a-z 0-9 _ . -)")
    return name


def _bridge_name(name: str) -> str:
    check_ifname(name, "bridge")
    if len(name) + len(IFB_SUFFIX) > IFNAMSIZ:
        raise NetworkConfigError(
            f"bridge {name!r} is too long: at most {IFNAMSIZ - len(IFB_SUFFIX)} characters "
            f"(its upload device is named {name + IFB_SUFFIX!r})")
    if name.startswith(TAP_PREFIX):
        raise NetworkConfigError(f"bridge {name!r} must not start with {TAP_PREFIX!r}, the TAPs' prefix")
    return name


def _optional_ifname(name: str | None, what: str) -> str | None:
    return None if name is None or name == "" else check_ifname(name, what)


def _namespace_name(name: str | None) -> str | None:
    if name is None or name == "":
        return None
    if not _NETNS_NAME.match(name):
        raise NetworkConfigError(
            f"network namespace {name!r} is not a valid name (A-Z a-z 0-9 _ . -, at most 63)")
    return name


# ---- names derived from VM ids -------------------------------------------------------------------


def tap_name(vm_id: str) -> str:
    """``hype-`` and the first 8 characters of the id, as the reference names them: found
    again from the id alone after a server restart."""
    if not _VM_ID.match(vm_id):
        raise ValueError(f"VM id {vm_id!r} must be at least {TAP_ID_CHARS} of a-z 0-9")
    return TAP_PREFIX + vm_id[:TAP_ID_CHARS]


def is_tap_name(name: str) -> bool:
    rest = name[len(TAP_PREFIX):]
    return name.startswith(TAP_PREFIX) and len(rest) == TAP_ID_CHARS and bool(_VM_ID.match(rest))


def address_offset(subnet: IPv4Network, ip: IPv4Address) -> int:
    """The VM address's place in the subnet: its upload class minor and filter priority."""
    if ip not in subnet:
        raise ValueError(f"{ip} is not in {subnet}")
    return int(ip) - int(subnet.network_address)


# ---- checks against what the kernel shows --------------------------------------------------------


@dataclass(frozen=True)
class InterfaceAddress:
    interface: str
    address: IPv4Interface


@dataclass(frozen=True)
class InterfaceRoute:
    interface: str
    destination: IPv4Network


def find_subnet_conflicts(config: NetworkConfig, addresses: Iterable[InterfaceAddress],
                          routes: Iterable[InterfaceRoute] = ()) -> list[str]:
    """Why the subnet cannot be used here: every address or route of another interface that
    overlaps it (our own bridge holding exactly the gateway is not a conflict; holding
    anything else is). Empty when the subnet is free."""
    problems: list[str] = []
    for item in addresses:
        if item.interface == config.bridge:
            if item.address != config.gateway_interface:
                problems.append(f"bridge {config.bridge} already holds {item.address}, not "
                                f"{config.gateway_interface}")
        elif item.address.network.overlaps(config.subnet):
            problems.append(f"{item.interface} holds {item.address}, inside or around {config.subnet}")
    for route in routes:
        if route.interface != config.bridge and route.destination.prefixlen > 0 \
                and route.destination.overlaps(config.subnet):
            problems.append(f"a route to {route.destination} goes out {route.interface}")
    return problems


def choose_uplink(config: NetworkConfig, interfaces: Iterable[str],
                  default_route_interfaces: Iterable[str]) -> str | None:
    """The configured uplink if it exists, else the interface of the default route, else None:
    a namespace with no way out (one the server just made) still gets its bridge, and VMs
    reach the gateway (the ingress proxy) but nothing beyond, until a default route exists
    at the next start."""
    existing = set(interfaces)
    if config.uplink is not None:
        if config.uplink not in existing:
            raise NetworkConfigError(f"uplink {config.uplink!r} does not exist in {config.where()} "
                                     f"(interfaces: {', '.join(sorted(existing)) or 'none'})")
        if config.uplink == config.bridge or is_tap_name(config.uplink) or config.uplink == config.ifb:
            raise NetworkConfigError(f"uplink {config.uplink!r} is one of hypemand's own devices")
        return config.uplink
    candidates = [name for name in default_route_interfaces if name != config.bridge]
    return candidates[0] if candidates else None

