"""The allocator: never a claimed IP or MAC, never the network, gateway or broadcast address."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from hypemand.network.addresses import (
    MAC_SPACE,
    AddressesExhausted,
    allocate,
    mac_from_index,
    normalize_mac,
    usable_range,
)


@pytest.mark.parametrize("prefix", [30, 29, 28, 24])
def test_filling_a_subnet_hands_out_every_usable_address_once_then_refuses(prefix: int) -> None:
    subnet = IPv4Network(f"10.9.0.0/{prefix}")
    rng = random.Random(prefix)
    claims: set[tuple[IPv4Address, str]] = set()
    for _ in range(subnet.num_addresses - 3):
        got = allocate(subnet, claims, rng)
        assert got.ip not in {ip for ip, _ in claims} and got.mac not in {mac for _, mac in claims}
        claims.add((got.ip, got.mac))
    assert {ip for ip, _ in claims} == set(subnet.hosts()) - {subnet.network_address + 1}
    with pytest.raises(AddressesExhausted, match="every address"):
        allocate(subnet, claims, rng)


def test_the_last_free_address_is_found_whatever_the_random_picks() -> None:
    subnet = IPv4Network("10.9.0.0/24")
    first, last = usable_range(subnet)
    for free in (first, last, (first + last) // 2):
        claims = [(IPv4Address(n), None) for n in range(first, last + 1) if n != free]
        for seed in range(20):
            assert allocate(subnet, claims, random.Random(seed)).ip == IPv4Address(free)


def test_a_released_address_can_be_handed_out_again() -> None:
    subnet = IPv4Network("10.9.0.0/30")
    only = allocate(subnet, []).ip
    assert only == IPv4Address("10.9.0.2")
    with pytest.raises(AddressesExhausted):
        allocate(subnet, [(only, "02:00:00:00:00:01")])
    assert allocate(subnet, []).ip == only  # its owner is gone: no claim, free again


def test_claimed_macs_are_avoided_even_when_the_random_picks_collide() -> None:
    class Stuck(random.Random):  # every random pick lands on the same claimed MAC
        def randint(self, a: int, b: int) -> int:
            return a + 7 if b >= MAC_SPACE - 1 else a

    claimed_mac = mac_from_index(7)
    got = allocate(IPv4Network("10.9.0.0/24"), [(None, claimed_mac.upper())], Stuck())
    assert got.mac != claimed_mac and got.mac.startswith("02:00:00:")


def test_claims_in_other_forms_count() -> None:
    subnet = IPv4Network("10.9.0.0/30")
    with pytest.raises(AddressesExhausted):
        allocate(subnet, [("10.9.0.2", "02-00-00-00-00-09")])


def test_macs_are_locally_administered_unicast() -> None:
    rng = random.Random(1)
    for _ in range(200):
        mac = allocate(IPv4Network("10.9.0.0/16"), [], rng).mac
        first = int(mac.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01 and normalize_mac(mac) == mac


def test_mac_forms() -> None:
    assert mac_from_index(0) == "02:00:00:00:00:00"
    assert mac_from_index(MAC_SPACE - 1) == "02:00:00:ff:ff:ff"
    with pytest.raises(ValueError):
        mac_from_index(MAC_SPACE)
    for bad in ("02:00:00:00:00", "zz:00:00:00:00:00", "0200.0000.0000"):
        with pytest.raises(ValueError):
            normalize_mac(bad)
