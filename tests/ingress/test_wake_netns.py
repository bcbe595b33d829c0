"""Wake on traffic with a real Caddy and the real firewall rule, in namespaces the test makes
(netlab.py): stand-in VMs behind a veth, put to sleep the way a standby does it (the address
kept, TCP to it reset from the server's namespace) and woken by a restore the test plays and
holds as long as it likes, so every order of events below is certain, not timed.

Requests wait for one wake, and other instances are served while they wait; a request for an
address Caddy still holds from before the standby is answered too; a wake that fails is answered
502 with its reason at once, and the next request after the pause wakes it. And the network
keeps the set of sleeping addresses it is told, across a rewrite of its rules, and exactly the
one a server's start gives it. Caddy is stopped and the namespaces removed also when a test
fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from hypemand.errors import Conflict, DomainError
from hypemand.ingress.models import CreateIngressRequest
from hypemand.ingress.service import IngressOptions, IngressService
from hypemand.layout import DataLayout
from hypemand.network import NetworkConfig, NetworkHost
from hypemand.network.firewall import current_table, ensure_rules, set_sleeping
from hypemand.network.namespace import run_in_namespace
from tests.ingress.netlab import BACKEND_PORT, VM_NET, Directory, Reply, VmNet, fetch
from tests.ingress.test_caddy_netns import data, net
from tests.network.lab import lab, netns_supported, tool

_why_not = netns_supported() or (None if os.access("/usr/bin/caddy", os.X_OK) else "needs caddy")
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_why_not is not None, reason=_why_not or "")]

APP = "app"
APP_ID = f"{APP:0<24}"  # netlab's Directory numbers stand-ins after their names
DEADLINE = 20.0  # for a condition that becomes true by itself
PATIENCE = 60.0  # a client's timeout: far beyond any wake here (Caddy gives up after 30 s)
BURST = 8
__all__ = ["data", "net"]  # the Caddy tests' fixtures: a VM network and a data dir left clean


@pytest.fixture
def clients() -> Iterator[ThreadPoolExecutor]:
    """Threads of the test's own for its HTTP clients: requests held by a wake must not take
    every thread of the loop's default pool."""
    with ThreadPoolExecutor(BURST + 4, thread_name_prefix="client") as pool:
        yield pool


class Sleeper:
    """The instance manager's part, played by the test: stand-in VMs put to sleep (the address
    kept and marked, as a standby does) and woken by a restore that waits for ``release``."""

    def __init__(self, net: VmNet, directory: Directory) -> None:
        self.net = net
        self.directory = directory
        self.config = NetworkConfig.parse(subnet=f"{VM_NET}.0/24", bridge="vms0", namespace=net.srv)
        self.addresses: dict[str, str] = {}
        self.calls: list[str] = []
        self.asked = asyncio.Event()
        self.release = asyncio.Event()
        self.error: DomainError | None = None

    async def start(self) -> None:
        table = partial(ensure_rules, self.config, None, set())
        await asyncio.to_thread(run_in_namespace, self.net.srv, table)

    def add(self, name: str) -> str:
        address = self.net.add_vm(name)
        self.addresses[name] = address
        self.directory.set(name, address)
        return address

    async def _mark(self, name: str, asleep: bool) -> None:
        change = partial(set_sleeping, self.config, IPv4Address(self.addresses[name]), asleep)
        await asyncio.to_thread(run_in_namespace, self.net.srv, change)
        self.directory.set(name, self.addresses[name], asleep=asleep)

    async def sleep(self, name: str) -> None:
        await self._mark(name, True)

    async def restore(self, instance_id: str) -> None:
        self.calls.append(instance_id)
        self.asked.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        await self._mark(next(n for n in self.addresses if self.directory.table[n].id == instance_id), False)


@contextlib.asynccontextmanager
async def serving(data: Path, net: VmNet, sleeper: Sleeper) -> AsyncIterator[IngressService]:
    options = IngressOptions(namespace=net.srv, caddy_binary=Path("/usr/bin/caddy"), listen_address="0.0.0.0",
                             stop_on_shutdown=True, api_port=4973, dns_port=5353)
    await sleeper.start()
    service = IngressService(DataLayout(data), options, sleeper.directory, lambda: None,
                             restore=sleeper.restore)
    await service.start()
    try:
        await service.create(CreateIngressRequest.model_validate({"name": "site", "rules": [
            {"match": {"hostname": f"{name}.test"}, "target": {"instance": name, "port": BACKEND_PORT}}
            for name in sleeper.addresses]}))
        yield service
    finally:
        await service.stop()


async def get(pool: ThreadPoolExecutor, net: VmNet, host: str) -> Reply:
    return await asyncio.get_running_loop().run_in_executor(
        pool, partial(fetch, net.srv, 80, host, timeout=PATIENCE))


def app_page(reply: Reply) -> bool:
    return reply.status == 200 and reply.body == f"{APP} / {APP}.test"


