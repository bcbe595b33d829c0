"""Auto-standby on real VMs through the official SDK in strict mode: a VM without inbound
connections goes to Standby after its idle timeout; one with a connection open (from inside the
server's namespace, as the ingress proxy's are, or from a second namespace through a destination
NAT) or held stays Running; the ignore lists; the status along the way; the routes' errors."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
from hypeman import ConflictError, Hypeman, NotFoundError
from hypeman.types import AutoStandbyStatus

from hypemand.network.namespace import run_in_namespace
from tests.autostandby.conftest import ECHO_PORT, NEVER, SHORT, World, connect_when_listening, running
from tests.network.lab import UPLINK_ADDRESS, tool

pytestmark = [pytest.mark.vm, pytest.mark.netns]

SETTLE = 60.0  # how long a condition the server reaches by itself may take on a loaded machine
STAYS = "6s"  # three idle timeouts of SHORT: a VM that should stay Running is watched this long


def status_until(
    sdk: Hypeman, instance: str, predicate: Callable[[AutoStandbyStatus], bool]
) -> AutoStandbyStatus:
    """The status once ``predicate`` holds (the controller reads the table every second)."""
    deadline = time.monotonic() + SETTLE
    while True:
        status = sdk.instances.auto_standby.status(instance)
        if predicate(status):
            return status
        assert time.monotonic() < deadline, f"status never got there: {status}"
        time.sleep(0.2)  # a poll of the status, not a wait for a timing


def standby_by_itself(sdk: Hypeman, instance: str) -> None:
    waited = sdk.instances.wait(instance, state="Standby", api_timeout=f"{SETTLE:.0f}s")
    assert waited.state == "Standby" and not waited.timed_out, waited


def stays_running(sdk: Hypeman, instance: str) -> None:
    """Running through three idle timeouts (the wait ends early only if it goes to Standby)."""
    waited = sdk.instances.wait(instance, state="Standby", api_timeout=STAYS)
    assert waited.timed_out and waited.state == "Running", waited


def echo(connection: socket.socket, line: bytes) -> None:
    connection.sendall(line)
    assert connection.recv(64) == line


def test_an_idle_vm_goes_to_standby_after_its_timeout_and_the_status_says_why(sdk: Hypeman) -> None:
    before = datetime.now(UTC)
    instance, _ = running(sdk, "idle")
    status = status_until(sdk, instance, lambda s: s.idle_since is not None)
    assert (status.supported, status.configured, status.enabled, status.eligible) == (True, True, True, True)
    assert (status.status, status.reason) == ("idle_countdown", "idle_timeout_not_elapsed")
    assert status.tracking_mode == "conntrack_poll_v4_tcp" and status.idle_timeout == NEVER
    assert status.active_inbound_connections == 0 and status.hold_until is None
    assert status.idle_since is not None and status.idle_since >= before - timedelta(seconds=1)
    assert status.next_standby_at == status.idle_since + timedelta(hours=1)
    assert status.countdown_remaining is not None and status.countdown_remaining.endswith("s")

    # A shorter timeout (PATCH replaces the policy): the countdown already ran that long.
    sdk.instances.update(instance, auto_standby={"enabled": True, "idle_timeout": SHORT})
    standby_by_itself(sdk, instance)
    status = sdk.instances.auto_standby.status(instance)
    assert (status.status, status.reason, status.eligible) == ("ineligible", "instance_not_running", False)
    with pytest.raises(ConflictError) as held:
        sdk.instances.auto_standby.hold(instance)
    assert held.value.body["code"] == "instance_in_standby"  # type: ignore[index]

    # Restored: a fresh countdown (not the one from before the standby), then Standby again.
    restored_at = datetime.now(UTC)
    sdk.instances.update(instance, auto_standby={"enabled": True, "idle_timeout": NEVER})
    assert sdk.instances.restore(instance).state == "Running"
    status = status_until(sdk, instance, lambda s: s.idle_since is not None)
    assert status.idle_since is not None and status.idle_since >= restored_at - timedelta(seconds=1)
    sdk.instances.update(instance, auto_standby={"enabled": True, "idle_timeout": SHORT})
    standby_by_itself(sdk, instance)


def test_an_open_connection_keeps_it_running_until_it_closes(sdk: Hypeman, world: World) -> None:
    instance, ip = running(sdk, "busy")
    with world.connect(ip) as connection:
        echo(connection, b"hello\n")
        status = status_until(sdk, instance, lambda s: s.active_inbound_connections == 1)
        assert (status.status, status.reason) == ("active", "active_inbound_connections")
        assert status.idle_since is None and status.next_standby_at is None
        assert status.last_inbound_activity_at is not None
        sdk.instances.update(instance, auto_standby={"enabled": True, "idle_timeout": SHORT})
        stays_running(sdk, instance)
        echo(connection, b"still here\n")
    # Closed (TIME_WAIT is not a connection): the countdown starts, and ends in Standby.
    standby_by_itself(sdk, instance)


def test_a_connection_from_a_second_namespace_through_nat_counts(sdk: Hypeman, world: World) -> None:
    """"The internet" dials the server's uplink address; a destination NAT rule (an operator's
    port forward, added here for the test in the server's namespace) sends it to the VM."""
    instance, ip = running(sdk, "forwarded")
    forward_port = 18080
    port_forward(world.namespace, forward_port, ip, ECHO_PORT)
    dial = partial(connect_when_listening, UPLINK_ADDRESS, forward_port)
    with run_in_namespace(world.lab.net, dial) as connection:
        echo(connection, b"from afar\n")
        status = status_until(sdk, instance, lambda s: s.active_inbound_connections == 1)
        assert status.status == "active"
        sdk.instances.update(instance, auto_standby={"enabled": True, "idle_timeout": SHORT})
        stays_running(sdk, instance)
        echo(connection, b"still here\n")
    standby_by_itself(sdk, instance)


