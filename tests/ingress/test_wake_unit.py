"""Wake on traffic, the pure parts: the waker's single flight and its pause after a failure, the
DNS answers for an instance in standby, the proxy's retries in the Caddy configuration, and the
nft commands of the set of sleeping addresses."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from ipaddress import IPv4Address
from typing import Any

import dns.message
import dns.rcode
import pytest

from hypemand.errors import Conflict
from hypemand.ingress.caddyconfig import INSTANCE_ZONE, CaddyOptions, build_config
from hypemand.ingress.models import Ingress, IngressRule
from hypemand.ingress.resolver import answer
from hypemand.ingress.waker import Waker
from hypemand.network import InstanceAddress, NetworkConfig
from hypemand.network.firewall import (
    SLEEPING,
    desired_rules,
    replace_table_commands,
    sleeping_commands,
    sync_sleeping_commands,
)

ID = "s" * 24


class Restores:
    """A restore that waits for the test to let it finish (or fail)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = asyncio.Event()
        self.error: Exception | None = None
        self.asleep = True

    async def __call__(self, instance_id: str) -> None:
        self.calls.append(instance_id)
        await self.release.wait()
        if self.error is not None:
            raise self.error
        self.asleep = False

    def is_asleep(self, instance_id: str) -> bool:
        return self.asleep


