"""Health checks on real VMs through the official SDK in strict mode: http, tcp and exec probes,
the status shown on every read, and a probe that hangs bounded by its timeout without holding up
another instance's checks. The VMs are on the server's bridge, in the harness's namespace: the
probes reach them from there."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from hypeman import Hypeman
from hypeman.types import Instance

from hypemand.images import demo
from tests.health.conftest import PATIENCE, SMALL, guest_sh, health_of, when
from tests.support.harness import Harness, LogAllowance, report, strict_client

pytestmark = [pytest.mark.vm, pytest.mark.netns]

WEB = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["httpd -p 80 -h /www; exec sleep 100000"]}


def error_of(found: Instance) -> str:
    return (found.health_status.last_error or "") if found.health_status else ""


def create(sdk: Hypeman, name: str, program: dict[str, Any], check: dict[str, Any]) -> str:
    created = sdk.instances.create(name=name, image=demo.DEMO_NAME, health_check=check,  # type: ignore[arg-type]
                                   **{**SMALL, **program})
    assert created.health_check is not None and created.health_check.type == check["type"]
    return created.id


def test_http_check_goes_starting_healthy_unhealthy_when_the_server_is_killed(sdk: Hypeman) -> None:
    # The start period forgives the refusals before httpd listens; it ends at the first healthy.
    check = {"type": "http", "interval": "500ms", "timeout": "2s", "start_period": "2m",
             "failure_threshold": 2, "http": {"port": 80, "path": "/"}}
    instance = create(sdk, "web-health", WEB, check)
    # Before the program runs (and before the first probe of this boot): starting.
    first = sdk.instances.get(instance)
    assert health_of(first) == "starting", first.health_status
    healthy = when(sdk, instance, lambda i: health_of(i) == "healthy", "healthy")
    status = healthy.health_status
    assert status is not None and status.consecutive_successes >= 1 and status.last_success_at is not None
    assert healthy.state == "Running"
    code, out = guest_sh(sdk, instance, "killall httpd")
    assert code == 0, out
    sick = when(sdk, instance, lambda i: health_of(i) == "unhealthy", "unhealthy")
    status = sick.health_status
    assert status is not None and status.consecutive_failures >= 2 and status.consecutive_successes == 0
    assert status.last_error is not None and "refused" in status.last_error, status
    assert status.last_failure_at is not None and status.last_checked_at is not None
    # Health never changes the lifecycle state, and every read shows it (the list too).
    assert sick.state == "Running"
    listed = {i.id: i for i in sdk.instances.list()}[instance]
    assert listed.health_status is not None and listed.health_status.status == "unhealthy"


def test_http_check_wants_the_expected_status(sdk: Hypeman) -> None:
    check = {"type": "http", "interval": "500ms", "start_period": "0s", "failure_threshold": 1,
             "http": {"port": 80, "path": "/missing.html", "expected_status": 200}}
    instance = create(sdk, "web-404", WEB, check)
    # (A probe before httpd listens is refused: unhealthy too, for another reason.)
    when(sdk, instance, lambda i: health_of(i) == "unhealthy" and "answered 404" in error_of(i),
         "unhealthy on a 404")
    sdk.instances.update(instance, health_check={**check, "http": {"port": 80, "path": "/missing.html",  # type: ignore[arg-type,typeddict-item]
                                                                    "expected_status": 404}})
    when(sdk, instance, lambda i: health_of(i) == "healthy", "healthy once 404 is what is expected")


def test_tcp_check_connects(sdk: Hypeman) -> None:
    program = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["exec nc -ll -p 7000 -e cat"]}
    base = {"type": "tcp", "interval": "500ms", "start_period": "0s", "failure_threshold": 1}
    listening = create(sdk, "tcp-open", program, {**base, "tcp": {"port": 7000}})
    closed = create(sdk, "tcp-closed", program, {**base, "tcp": {"port": 7001}})
    when(sdk, listening, lambda i: health_of(i) == "healthy", "tcp healthy")
    sick = when(sdk, closed, lambda i: health_of(i) == "unhealthy", "tcp unhealthy on a closed port")
    assert sick.health_status is not None and "refused" in (sick.health_status.last_error or "")


def test_exec_check_runs_through_the_guest_agent(sdk: Hypeman) -> None:
    program = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["exec sleep 100000"]}
    check = {"type": "exec", "interval": "500ms", "timeout": "5s", "start_period": "0s",
             "failure_threshold": 1, "exec": {"command": ["/bin/sh", "-c", "cat /tmp/ready"]}}
    instance = create(sdk, "exec-health", program, check)
    sick = when(sdk, instance, lambda i: health_of(i) == "unhealthy" and "exit code 1" in error_of(i),
                "exec unhealthy")
    assert "/tmp/ready" in error_of(sick), sick.health_status  # the command's output, kept
    assert guest_sh(sdk, instance, "echo yes > /tmp/ready")[0] == 0
    healthy = when(sdk, instance, lambda i: health_of(i) == "healthy", "exec healthy")
    assert healthy.health_status is not None and healthy.health_status.consecutive_failures == 0


def test_a_hanging_probe_is_bounded_by_its_timeout_and_holds_up_no_other_instance(sdk: Hypeman) -> None:
    # Accepts every connection and never answers: each http probe waits its whole timeout.
    silent = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["exec nc -ll -p 8081 -e sleep 100000"]}
    hanging = create(sdk, "hangs", silent, {
        "type": "http", "interval": "500ms", "timeout": "4s", "start_period": "0s", "failure_threshold": 1,
        "http": {"port": 8081}})
    quick = create(sdk, "quick", WEB, {
        "type": "http", "interval": "500ms", "timeout": "2s", "start_period": "0s", "http": {"port": 80}})
    when(sdk, hanging, lambda i: health_of(i) == "unhealthy" and error_of(i) == "timed out after 4s",
         "the hanging probe timed out")
    when(sdk, quick, lambda i: health_of(i) == "healthy", "the other instance healthy")
    # While one probe of the hanging VM waits out its 4 s, the other VM is checked again and again.
    checks_of_quick: set[object] = set()
    hanging_checks: set[object] = set()
    deadline = time.monotonic() + PATIENCE
    while len(hanging_checks) < 2:
        assert time.monotonic() < deadline, "the hanging VM was not checked again"
        time.sleep(0.1)
        for found in sdk.instances.list():
            if found.id == quick and found.health_status is not None:
                assert found.health_status.status == "healthy"
                if hanging_checks:
                    checks_of_quick.add(found.health_status.last_checked_at)
            if found.id == hanging and found.health_status is not None:
                hanging_checks.add(found.health_status.last_checked_at)
    assert len(checks_of_quick) >= 3, checks_of_quick


def test_user_mode_networking_makes_http_and_tcp_unknown_and_exec_still_works(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """QEMU's user-mode NIC gives the VM no address the server can reach: an http or tcp check
    says so (``unknown``, with why); an exec check goes through the guest agent as ever."""
    own = Harness(tmp_path / "user-mode", LogAllowance.of(request.node), network="user")
    try:
        server = own.start()
        demo.install(server.base_url, server.token, wait_seconds=300)
        with strict_client(server) as sdk:
            base = {"interval": "500ms", "start_period": "0s"}
            http = create(sdk, "user-http", WEB, {**base, "type": "http", "http": {"port": 80}})
            tcp = create(sdk, "user-tcp", WEB, {**base, "type": "tcp", "tcp": {"port": 80}})
            inside = create(sdk, "user-exec", WEB, {**base, "type": "exec", "exec": {"command": ["true"]}})
            for instance in (http, tcp):
                found = when(sdk, instance, lambda i: i.state == "Running" and health_of(i) == "unknown"
                             and i.health_status is not None and i.health_status.last_checked_at is not None,
                             "unknown under user-mode networking")
                assert found.health_status is not None
                assert "user-mode networking" in (found.health_status.last_error or ""), found.health_status
                assert found.health_status.consecutive_failures == 0
            when(sdk, inside, lambda i: health_of(i) == "healthy", "exec healthy under user-mode networking")
    finally:
        problems = own.finish()
    report(problems, "the user-mode server left problems")
