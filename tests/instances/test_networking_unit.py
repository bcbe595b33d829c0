"""The pure parts of an instance's place on the network: who holds which address (derived from
the instances, never stored), reservations that keep two concurrent boots apart, the previous
pair taken again when free, bandwidth requests and rates. The kernel side is
tests/network/test_host_netns.py's; real VMs on the bridge are tests/api/test_network_vm.py's."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest

from hypemand.errors import BadRequest, Conflict
from hypemand.hypervisor.base import VMHandle
from hypemand.instances.live import InstanceTable, LiveInstance
from hypemand.instances.models import NetworkRequest
from hypemand.instances.networking import Networking, holds_address
from hypemand.layout import InstancePaths
from hypemand.network import NetworkConfig
from hypemand.units import UnitError, format_rate, parse_rate
from tests.instances.test_manager_parts_unit import record

SMALL = NetworkConfig.parse(subnet="10.9.0.0/29")  # 5 usable addresses: .2 .. .6


def live(tmp_path: Path, instance_id: str, *, running: bool = False, phase: str = "stopped",
         ip: str | None = None, mac: str = "02:00:00:00:00:01") -> LiveInstance:
    item = LiveInstance(record=record(id=instance_id, name=instance_id, ip=ip, mac=mac, phase=phase),
                        paths=InstancePaths(tmp_path / instance_id))
    if running:
        item.handle = cast(VMHandle, object())  # only its presence matters here
    return item


def networking(*lives: LiveInstance) -> Networking:
    table = InstanceTable()
    for item in lives:
        table.add(item)
    # No NetworkHost: reservations and claims need only the configuration and the table.
    return Networking(table, SMALL, None)


def test_an_address_is_held_while_the_vm_runs_or_waits_in_standby(tmp_path: Path) -> None:
    assert holds_address(live(tmp_path, "a", running=True, ip="10.9.0.2"))
    assert holds_address(live(tmp_path, "b", phase="standby", ip="10.9.0.3"))
    assert not holds_address(live(tmp_path, "c", phase="stopped", ip="10.9.0.4"))
    assert not holds_address(live(tmp_path, "d", running=True, ip=None))  # user-mode NIC


def test_reservations_never_hand_out_a_held_or_reserved_pair(tmp_path: Path) -> None:
    net = networking(live(tmp_path, "run", running=True, ip="10.9.0.2", mac="02:00:00:00:00:02"),
                     live(tmp_path, "sby", phase="standby", ip="10.9.0.3", mac="02:00:00:00:00:03"),
                     live(tmp_path, "off", ip="10.9.0.4", mac="02:00:00:00:00:04"))
    first, second = net.reserve("new1"), net.reserve("new2")
    chosen = {str(first.ip), str(second.ip)}
    assert len(chosen) == 2 and not chosen & {"10.9.0.2", "10.9.0.3"}
    assert first.mac != second.mac and {first.mac, second.mac}.isdisjoint({"02:00:00:00:00:02",
                                                                         "02:00:00:00:00:03"})
    # A stopped VM holds nothing: with .2/.3 held and two reserved, .4 is among what is left.
    third = net.reserve("new3")
    assert str(third.ip) not in chosen | {"10.9.0.2", "10.9.0.3"}
    # Two held and three reserved: the subnet is full until a reservation settles.
    with pytest.raises(Conflict, match="no free address"):
        net.reserve("new4")
    net.settle("new1")
    assert net.reserve("new4").ip == first.ip


def test_a_full_subnet_is_a_conflict_and_a_settled_reservation_frees_its_pair(tmp_path: Path) -> None:
    net = networking()
    taken = [net.reserve(f"vm{n}") for n in range(5)]
    assert len({a.ip for a in taken}) == 5
    with pytest.raises(Conflict, match="no free address"):
        net.reserve("vm5")
    net.settle("vm2")
    assert net.reserve("vm5").ip == taken[2].ip


def test_a_start_takes_its_previous_pair_again_when_it_is_free(tmp_path: Path) -> None:
    before = live(tmp_path, "again", ip="10.9.0.5", mac="02:00:00:00:00:05")
    net = networking(before)
    again = net.reserve("again", prefer=before.record)
    assert (str(again.ip), again.mac) == ("10.9.0.5", "02:00:00:00:00:05")
    net.settle("again")
    # Taken by another meanwhile: a different pair.
    other = live(tmp_path, "other", running=True, ip="10.9.0.5", mac="02:00:00:00:00:09")
    net = networking(before, other)
    moved = net.reserve("again", prefer=before.record)
    assert str(moved.ip) != "10.9.0.5" and moved.mac != "02:00:00:00:00:05"


def test_find_address_answers_only_what_is_held(tmp_path: Path) -> None:
    net = networking(live(tmp_path, "web", running=True, ip="10.9.0.2"), live(tmp_path, "db", ip="10.9.0.3"))
    found = net.find_address("web")
    assert found is not None and found.ip == "10.9.0.2"
    stopped = net.find_address("db")
    assert stopped is not None and stopped.ip is None
    assert net.find_address("nobody") is None


def test_bandwidth_requests_are_parsed_and_refused_with_the_field_named() -> None:
    user_mode = Networking(InstanceTable(), None, None, "no privileges")
    assert user_mode.bandwidth(None, 1, 2) == (None, None)
    with pytest.raises(BadRequest, match="bridge network"):
        user_mode.bandwidth(NetworkRequest(bandwidth_download="1Gbps"), 1, 2)
    with pytest.raises(BadRequest) as refused:
        user_mode.bandwidth(NetworkRequest(bandwidth_upload="lots"), 1, 2)
    assert refused.value.code == "invalid_bandwidth_upload"


@pytest.mark.parametrize(("text", "rate"), [
    ("1Gbps", 125_000_000), ("100Mbps", 12_500_000), ("125MB/s", 125_000_000), ("8Kbit/s", 1000),
    ("1000", 1000), ("1.5Gbps", 187_500_000),
])
def test_rates_read_bits_and_bytes(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "10M", "0bps", "-1Gbps", "1Pbps", ""])
def test_bad_rates_are_refused(text: str) -> None:
    with pytest.raises(UnitError):
        parse_rate(text)


def test_rates_are_shown_as_the_largest_whole_bit_rate() -> None:
    assert [format_rate(r) for r in (125_000_000, 1_000_000, 125_000, 1000, 3)] == [
        "1Gbps", "8Mbps", "1Mbps", "8Kbps", "24bps"]