class Door:
    """What the service does on a failure and when it is history (wakefail.py), recorded."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []
        self.admitted = asyncio.Event()

    async def refuse(self, instance_id: str, why: str) -> None:
        self.events.append(("refuse", instance_id, why))

    async def admit(self, instance_id: str) -> None:
        self.events.append(("admit", instance_id))
        self.admitted.set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_burst_joins_one_restore_and_the_next_sleep_gets_a_new_one() -> None:
    restores = Restores()
    waker = Waker(restores, restores.is_asleep)
    assert all(waker.wake(ID) for _ in range(20))
    await settle()
    assert restores.calls == [ID] and waker.waking(ID)
    restores.release.set()
    await waker.close()
    assert not waker.waking(ID) and restores.calls == [ID]
    restores.asleep = True  # in standby again, later
    assert waker.wake(ID)
    await waker.close()
    assert restores.calls == [ID, ID]


async def test_a_failed_wake_is_answered_until_it_is_forgotten_then_the_next_request_tries_again() -> None:
    restores, door = Restores(), Door()
    restores.error = Conflict("not enough memory", code="insufficient_resources")
    restores.release.set()
    waker = Waker(restores, restores.is_asleep, on_failure=door.refuse, on_clear=door.admit, retry_after=3600)
    assert waker.wake(ID)
    await waker.close()
    assert door.events == [("refuse", ID, "not enough memory")] and waker.failed(ID)
    assert not waker.wake(ID) and restores.calls == [ID]  # in the pause: no second restore
    waker.forget(ID)  # the pause is over (or a client restored it)
    assert waker.failed(ID) and not waker.wake(ID)  # until the door is closed again
    await settle()
    assert door.events[-1] == ("admit", ID) and not waker.failed(ID)
    restores.error = None
    assert waker.wake(ID)
    await waker.close()
    assert restores.calls == [ID, ID] and not restores.asleep


async def test_the_pause_after_a_failure_ends_by_itself() -> None:
    restores, door = Restores(), Door()
    restores.error = Conflict("no", code="insufficient_resources")
    restores.release.set()
    waker = Waker(restores, restores.is_asleep, on_failure=door.refuse, on_clear=door.admit, retry_after=0.0)
    waker.wake(ID)
    await asyncio.wait_for(door.admitted.wait(), 10)  # the pause's timer fires on the loop
    await waker.close()
    assert [event[0] for event in door.events] == ["refuse", "admit"] and not waker.failed(ID)


async def test_a_restore_refused_because_a_client_restored_it_first_is_no_failure() -> None:
    restores, door = Restores(), Door()
    restores.error = Conflict("cannot restore instance from state Running", code="invalid_state")
    restores.asleep = False  # it runs now: someone else's restore won
    restores.release.set()
    waker = Waker(restores, restores.is_asleep, on_failure=door.refuse, on_clear=door.admit)
    assert waker.wake(ID)
    await waker.close()
    assert not waker.failed(ID) and door.events == []


async def test_an_unexpected_error_is_a_failure_logged_with_its_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    restores = Restores()
    restores.error = RuntimeError("a bug")
    restores.release.set()
    waker = Waker(restores, restores.is_asleep)
    waker.wake(ID)
    await waker.close()
    assert waker.failed(ID) and not waker.wake(ID)
    assert any(record.exc_info for record in caplog.records if "waking instance" in record.getMessage())


# ---- the DNS answers --------------------------------------------------------------------------


class Directory:
    def __init__(self, *entries: InstanceAddress) -> None:
        self.entries = {key: entry for entry in entries for key in (entry.id, entry.name)}

    def find_address(self, ref: str) -> InstanceAddress | None:
        return self.entries.get(ref)


DIRECTORY = Directory(InstanceAddress(ID, "sleepy", "10.100.0.9", asleep=True),
                      InstanceAddress("r" * 24, "awake", "10.100.0.8"))


def ask(name: str, rdtype: str, wakes: list[str], wake: bool = True) -> dns.message.Message:
    query = dns.message.make_query(f"{name}.{INSTANCE_ZONE}.", rdtype)
    wire = answer(query.to_wire(), INSTANCE_ZONE, DIRECTORY, wakes.append if wake else None)
    assert wire is not None
    return dns.message.from_wire(wire)


def addresses(response: dns.message.Message) -> list[str]:
    return [item.to_text() for rrset in response.answer for item in rrset]


def test_an_a_query_for_a_sleeping_instance_wakes_it_and_has_its_address_at_once() -> None:
    wakes: list[str] = []
    assert addresses(ask("sleepy", "A", wakes)) == ["10.100.0.9"]
    assert addresses(ask(ID, "A", wakes)) == ["10.100.0.9"]
    assert wakes == [ID, ID]  # by id, whatever name the rule used


def test_only_a_queries_of_sleeping_instances_wake_anything() -> None:
    wakes: list[str] = []
    response = ask("sleepy", "AAAA", wakes)
    assert response.rcode() == dns.rcode.NOERROR and not response.answer
    assert addresses(ask("awake", "A", wakes)) == ["10.100.0.8"]
    assert ask("nope", "A", wakes).rcode() == dns.rcode.NXDOMAIN
    assert wakes == []
    assert addresses(ask("sleepy", "A", wakes, wake=False)) == ["10.100.0.9"]  # no waker: as before


# ---- the proxy's retries ----------------------------------------------------------------------


def test_every_proxy_retries_dials_only_and_keeps_idle_upstream_connections_briefly() -> None:
    options = CaddyOptions(admin_socket="admin.sock", storage="/d", log_file="/d/l",
                           dns_address="127.0.0.1:53")
    auth = {"request_header_auth": {"header": "X-K", "value": "k" * 32}}
    ingress = Ingress(id="I", name="i", created_at=datetime.now(UTC), rules=[
        IngressRule.model_validate({"match": {"hostname": host}, "target": {"instance": target, "port": 80},
                                    **extra})
        for host, target, extra in [("a.test", "a", {}), ("{x}.test", "{x}", {}), ("b.test", "b", auth)]])
    config = build_config([ingress], options)
    proxies = []
    for route in config["apps"]["http"]["servers"]["ingress-80"]["routes"][:-1]:
        handler: dict[str, Any] = route["handle"][0]
        while handler["handler"] == "subroute":
            handler = handler["routes"][-1]["handle"][0]
        proxies.append(handler)
    assert len(proxies) == 3
    for proxy in proxies:
        balancing = proxy["load_balancing"]
        assert balancing["try_duration"] == "30s" and balancing["try_interval"] == "20ms"
        assert balancing["retry_match"] == [{"expression": "false"}]  # nothing but dial errors
        keep_alive = proxy["transport"]["keep_alive"]
        assert keep_alive["idle_timeout"] == "2s" and keep_alive["probe_interval"] == "5s"
        assert keep_alive["max_idle_conns_per_host"] == 32


# ---- the set of sleeping addresses ------------------------------------------------------------


def test_tcp_to_sleeping_addresses_is_reset_from_the_output_hook() -> None:
    config = NetworkConfig.parse(subnet="10.100.0.0/16")
    for uplink in ("eth0", None):
        refuse = [rule for rule in desired_rules(config, uplink)
                  if rule.chain == "output" and rule.expr[0]["match"]["right"] == f"@{SLEEPING}"]
        assert len(refuse) == 1
        assert refuse[0].expr[-1] == {"reject": {"type": "tcp reset"}}


def test_the_set_is_written_with_the_table_and_changed_one_address_at_a_time() -> None:
    table = "hypemand_vmbr0"
    asleep = [IPv4Address("10.100.0.9"), IPv4Address("10.100.0.3")]
    document = replace_table_commands(table, [], asleep)["nftables"]
    the_set = {"family": "inet", "table": table, "name": SLEEPING, "type": "ipv4_addr"}
    assert {"add": {"set": the_set}} in document
    elements = [c["add"]["element"]["elem"] for c in document if "element" in c.get("add", {})]
    assert elements == [["10.100.0.3", "10.100.0.9"]]
    assert not any("element" in c.get("add", {}) for c in replace_table_commands(table, [])["nftables"])
    add = sleeping_commands(table, asleep[0], True)["nftables"]
    assert [next(iter(c)) for c in add] == ["add"]
    remove = sleeping_commands(table, asleep[0], False)["nftables"]
    assert [next(iter(c)) for c in remove] == ["add", "delete"]  # valid whether or not present
    sync = sync_sleeping_commands(table, asleep)["nftables"]
    assert next(iter(sync[0])) == "flush"
    assert sync[1]["add"]["element"]["elem"] == ["10.100.0.3", "10.100.0.9"]
    assert len(sync_sleeping_commands(table, [])["nftables"]) == 1
