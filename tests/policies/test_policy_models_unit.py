"""The policies' shapes: defaults filled in, bad input refused with the field named."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from hypemand.instances.models import CreateInstanceRequest, UpdateInstanceRequest
from hypemand.policies.models import AutoStandbyPolicy, HealthCheck, RestartPolicy


def test_health_check_defaults_are_the_reference_s() -> None:
    check = HealthCheck.model_validate({"type": "http", "http": {"port": 8080}})
    assert (check.interval, check.timeout, check.start_period) == ("10s", "2s", "30s")
    assert (check.failure_threshold, check.success_threshold) == (3, 1)
    assert check.http is not None and (check.http.path, check.http.scheme, check.http.expected_status) == (
        "/", "http", 200)
    assert check.enabled and not HealthCheck().enabled


def test_restart_and_auto_standby_defaults() -> None:
    restart = RestartPolicy.model_validate({"policy": "on_failure"})
    assert (restart.backoff, restart.max_attempts, restart.stable_after) == ("5s", 0, "10m")
    standby = AutoStandbyPolicy.model_validate({"enabled": True, "idle_timeout": "5m",
                                                "ignore_source_cidrs": ["10.1.2.3/8"]})
    assert standby.ignore_source_cidrs == ["10.0.0.0/8"]


@pytest.mark.parametrize(
    ("field", "value", "mention"),
    [
        ("health_check", {"type": "http"}, "http"),
        ("health_check", {"type": "tcp", "tcp": {"port": 0}}, "port"),
        ("health_check", {"type": "tcp", "tcp": {"port": 22}, "interval": "soon"}, "interval"),
        ("health_check", {"type": "tcp", "tcp": {"port": 22}, "timeout": "0s"}, "timeout"),
        ("health_check", {"type": "tcp", "tcp": {"port": 22}, "failure_threshold": 0}, "failure_threshold"),
        ("health_check", {"type": "tcp", "tcp": {"port": 22}, "http": {"port": 80}}, "http"),
        ("health_check", {"type": "exec", "exec": {"command": []}}, "command"),
        ("health_check", {"type": "http", "http": {"port": 80, "expected_status": 42}}, "expected_status"),
        ("restart_policy", {"policy": "sometimes"}, "policy"),
        ("restart_policy", {"backoff": "-1s"}, "backoff"),
        ("restart_policy", {"max_attempts": -1}, "max_attempts"),
        ("auto_standby", {"enabled": True}, "idle_timeout"),
        ("auto_standby", {"enabled": True, "idle_timeout": "5x"}, "idle_timeout"),
        ("auto_standby", {"ignore_source_cidrs": ["10.0.0.0/33"]}, "ignore_source_cidrs"),
        ("auto_standby", {"ignore_destination_ports": [70000]}, "port"),
        ("auto_standby", {"surprise": 1}, "surprise"),
    ],
)
def test_bad_policies_are_refused_naming_the_field(field: str, value: dict[str, Any], mention: str) -> None:
    create = {"name": "web", "image": "img", field: value}
    for model, body in ((CreateInstanceRequest, create), (UpdateInstanceRequest, {field: value})):
        with pytest.raises(ValidationError) as refused:
            model.model_validate(body)
        assert mention in str(refused.value)
