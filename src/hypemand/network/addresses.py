"""Pick an IP and a MAC for a VM from what is really in use, with no allocation file.

The caller passes the claims of every VM that holds an identity (running VMs from their live
configuration, saved VMs from their saved configuration); :func:`allocate` returns a pair that
collides with none of them. Nothing is remembered here, so nothing can go stale: the claims
are the truth, read again for every allocation.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

# Locally administered, unicast (0x02 in the first octet), with the reference's fixed prefix.
MAC_PREFIX = "02:00:00"
MAC_SPACE = 1 << 24
RANDOM_IP_TRIES = 5
RANDOM_MAC_TRIES = 16


class AddressesExhausted(RuntimeError):
    """Every usable address of the subnet (or every MAC of the scheme) is claimed."""


@dataclass(frozen=True)
class Allocation:
    ip: IPv4Address
    mac: str


def normalize_mac(mac: str) -> str:
    """Lower-case colon form; raises ValueError for anything that is not six octets."""
    parts = mac.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{mac!r} is not a MAC address")
    try:
        octets = [int(p, 16) for p in parts]
    except ValueError:
        raise ValueError(f"{mac!r} is not a MAC address") from None
    return ":".join(f"{o:02x}" for o in octets)


def mac_from_index(index: int) -> str:
    """The index-th MAC of the scheme, 02:00:00:00:00:00 .. 02:00:00:ff:ff:ff."""
    if not 0 <= index < MAC_SPACE:
        raise ValueError(f"MAC index {index} is outside 0..{MAC_SPACE - 1}")
    return f"{MAC_PREFIX}:{index >> 16:02x}:{(index >> 8) & 0xFF:02x}:{index & 0xFF:02x}"


def usable_range(subnet: IPv4Network) -> tuple[int, int]:
    """First and last address a VM may get, as integers: after the network address and the
    gateway (the first address), before the broadcast address."""
    first = int(subnet.network_address) + 2
    last = int(subnet.broadcast_address) - 1
    return first, last


def allocate(subnet: IPv4Network, claimed: Iterable[tuple[IPv4Address | str | None, str | None]],
             rng: random.Random | None = None) -> Allocation:
    """An (ip, mac) pair that no claim holds.

    Claims are (ip, mac) pairs, either part may be None (a VM whose MAC is not known yet still
    holds its IP). The IP is a random pick in the usable range, a few tries, then a scan from a
    random start so that a nearly full subnet is still found to have room. The MAC is chosen
    the same way from the 2^24 addresses of the scheme. Raises :class:`AddressesExhausted`.
    """
    rng = rng or random.SystemRandom()
    taken_ips: set[int] = set()
    taken_macs: set[str] = set()
    for ip, mac in claimed:
        if ip is not None:
            taken_ips.add(int(IPv4Address(ip)))
        if mac is not None:
            taken_macs.add(normalize_mac(mac))
    first, last = usable_range(subnet)
    ip_int = _pick(first, last, lambda n: n not in taken_ips, RANDOM_IP_TRIES, rng)
    if ip_int is None:
        raise AddressesExhausted(f"every address of {subnet} is in use "
                                 f"({last - first + 1} usable, gateway {subnet.network_address + 1})")
    mac_index = _pick(0, MAC_SPACE - 1, lambda n: mac_from_index(n) not in taken_macs,
                      RANDOM_MAC_TRIES, rng)
    if mac_index is None:
        raise AddressesExhausted(f"every MAC address {MAC_PREFIX}:xx:xx:xx is in use")
    return Allocation(IPv4Address(ip_int), mac_from_index(mac_index))


def _pick(first: int, last: int, free: Callable[[int], bool], tries: int, rng: random.Random) -> int | None:
    if last < first:
        return None
    for _ in range(tries):
        candidate = rng.randint(first, last)
        if free(candidate):
            return candidate
    size = last - first + 1
    start = rng.randrange(size)
    for step in range(size):
        candidate = first + (start + step) % size
        if free(candidate):
            return candidate
    return None



@dataclass(frozen=True)
class InstanceAddress:
    """Where an instance is on the VM network now: what the ingress's resolver answers for its
    name. ``ip`` is None while the instance holds no address (stopped, or no NIC). ``asleep``:
    in standby, its address kept but no VMM behind it (the ingress wakes it on a request)."""

    id: str
    name: str
    ip: str | None
    asleep: bool = False
