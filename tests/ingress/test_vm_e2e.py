"""Ingress to real VMs: routes to a VM's busybox httpd (the demo image's), by hostname and by
pattern, through the official SDK in strict mode; the route comes back after standby/restore and
after a server restart; forks of one snapshot are each reached by their own name.

Requests are sent to Caddy from inside the server's network namespace (the harness's).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypeman import Hypeman
from hypeman.lib.exec import exec as sdk_exec

from hypemand.images import demo
from tests.api.conftest import SMALL
from tests.ingress.netlab import Reply, fetch
from tests.network.lab import netns_supported
from tests.support.harness import Harness, ServerProcess, strict_client

_why_not = netns_supported() or (None if os.access("/usr/bin/caddy", os.X_OK) else "needs caddy")
pytestmark = [pytest.mark.vm, pytest.mark.netns,
              pytest.mark.skipif(_why_not is not None, reason=_why_not or "")]

PAGE = "busybox httpd"  # in the demo image's /www/index.html
DEADLINE = 60.0  # a guest's httpd starts listening some time after Running; a restart takes a while


def namespace_of(harness: Harness, server: ServerProcess) -> str:
    namespace = harness.namespace_of(server.data_dir)
    assert namespace is not None, "the harness gives this server no network namespace"
    return namespace


def served(namespace: str, host: str, path: str = "/", want: str = PAGE) -> Reply:
    """The page through Caddy once it answers 200 with ``want`` (the guest's httpd may not listen
    yet, a restored guest may not have answered ARP yet): the last reply otherwise fails."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            reply = fetch(namespace, 80, host, path)
            if reply.status == 200 and want in reply.body:
                return reply
            last = f"{reply.status} {reply.body[:200]!r}"
        except OSError as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise AssertionError(f"{host}{path} did not serve {want!r} within {DEADLINE:.0f} s: {last}")
        time.sleep(0.2)


def running(sdk: Hypeman, name: str) -> str:
    created = sdk.instances.create(name=name, image=demo.DEMO_NAME, **SMALL)  # type: ignore[arg-type]
    assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"
    return created.id


def started(harness: Harness, data: Path | None = None, port: int | None = None) -> ServerProcess:
    server = harness.start(data, port=port)
    if data is None:
        demo.install(server.base_url, server.token, wait_seconds=300)
    return server


def test_a_route_to_a_vm_survives_standby_restore_and_a_server_restart(harness: Harness) -> None:
    server = started(harness)
    namespace = namespace_of(harness, server)
    with strict_client(server) as sdk:
        site = running(sdk, "site")
        sdk.ingresses.create(name="site", rules=[
            {"match": {"hostname": "site.test"}, "target": {"instance": "site", "port": 80}},
            {"match": {"hostname": "{instance}.vms.test"}, "target": {"instance": "{instance}", "port": 80}},
        ])
        served(namespace, "site.test")
        served(namespace, "site.vms.test")
        assert fetch(namespace, 80, "other.vms.test").status in (502, 503)  # no such instance
        sdk.instances.standby(site)  # (a request now would wake it: test_wake_vm.py)
        assert sdk.instances.restore(site).state == "Running"
        # Running after a restore means reachable at once: same address, same TAP name, and the
        # guest's httpd never stopped listening.
        reply = fetch(namespace, 80, "site.test")
        assert reply.status == 200 and PAGE in reply.body, reply
    server.stop()  # CADDY_STOP_ON_SHUTDOWN (the harness's): Caddy goes too, the VM stays
    server = started(harness, server.data_dir, port=server.port)
    served(namespace, "site.test")
    served(namespace, "site.vms.test")
    with strict_client(server) as sdk:
        assert [i.name for i in sdk.ingresses.list()] == ["site"]


def test_forks_are_reached_by_their_own_names(harness: Harness) -> None:
    server = started(harness)
    namespace = namespace_of(harness, server)
    with strict_client(server) as sdk:
        source = running(sdk, "source")
        sdk.ingresses.create(name="forks", rules=[{"match": {"hostname": "{instance}.forks.test"},
                                                   "target": {"instance": "{instance}", "port": 80}}])
        snapshot = sdk.instances.snapshots.create(source, kind="Standby", name="base")
        names = ["fork-a", "fork-b"]
        forks = [sdk.snapshots.fork(snapshot.id, name=name, target_state="Running") for name in names]
        for name, fork in zip([*names, "source"], [*(f.id for f in forks), source], strict=True):
            result = sdk_exec(sdk, fork, ["/bin/sh", "-c", f"echo {name} > /www/who.txt"])
            assert result.exit_code == 0, result.output
        addresses = {sdk.instances.get(f.id).network.ip for f in forks}  # type: ignore[union-attr]
        assert len(addresses) == 2  # each fork on its own address
        for name in [*names, "source"]:
            served(namespace, f"{name}.forks.test", "/who.txt", want=name)
