"""Wake on traffic with real VMs, through the official SDK in strict mode: a request through the
ingress to a VM in Standby restores it and gets the page; a burst of requests restores it once;
a request right after a standby (while Caddy may still hold the address) gets the page, and
requests during it get it too, or a 502 at once for one the VM was saved in the middle of
answering; a VM whose restore fails is answered with a clear 502 at once and stays in Standby.

Requests are sent to Caddy from inside the server's network namespace (the harness's); the
restores are counted from each instance's operations log (a failed one from the server's log).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypeman import Hypeman

from hypemand.images import demo
from hypemand.layout import DataLayout
from tests.api.conftest import SMALL
from tests.ingress.netlab import Reply, fetch
from tests.ingress.test_vm_e2e import namespace_of, served
from tests.network.lab import netns_supported
from tests.support.harness import Harness, ServerProcess, strict_client

_why_not = netns_supported() or (None if os.access("/usr/bin/caddy", os.X_OK) else "needs caddy")
pytestmark = [pytest.mark.vm, pytest.mark.netns,
              pytest.mark.skipif(_why_not is not None, reason=_why_not or "")]

PAGE = "busybox httpd"  # in the demo image's /www/index.html
PATIENCE = 120.0  # a client's timeout: far beyond a wake (Caddy itself gives up after 30 s)
BURST = 8


@pytest.fixture(scope="module")
def server(module_harness: Harness) -> ServerProcess:
    started = module_harness.start()
    demo.install(started.base_url, started.token, wait_seconds=300)
    return started


@pytest.fixture(scope="module")
def sdk(server: ServerProcess) -> Iterator[Hypeman]:
    with strict_client(server) as client:
        client.ingresses.create(name="wake", rules=[{"match": {"hostname": "{instance}.wake.test"},
                                                     "target": {"instance": "{instance}", "port": 80}}])
        yield client


@pytest.fixture(scope="module")
def namespace(module_harness: Harness, server: ServerProcess) -> str:
    return namespace_of(module_harness, server)


def web_vm(sdk: Hypeman, namespace: str, name: str) -> str:
    """A running VM behind the ingress, its httpd answering."""
    created = sdk.instances.create(name=name, image=demo.DEMO_NAME, **SMALL)  # type: ignore[arg-type]
    assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"
    served(namespace, f"{name}.wake.test")
    return created.id


def request(namespace: str, name: str) -> Reply:
    return fetch(namespace, 80, f"{name}.wake.test", timeout=PATIENCE)


def page(reply: Reply) -> bool:
    return reply.status == 200 and PAGE in reply.body


def restores(sdk: Hypeman, instance: str) -> int:
    lines = sdk.instances.logs(instance, source="hypeman", tail=500)
    return sum("restore requested" in line for line in lines)


def asleep(sdk: Hypeman, instance: str) -> None:
    assert sdk.instances.standby(instance).state == "Standby"


def running_again(sdk: Hypeman, instance: str) -> bool:
    # Answered means the guest runs; the restore's own bookkeeping may finish a moment later.
    return sdk.instances.wait(instance, state="Running", api_timeout="60s").state == "Running"


def test_a_request_wakes_a_vm_in_standby_and_gets_the_page(sdk: Hypeman, namespace: str) -> None:
    vm = web_vm(sdk, namespace, "sleeper")
    asleep(sdk, vm)
    before = restores(sdk, vm)
    reply = request(namespace, "sleeper")
    assert page(reply), reply
    assert running_again(sdk, vm)
    assert restores(sdk, vm) == before + 1
    assert page(request(namespace, "sleeper"))  # awake now: served as any running VM


def test_a_burst_of_requests_wakes_it_once(sdk: Hypeman, namespace: str) -> None:
    vm = web_vm(sdk, namespace, "burst")
    asleep(sdk, vm)
    before = restores(sdk, vm)
    with ThreadPoolExecutor(BURST) as pool:
        replies = list(pool.map(lambda _: request(namespace, "burst"), range(BURST)))
    assert all(page(reply) for reply in replies), replies
    assert running_again(sdk, vm)
    assert restores(sdk, vm) == before + 1


def test_requests_around_a_standby_get_the_page_or_at_worst_a_502_at_once(
        sdk: Hypeman, namespace: str) -> None:
    vm = web_vm(sdk, namespace, "racer")
    during: list[Reply] = []
    with ThreadPoolExecutor(1) as pool:
        standby = pool.submit(asleep, sdk, vm)
        while not standby.done():  # before, during and after the VM is saved
            during.append(request(namespace, "racer"))
        standby.result()
    # Right after it, while Caddy may still hold the address: reset, retried, woken, answered.
    after = request(namespace, "racer")
    assert page(after), after
    # One the VM was saved in the middle of answering is reset (its connection was open when
    # the VM went to sleep): a 502 from Caddy at once, never a hang; every other one is answered.
    assert during and all(page(reply) or reply.status == 502 for reply in during), \
        [(reply.status, reply.body[:200]) for reply in during if not page(reply)]
    assert running_again(sdk, vm)


def test_a_vm_whose_restore_fails_is_answered_a_clear_502_and_stays_in_standby(
        sdk: Hypeman, server: ServerProcess, namespace: str) -> None:
    vm = web_vm(sdk, namespace, "broken")
    asleep(sdk, vm)
    state_file = DataLayout(server.data_dir).instance(vm).saved.state_file
    with state_file.open("ab") as damaged:  # the digest no longer matches: the restore refuses
        damaged.write(b"damage")
    reply = request(namespace, "broken")
    assert reply.status == 502 and "broken is in standby and could not be woken" in reply.body, reply
    assert sdk.instances.get(vm).state == "Standby"
    again = request(namespace, "broken")  # in the pause after the failure: no second restore
    assert again.status == 502 and "could not be woken" in again.body
    # The restore refused before it began (its operations log has no line of it): the server's does.
    assert server.log().count(f"could not wake instance {vm}") == 1


def test_scale_to_zero_a_vm_sleeps_by_itself_and_the_next_request_wakes_it(
    sdk: Hypeman, namespace: str
) -> None:
    """The README's case: auto-standby and a health check on a VM behind the ingress. Idle (its
    health probes are not traffic), it goes to Standby by itself; a request wakes it and gets the
    page; and idle again, it sleeps again."""
    vm = web_vm(sdk, namespace, "zero")
    check = {"type": "http", "interval": "1s", "start_period": "0s", "http": {"port": 80}}
    sdk.instances.update(vm, health_check=check,  # type: ignore[arg-type]
                         auto_standby={"enabled": True, "idle_timeout": "2s"})
    for _ in range(2):
        waited = sdk.instances.wait(vm, state="Standby", api_timeout="60s")
        assert waited.state == "Standby" and not waited.timed_out, waited
        before = restores(sdk, vm)
        assert page(request(namespace, "zero"))
        assert running_again(sdk, vm) and restores(sdk, vm) == before + 1
        assert sdk.instances.auto_standby.status(vm).status in ("active", "idle_countdown")
