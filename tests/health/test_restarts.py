"""The restart policy on real VMs through the official SDK in strict mode: on_failure restarts a
failing program until max_attempts, always restarts after exit 0, a manual stop blocks restarts
until a manual start, an unhealthy VM is stopped and started again, and a server SIGKILLed while
a restart is pending resumes the countdown and restarts exactly once."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypeman import Hypeman
from hypeman.types import Instance

from hypemand.images import demo
from tests.health.conftest import SMALL, boots, guest_sh, health_of, until, when
from tests.support.harness import Harness, strict_client

pytestmark = [pytest.mark.vm]


def shell(script: str) -> dict[str, Any]:
    return {"entrypoint": ["/bin/sh", "-c"], "cmd": [script]}


def create(sdk: Hypeman, name: str, program: dict[str, Any], policy: dict[str, Any],
           **extra: Any) -> str:
    created = sdk.instances.create(name=name, image=demo.DEMO_NAME, restart_policy=policy,  # type: ignore[arg-type]
                                   **{**SMALL, **program, **extra})
    assert created.restart_policy is not None and created.restart_policy.policy == policy["policy"]
    return created.id


def blocked(found: Instance) -> str | None:
    return found.restart_status.blocked_reason if found.restart_status else None


def attempts(found: Instance) -> int:
    return (found.restart_status.attempts or 0) if found.restart_status else 0


def test_on_failure_restarts_a_failing_program_until_max_attempts(sdk: Hypeman) -> None:
    instance = create(sdk, "fails", shell("exit 1"),
                      {"policy": "on_failure", "backoff": "200ms", "max_attempts": 2})
    done = when(sdk, instance, lambda i: blocked(i) == "max_attempts_exceeded", "max_attempts_exceeded")
    status = done.restart_status
    assert status is not None and status.attempts == 2 and status.next_attempt_at is None
    assert status.last_attempt_at is not None and status.last_reason is None
    assert done.state == "Stopped" and done.exit_code == 1
    assert boots(sdk, instance) == 3  # the first run and two restarts, through the normal start path


def test_on_failure_leaves_a_clean_exit_and_always_restarts_it(sdk: Hypeman) -> None:
    clean = create(sdk, "clean-exit", shell("exit 0"), {"policy": "on_failure", "backoff": "0s"})
    always = create(sdk, "always", shell("exit 0"),
                    {"policy": "always", "backoff": "200ms", "max_attempts": 1})
    done = when(sdk, always, lambda i: blocked(i) == "max_attempts_exceeded", "always restarted once")
    assert attempts(done) == 1 and done.exit_code == 0 and boots(sdk, always) == 2
    # The clean exit is not a failure: never restarted (its exit was recorded before the other
    # instance's two boots were over; the status stays empty).
    stopped = when(sdk, clean, lambda i: i.state == "Stopped", "the clean exit")
    assert stopped.exit_code == 0
    assert stopped.restart_status is None and boots(sdk, clean) == 1


def test_a_manual_stop_blocks_restarts_until_a_manual_start(sdk: Hypeman) -> None:
    instance = create(sdk, "blocked", shell("sleep 8; exit 1"), {"policy": "on_failure", "backoff": "200ms"})
    restarted = when(sdk, instance, lambda i: attempts(i) >= 1 and i.state == "Running", "a first restart")
    sdk.instances.stop(instance)
    stopped = sdk.instances.get(instance)
    assert blocked(stopped) == "manual_stop" and stopped.state == "Stopped"
    assert stopped.restart_status is not None and stopped.restart_status.next_attempt_at is None
    count = boots(sdk, instance)
    # Many backoffs later it is still stopped, with no boot since.
    time.sleep(3)
    assert sdk.instances.get(instance).state == "Stopped" and boots(sdk, instance) == count
    assert restarted.restart_status is not None
    sdk.instances.start(instance)
    started = sdk.instances.get(instance)
    assert started.restart_status is None  # a manual start clears the count and the block
    # The next failure is restarted again.
    when(sdk, instance, lambda i: attempts(i) >= 1 and boots(sdk, instance) > count + 1,
         "a restart after the start")


def test_unhealthy_is_stopped_and_started_under_on_failure(sdk: Hypeman) -> None:
    # The start period forgives the refusals before httpd listens; it ends at the first healthy.
    check = {"type": "http", "interval": "500ms", "timeout": "2s", "start_period": "2m",
             "failure_threshold": 2, "http": {"port": 80}}
    instance = create(sdk, "sick-web", shell("httpd -p 80 -h /www; exec sleep 100000"),
                      {"policy": "on_failure", "backoff": "200ms"}, health_check=check)
    healthy = when(sdk, instance, lambda i: health_of(i) == "healthy", "healthy")
    assert healthy.restart_status is None
    assert guest_sh(sdk, instance, "killall httpd")[0] == 0
    again = when(sdk, instance,
                 lambda i: attempts(i) == 1 and i.state == "Running" and health_of(i) == "healthy",
                 "restarted and healthy again")
    status = again.restart_status
    assert status is not None and status.last_reason == "health_check_failed"
    assert status.blocked_reason is None
    assert again.started_at is not None and healthy.started_at is not None
    assert again.started_at > healthy.started_at
    assert boots(sdk, instance) == 2


def test_a_pending_restart_survives_a_server_sigkill_and_happens_once(harness: Harness) -> None:
    server = harness.start()
    demo.install(server.base_url, server.token, wait_seconds=300)
    with strict_client(server) as sdk:
        instance = create(sdk, "pending", shell("exit 1"),
                          {"policy": "on_failure", "backoff": "30s", "max_attempts": 1})
        pending = when(sdk, instance, lambda i: i.restart_status is not None
                       and i.restart_status.next_attempt_at is not None, "a pending restart")
        assert pending.restart_status is not None
        due = pending.restart_status.next_attempt_at
        assert pending.restart_status.attempts == 0 and boots(sdk, instance) == 1
    server.process.kill()
    server.process.wait()
    server = harness.start(server.data_dir)
    with strict_client(server) as sdk:
        resumed = sdk.instances.get(instance)
        status = resumed.restart_status
        if status is not None and status.next_attempt_at is not None:
            assert status.next_attempt_at == due  # the same countdown, not a new one
        done = when(sdk, instance, lambda i: blocked(i) == "max_attempts_exceeded",
                    "the one restart, then the block")
        status = done.restart_status
        assert status is not None and status.attempts == 1
        assert status.last_attempt_at is not None and due is not None and status.last_attempt_at >= due
        assert boots(sdk, instance) == 2
        until(lambda: sdk.instances.get(instance).state == "Stopped", "stopped")
