"""Network settings: what is accepted, what is refused and how the refusal reads."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

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
from hypemand.network.firewall import desired_rules, replace_table_commands
from hypemand.network.shaping import BandwidthLimits, download_burst, upload_ceiling


def test_defaults_are_the_references() -> None:
    config = NetworkConfig.parse()
    assert config.subnet == IPv4Network("10.100.0.0/16")
    assert config.gateway == IPv4Address("10.100.0.1")
    assert str(config.gateway_interface) == "10.100.0.1/16"
    assert (config.bridge, config.namespace, config.uplink) == ("vmbr0", None, None)
    assert config.dns == IPv4Address("1.1.1.1")
    assert (config.ifb, config.nft_table) == ("vmbr0-up", "hypemand_vmbr0")


@pytest.mark.parametrize(("subnet", "message"), [
    ("10.100.0.1/16", "not an IPv4 network"),
    ("10.100.0.0", "needs a prefix"),
    ("fd00::/64", "not an IPv4 network"),
    ("10.0.0.0/8", "between /16 and /30"),
    ("10.0.0.0/31", "between /16 and /30"),
    ("8.8.8.0/24", "private range"),
    ("banana", "not an IPv4 network"),
])
def test_bad_subnets_are_refused_with_the_reason(subnet: str, message: str) -> None:
    with pytest.raises(NetworkConfigError, match=message):
        NetworkConfig.parse(subnet=subnet)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("bridge", "", "not a valid interface name"),
    ("bridge", "has space", "not a valid interface name"),
    ("bridge", "a-very-long-br", "too long"),
    ("bridge", "hype-bridge", "TAPs' prefix"),
    ("uplink", "x" * 16, "not a valid interface name"),
    ("namespace", "a/b", "not a valid name"),
    ("dns", "1.1.1", "not an IPv4 address"),
])
def test_bad_names_are_refused(field: str, value: str, message: str) -> None:
    with pytest.raises(NetworkConfigError, match=message):
        NetworkConfig.parse(**{field: value})


def test_subnet_conflicts_name_the_interface() -> None:
    config = NetworkConfig.parse(subnet="10.100.0.0/16")
    ours = InterfaceAddress("vmbr0", IPv4Interface("10.100.0.1/16"))
    elsewhere = InterfaceAddress("eth0", IPv4Interface("192.168.1.5/24"))
    assert find_subnet_conflicts(config, [ours, elsewhere]) == []
    inside = InterfaceAddress("eth1", IPv4Interface("10.100.7.1/24"))
    around = InterfaceAddress("docker0", IPv4Interface("10.0.0.1/8"))
    problems = find_subnet_conflicts(config, [inside, around])
    assert len(problems) == 2 and "eth1 holds 10.100.7.1/24" in problems[0] and "docker0" in problems[1]
    wrong_gateway = InterfaceAddress("vmbr0", IPv4Interface("10.100.0.9/16"))
    assert "bridge vmbr0 already holds 10.100.0.9/16" in find_subnet_conflicts(config, [wrong_gateway])[0]
    route = InterfaceRoute("wg0", IPv4Network("10.100.128.0/17"))
    default = InterfaceRoute("eth0", IPv4Network("0.0.0.0/0"))
    assert find_subnet_conflicts(config, [], [route, default]) == ["a route to 10.100.128.0/17 goes out wg0"]


def test_the_uplink_is_the_configured_one_or_the_default_routes() -> None:
    auto = NetworkConfig.parse(namespace="hm")
    assert choose_uplink(auto, ["lo", "eth0", "vmbr0"], ["eth0"]) == "eth0"
    assert choose_uplink(auto, ["lo"], []) is None  # no way out: a bridge without NAT
    named = NetworkConfig.parse(uplink="eth1")
    assert choose_uplink(named, ["eth0", "eth1"], ["eth0"]) == "eth1"
    with pytest.raises(NetworkConfigError, match="uplink 'eth1' does not exist in the host namespace"):
        choose_uplink(named, ["eth0"], ["eth0"])
    with pytest.raises(NetworkConfigError, match="hypemand's own"):
        choose_uplink(NetworkConfig.parse(uplink="vmbr0"), ["vmbr0"], [])


def test_tap_names_come_from_the_vm_id() -> None:
    assert tap_name("abcdefgh12345678") == "hype-abcdefgh"
    assert is_tap_name("hype-abcdefgh") and not is_tap_name("hype-abc") and not is_tap_name("vmbr0")
    with pytest.raises(ValueError):
        tap_name("short")
    with pytest.raises(ValueError):
        tap_name("../../etc/passwd")


def test_address_offsets() -> None:
    subnet = IPv4Network("10.100.0.0/16")
    assert address_offset(subnet, IPv4Address("10.100.1.2")) == 258
    with pytest.raises(ValueError):
        address_offset(subnet, IPv4Address("10.101.0.2"))


def test_rules_say_what_they_are_for() -> None:
    config = NetworkConfig.parse(subnet="10.100.0.0/16")
    rules = desired_rules(config, "eth0")
    comments = [rule.comment for rule in rules]
    assert len(set(comments)) == len(comments) and all(c.startswith("hypemand vmbr0: ") for c in comments)
    assert any("masquerade 10.100.0.0/16 out eth0" in c for c in comments)
    document = replace_table_commands(config.nft_table, rules)["nftables"]
    assert [next(iter(c)) for c in document[:3]] == ["add", "delete", "add"]  # atomic replace
    assert sum(1 for c in document if "rule" in c.get("add", {})) == len(rules)


def test_bandwidth_numbers() -> None:
    assert download_burst(1_000_000, 4) == 16_000
    assert download_burst(10_000, 4) == 1540
    assert upload_ceiling(1_000, 4, 1_000_000) == 4_000
    assert upload_ceiling(1_000, 4, 2_500) == 2_500
    with pytest.raises(ValueError):
        BandwidthLimits(download=0)