def port_forward(namespace: str, port: int, ip: str, to_port: int) -> None:
    """DNAT ``<uplink>:port`` to ``ip:to_port`` in the server's namespace, and let it through
    hypemand's forward chain (which otherwise lets nothing reach a VM uninvited)."""
    nft = ["ip", "netns", "exec", namespace, "nft"]
    tool(*nft, "add", "table", "ip", "hmtest_forward")
    tool(*nft, "add", "chain", "ip", "hmtest_forward", "prerouting",
         "{ type nat hook prerouting priority -100 ; }")
    tool(*nft, "add", "rule", "ip", "hmtest_forward", "prerouting", "iifname", "up0", "tcp", "dport",
         str(port), "dnat", "to", f"{ip}:{to_port}")
    tool(*nft, "insert", "rule", "inet", "hypemand_vmbr0", "forward", "iifname", "up0", "ct", "status",
         "dnat", "accept")


def test_a_held_vm_stays_running_until_the_hold_ends(sdk: Hypeman) -> None:
    instance, _ = running(sdk, "held")
    status_until(sdk, instance, lambda s: s.idle_since is not None)
    asked = datetime.now(UTC)
    held = sdk.instances.auto_standby.hold(instance)
    assert held.hold_until is not None and held.hold_until >= asked + timedelta(minutes=59)
    assert (held.status, held.reason) == ("idle_countdown", "idle_timeout_not_elapsed")
    # The idle timeout is shortened: the hold (an hour) still holds.
    sdk.instances.update(instance, auto_standby={"enabled": True, "idle_timeout": SHORT})
    stays_running(sdk, instance)
    status = sdk.instances.auto_standby.status(instance)
    assert status.hold_until == held.hold_until and status.next_standby_at == held.hold_until
    # Holding again replaces the hold: now it lasts the new idle timeout.
    again = sdk.instances.auto_standby.hold(instance)
    assert again.hold_until is not None and again.hold_until < held.hold_until
    standby_by_itself(sdk, instance)


