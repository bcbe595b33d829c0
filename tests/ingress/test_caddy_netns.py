"""The ingress service with a real Caddy, in namespaces the test makes (see netlab.py): routing
by hostname and pattern to stand-in VMs found through our DNS responder, header auth, HTTP to
HTTPS redirects, TLS from Caddy's internal CA, 404s, an address change picked up at request
time, a configuration Caddy refuses that is not stored, Caddy adopted by the next service and
started again when it dies.

Caddy and every stand-in VM are stopped, and the namespaces removed, also when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from hypemand.errors import Conflict, DomainError
from hypemand.ingress.models import CreateIngressRequest
from hypemand.ingress.service import IngressOptions, IngressService
from hypemand.layout import DataLayout
from hypemand.network.namespace import run_in_namespace
from tests.ingress.netlab import BACKEND_PORT, Directory, Reply, VmNet, fetch, vm_net
from tests.network.lab import netns_supported
from tests.support.harness import kill, processes_in
from tests.support.procs import process_running

_why_not = netns_supported() or (None if os.access("/usr/bin/caddy", os.X_OK) else "needs caddy")
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_why_not is not None, reason=_why_not or "")]

API_PORT = 4973
AUTH = "k" * 40
DEADLINE = 20.0  # for conditions that become true by themselves (a certificate, a restart)


@pytest.fixture
def net() -> Iterator[VmNet]:
    with vm_net() as own:
        yield own


@pytest.fixture
def data(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "data"
    left = processes_in(tmp_path / "data")
    kill(left)
    assert not left, f"processes left running (killed now): {left}"


def options(net: VmNet, stop: bool = True) -> IngressOptions:
    return IngressOptions(namespace=net.srv, caddy_binary=Path("/usr/bin/caddy"), listen_address="0.0.0.0",
                          stop_on_shutdown=stop, api_port=API_PORT, dns_port=5353)


@contextlib.asynccontextmanager
async def running(data: Path, net: VmNet, directory: Directory,
                  stop: bool = True) -> AsyncIterator[IngressService]:
    service = IngressService(DataLayout(data), options(net, stop), directory, lambda: None)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


def request(name: str, *rules: dict[str, Any]) -> CreateIngressRequest:
    return CreateIngressRequest.model_validate({"name": name, "rules": list(rules)})


def rule(hostname: str, instance: str, port: int = 80, **extra: Any) -> dict[str, Any]:
    return {"match": {"hostname": hostname, "port": port},
            "target": {"instance": instance, "port": BACKEND_PORT}, **extra}


async def get(net: VmNet, host: str, port: int = 80, **kwargs: Any) -> Reply:
    return await asyncio.to_thread(fetch, net.srv, port, host, **kwargs)


async def until(check: Any, what: str) -> Any:
    """Poll ``check()`` (async) until it returns something truthy, for at most DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while True:
        with contextlib.suppress(OSError):
            if result := await check():
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE:.0f} s: {what}")
        await asyncio.sleep(0.1)


async def test_hostnames_and_patterns_reach_their_instances(net: VmNet, data: Path) -> None:
    directory = Directory()
    for name in ("app", "one", "two"):
        directory.set(name, net.add_vm(name))
    async with running(data, net, directory) as service:
        await service.create(request("lit", rule("app.test", "app")))
        await service.create(request("pat", rule("{instance}.test", "{instance}"),
                                     rule("api-{vm}.example.com", "{vm}")))
        assert (await get(net, "app.test")).body == "app / app.test"
        assert (await get(net, "one.test", path="/x?y=1")).body == "one /x?y=1 one.test"
        assert (await get(net, "Two.Test")).body == "two / Two.Test"
        assert (await get(net, "api-one.example.com")).body.startswith("one /")
        assert (await get(net, "app.test:80")).body.startswith("app /")
        unknown_host = await get(net, "elsewhere.example")
        assert unknown_host.status == 404 and "no ingress" in unknown_host.body
        assert (await get(net, "nope.test")).status in (502, 503)  # no such instance
        # A deleted ingress no longer routes; the others still do.
        await service.delete("lit")
        assert (await get(net, "app.test")).body == "app / app.test"  # now through the pattern
        await service.create(request("other", rule("x.test", "app", port=8080)))
        await service.delete("pat")
        assert service.list()[0].name == "other"
        with pytest.raises(ConnectionRefusedError):  # no ingress on port 80 left: nothing listens
            await get(net, "app.test")
        assert (await get(net, "app.test", port=8080)).status == 404


async def test_request_header_auth(net: VmNet, data: Path) -> None:
    directory = Directory()
    directory.set("app", net.add_vm("app"))
    async with running(data, net, directory) as service:
        await service.create(request("guarded", rule("app.test", "app", request_header_auth={
            "header": "X-Ingress-Key", "value": AUTH})))
        assert (await get(net, "app.test")).status == 401
        assert (await get(net, "app.test", headers={"X-Ingress-Key": AUTH[:-1] + "x"})).status == 401
        assert (await get(net, "app.test", headers={"X-Ingress-Key": AUTH + "k"})).status == 401
        assert (await get(net, "app.test", headers={"X-Ingress-Key": AUTH})).body == "app / app.test"