async def test_requests_for_a_sleeping_instance_wait_for_one_wake_and_others_are_served_meanwhile(
        net: VmNet, data: Path, clients: ThreadPoolExecutor) -> None:
    sleeper = Sleeper(net, Directory())
    sleeper.add(APP)
    sleeper.add("other")
    async with serving(data, net, sleeper):
        assert app_page(await get(clients, net, "app.test"))  # awake: no wake
        await sleeper.sleep(APP)
        burst = [asyncio.create_task(get(clients, net, "app.test")) for _ in range(BURST)]
        await asyncio.wait_for(sleeper.asked.wait(), DEADLINE)
        # The wake is held: Caddy keeps serving the instance that runs; the burst waits.
        other = await get(clients, net, "other.test")
        assert other.status == 200 and other.body.startswith("other /")
        assert not any(request.done() for request in burst)
        sleeper.release.set()
        replies = await asyncio.gather(*burst)
        assert all(app_page(reply) for reply in replies), replies
        assert sleeper.calls == [APP_ID]  # one restore for the whole burst


async def test_an_address_caddy_still_holds_from_before_the_standby_is_answered_too(
        net: VmNet, data: Path, clients: ThreadPoolExecutor) -> None:
    sleeper = Sleeper(net, Directory())
    address = sleeper.add(APP)
    sleeper.release.set()  # restores finish as soon as they are asked for
    async with serving(data, net, sleeper) as service:
        assert app_page(await get(clients, net, "app.test"))  # Caddy holds the address now
        await sleeper.sleep(APP)
        with pytest.raises(ConnectionRefusedError):  # reset at once from the server's namespace
            await asyncio.to_thread(run_in_namespace, net.srv,
                                    partial(socket.create_connection, (address, BACKEND_PORT), 10))
        assert app_page(await get(clients, net, "app.test"))
        assert service.waker is not None
        await service.waker.settled()  # the restore's bookkeeping ends after the guest answers
        assert sleeper.calls == [APP_ID] and not sleeper.directory.table[APP].asleep


async def test_a_failed_wake_is_answered_502_with_its_reason_and_the_next_request_after_the_pause_wakes(
        net: VmNet, data: Path, clients: ThreadPoolExecutor) -> None:
    sleeper = Sleeper(net, Directory())
    sleeper.add(APP)
    sleeper.add("other")
    sleeper.error = Conflict("not enough memory", code="insufficient_resources")
    sleeper.release.set()
    async with serving(data, net, sleeper) as service:
        assert service.waker is not None
        service.waker.retry_after = 3600.0
        await sleeper.sleep(APP)
        # Answered by the server, not by Caddy giving up (whose 502 has no body).
        failed = await get(clients, net, "app.test")
        assert failed.status == 502 and "could not be woken: not enough memory" in failed.body, failed
        assert sleeper.calls == [APP_ID] and sleeper.directory.table[APP].asleep
        again = await get(clients, net, "app.test")  # in the pause: answered, no new restore
        assert again.status == 502 and "not enough memory" in again.body
        assert sleeper.calls == [APP_ID]
        other = await get(clients, net, "other.test")  # the answer is for that address only
        assert other.status == 200 and other.body.startswith("other /")
        sleeper.error = None
        service.waker.forget(APP_ID)  # the pause is over
        await service.waker.settled()
        assert not service.waker.failed(APP_ID)
        assert app_page(await get(clients, net, "app.test"))
        assert sleeper.calls == [APP_ID, APP_ID]


async def test_the_network_keeps_the_sleeping_addresses_and_the_start_sets_them_again() -> None:
    first, second = IPv4Address("10.213.9.11"), IPv4Address("10.213.9.12")
    with lab() as own:
        srv = own.add_namespace("srv")
        config = NetworkConfig.parse(subnet="10.213.9.0/24", namespace=srv)

        def asleep() -> frozenset[IPv4Address]:
            table = run_in_namespace(srv, partial(current_table, config.nft_table))
            assert table is not None
            return table.sleeping

        host = NetworkHost(config)
        try:
            await host.start(set(), sleeping={first})
            assert asleep() == {first}
            for _ in range(2):  # each change twice: idempotent
                await host.set_sleeping(second, True)
            for _ in range(2):
                await host.set_sleeping(first, False)
            assert asleep() == {second}
            # Reset at once, not left to ARP (which would end in EHOSTUNREACH seconds later).
            with pytest.raises(ConnectionRefusedError):
                await asyncio.to_thread(run_in_namespace, srv,
                                        partial(socket.create_connection, (str(second), 80), 10))
            # Rules changed by hand are rewritten; the sleeping addresses stay when none are given.
            tool("ip", "netns", "exec", srv, "nft", "flush", "chain", "inet", config.nft_table, "output")
            report = await host.reconcile(set())
            assert report.rules_rewritten and asleep() == {second}
            assert not (await host.reconcile(set())).rules_rewritten
        finally:
            host.close()
        restarted = NetworkHost(config)  # a server's start says what is asleep now
        try:
            report = await restarted.start(set(), sleeping={first})
            assert not report.rules_rewritten and asleep() == {first}
        finally:
            restarted.close()