@pytest.mark.parametrize("policy", [
    {"ignore_destination_ports": [ECHO_PORT]},
    {"ignore_source_cidrs": ["10.100.0.1/32"]},  # the gateway: where the namespace's clients come from
], ids=["port", "source"])
def test_ignored_connections_do_not_keep_it_running(
    sdk: Hypeman, world: World, policy: dict[str, Any]
) -> None:
    instance, ip = running(sdk, "ignoring", **policy)
    with world.connect(ip) as connection:
        echo(connection, b"ignored\n")
        status = status_until(sdk, instance, lambda s: s.idle_since is not None)
        assert status.active_inbound_connections == 0 and status.status == "idle_countdown"
        sdk.instances.update(instance, auto_standby={"enabled": True, "idle_timeout": SHORT, **policy})  # type: ignore[typeddict-item, arg-type]
        standby_by_itself(sdk, instance)
        # The connection is kept in the saved guest: after a restore it works on.
        sdk.instances.update(instance, auto_standby={"enabled": False, "idle_timeout": SHORT})
        assert sdk.instances.restore(instance).state == "Running"
        echo(connection, b"after\n")


def test_health_probes_do_not_keep_it_running(sdk: Hypeman) -> None:
    """The server's own probes (http every half second) are not a client's traffic: the VM still
    goes to Standby after its idle timeout, having been found healthy meanwhile."""
    instance, _ = running(sdk, "probed")
    check = {"type": "http", "interval": "500ms", "timeout": "2s", "start_period": "0s", "http": {"port": 80}}
    healthy = sdk.instances.update(instance, health_check=check).health_status  # type: ignore[arg-type]
    deadline = time.monotonic() + SETTLE
    while healthy is None or healthy.status != "healthy":
        assert time.monotonic() < deadline, f"never healthy: {healthy}"
        time.sleep(0.2)
        healthy = sdk.instances.get(instance).health_status
    assert healthy.consecutive_successes >= 1
    sdk.instances.update(instance, auto_standby={"enabled": True, "idle_timeout": SHORT})
    standby_by_itself(sdk, instance)


def test_the_status_of_instances_it_does_not_apply_to(sdk: Hypeman) -> None:
    from hypemand.images import demo
    from tests.autostandby.conftest import SERVES, SMALL

    plain = sdk.instances.create(name="plain", image=demo.DEMO_NAME, **{**SMALL, **SERVES})  # type: ignore[arg-type]
    status = sdk.instances.auto_standby.status(plain.id)
    assert (status.configured, status.enabled, status.status, status.reason) == (
        False, False, "disabled", "policy_missing")
    # A hold of an instance nothing would put in standby: 200, nothing held.
    assert sdk.instances.auto_standby.hold(plain.id).hold_until is None
    sdk.instances.update(plain.id, auto_standby={"enabled": False})
    status = sdk.instances.auto_standby.status(plain.id)
    assert (status.configured, status.enabled, status.reason) == (True, False, "policy_disabled")

    offline = sdk.instances.create(name="offline", image=demo.DEMO_NAME, network={"enabled": False},
                                   auto_standby={"enabled": True, "idle_timeout": SHORT},
                                   **{**SMALL, **SERVES})  # type: ignore[arg-type]
    assert sdk.instances.wait(offline.id, state="Running", api_timeout="120s").state == "Running"
    status = sdk.instances.auto_standby.status(offline.id)
    assert (status.status, status.reason, status.eligible) == ("ineligible", "network_disabled", False)
    stays_running(sdk, offline.id)

    sdk.instances.stop(offline.id)
    assert sdk.instances.auto_standby.status(offline.id).reason == "instance_not_running"
    with pytest.raises(NotFoundError):
        sdk.instances.auto_standby.status("no-such-instance")
    with pytest.raises(NotFoundError):
        sdk.instances.auto_standby.hold("no-such-instance")


def test_requests_that_open_and_close_between_two_reads_are_activity(sdk: Hypeman, world: World) -> None:
    """The table is read every second: a request served in between is seen as a finished flow
    that was not there before, and counts (last_inbound_activity_at moves, the countdown
    restarts)."""
    instance, ip = running(sdk, "served")
    last = status_until(sdk, instance, lambda s: s.idle_since is not None)
    for _ in range(3):
        with world.connect(ip, 80) as connection:
            connection.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            while connection.recv(65536):
                pass
        previous = last.last_inbound_activity_at
        last = status_until(sdk, instance, lambda s, p=previous: s.last_inbound_activity_at is not None  # type: ignore[misc]
                            and (p is None or s.last_inbound_activity_at > p))
        assert last.active_inbound_connections == 0 and last.idle_since is not None
        assert last.last_inbound_activity_at is not None and last.idle_since >= last.last_inbound_activity_at