async def test_tls_from_the_internal_ca_and_the_redirect_to_it(net: VmNet, data: Path) -> None:
    directory = Directory()
    directory.set("app", net.add_vm("app"))
    async with running(data, net, directory) as service:
        await service.create(request("secure", rule("app.test", "app", port=8443, tls=True,
                                                     redirect_http=True)))
        moved = await get(net, "app.test", path="/a?b=c")
        assert moved.status == 308 and moved.headers["location"] == "https://app.test:8443/a?b=c"
        root = DataLayout(data).caddy.local_ca_root

        async def served() -> Reply | None:
            # The certificate is issued in the background right after the load: retry the handshake.
            with contextlib.suppress(OSError):
                return await get(net, "app.test", port=8443, ca=root)
            return None

        reply = await until(served, "a certificate for app.test that the local root vouches for")
        assert reply.body == "app / app.test"
        # Plain HTTP on the TLS port is refused, not proxied.
        assert (await get(net, "app.test", port=8443)).status == 400


async def test_an_address_change_is_picked_up_at_request_time(net: VmNet, data: Path) -> None:
    directory = Directory()
    first, second = net.add_vm("first"), net.add_vm("second")
    directory.set("app", first)
    async with running(data, net, directory) as service:
        await service.create(request("moving", rule("app.test", "app")))
        assert (await get(net, "app.test")).body.startswith("first ")
        directory.set("app", second)  # the instance came back elsewhere (a restore, a restart)

        async def moved() -> bool:
            return (await get(net, "app.test")).body.startswith("second ")

        await until(moved, "the route follows the instance to its new address")
        directory.set("app", None)  # stopped: no address
        assert (await until(lambda: _status_not_200(net), "no route to a stopped instance")) in (502, 503)


async def _status_not_200(net: VmNet) -> int | None:
    status = (await get(net, "app.test")).status
    return status if status != 200 else None


def _occupy(namespace: str, port: int) -> socket.socket:
    def bind() -> socket.socket:
        sock = socket.socket()
        sock.bind(("0.0.0.0", port))
        sock.listen()
        return sock

    return run_in_namespace(namespace, bind)


async def test_a_configuration_caddy_refuses_is_not_stored(net: VmNet, data: Path) -> None:
    directory = Directory()
    directory.set("app", net.add_vm("app"))
    layout = DataLayout(data)
    async with running(data, net, directory) as service:
        kept = await service.create(request("kept", rule("app.test", "app")))
        blocker = _occupy(net.srv, 9999)
        try:
            with pytest.raises(Conflict) as refused:
                await service.create(request("blocked", rule("other.test", "app", port=9999)))
        finally:
            blocker.close()
        assert refused.value.code == "port_in_use" and "9999" in str(refused.value)
        assert [i.name for i in service.list()] == ["kept"]
        assert sorted(p.name for p in layout.ingresses.iterdir()) == [f"{kept.id}.json"]
        assert (await get(net, "app.test")).body.startswith("app ")  # the old configuration runs on
        # Refusals before Caddy is asked: the API's port, a taken hostname, both TLS and plain.
        with pytest.raises(DomainError, match="API server's own port"):
            await service.create(request("api", rule("x.test", "app", port=API_PORT)))
        with pytest.raises(DomainError, match="already used by ingress 'kept'") as taken:
            await service.create(request("again", rule("APP.test", "app")))
        assert taken.value.code == "hostname_in_use"
        with pytest.raises(DomainError, match="cannot serve both"):
            await service.create(request("mixed", rule("y.test", "app", tls=True)))
        with pytest.raises(DomainError, match="does not exist"):
            await service.create(request("ghost", rule("z.test", "ghost")))
        assert [i.name for i in service.list()] == ["kept"]


async def test_caddy_outlives_the_service_is_adopted_and_restarted_when_it_dies(net: VmNet,
                                                                                data: Path) -> None:
    directory = Directory()
    directory.set("app", net.add_vm("app"))
    async with running(data, net, directory, stop=False) as first:
        await first.create(request("web", rule("app.test", "app")))
        assert first._caddy is not None
        pid = first._caddy.pid
    assert pid is not None and _alive(pid)  # left running (without our DNS responder meanwhile)
    async with running(data, net, directory, stop=True) as second:
        assert second._caddy is not None and second._caddy.pid == pid  # adopted, not replaced
        assert [i.name for i in second.list()] == ["web"]
        assert (await get(net, "app.test")).body.startswith("app ")
        os.kill(pid, signal.SIGKILL)

        async def replaced() -> bool:
            caddy = second._caddy
            return caddy is not None and caddy.pid not in (None, pid) and (
                await get(net, "app.test")).body.startswith("app ")

        await until(replaced, "a new Caddy serving the stored ingress")
        new_pid = second._caddy.pid
    assert new_pid is not None and not _alive(new_pid)


def _alive(pid: int) -> bool:
    return process_running(pid)
