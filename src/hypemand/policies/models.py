"""The policies an instance carries (health check, restart, auto-standby) and what the server
reports about them, in the SDK's shapes (``hypeman.types.HealthCheck``, ``RestartPolicy``,
``AutoStandbyPolicy``, ``InstanceHealthStatus``, ``RestartStatus``).

A policy is checked once, when a create or a PATCH gives it (400 naming the field, nothing
stored), and stored with every default filled in, so the API shows exactly what runs. Durations
keep the Go syntax the client wrote (``"10s"``); :func:`seconds` reads them.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hypemand.units import UnitError, parse_duration
from hypemand.wire import WireModel

MAX_PORT = 65535
MAX_THRESHOLD = 1000
MAX_POLICY_DURATION = 7 * 24 * 3600.0  # a week: anything longer is a typo, not a policy
MAX_GO_DURATION = (2**63 - 1) / 1e9  # seconds: the longest a Go time.Duration holds
MAX_ERROR_CHARS = 512  # last_error is truncated to this


def seconds(text: str) -> float:
    """A duration this module already validated, in seconds."""
    return parse_duration(text)


def duration_seconds(value: str, field: str, *, minimum: float = 0.0, allow_zero: bool = False,
                     maximum: float = MAX_GO_DURATION) -> float:
    """``value``, a Go duration, in seconds: positive (or 0 with ``allow_zero``), at least
    ``minimum`` and at most ``maximum``; otherwise a ValueError naming ``field``."""
    try:
        parsed = parse_duration(value)
    except UnitError as exc:
        raise ValueError(f"{field}: {exc}") from None
    if parsed == 0 and allow_zero:
        return parsed
    if parsed < minimum or parsed <= 0:
        shown = f"{minimum:g}s" if minimum else "0s"
        raise ValueError(f"{field} must be longer than {shown}, got {value!r}")
    if parsed > maximum:
        raise ValueError(f"{field} must be at most {int(maximum // 3600)}h, got {value!r}")
    return parsed


def _duration(value: str | None, field: str, *, minimum: float = 0.0, allow_zero: bool = False) -> str | None:
    if value is not None:
        duration_seconds(value, field, minimum=minimum, allow_zero=allow_zero, maximum=MAX_POLICY_DURATION)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _port(value: int) -> int:
    if not 1 <= value <= MAX_PORT:
        raise ValueError(f"port must be between 1 and {MAX_PORT}, got {value}")
    return value


class HealthCheckHTTP(_Strict):
    port: int
    path: str = "/"
    scheme: Literal["http", "https"] = "http"
    expected_status: int = 200

    @field_validator("port")
    @classmethod
    def _port_ok(cls, value: int) -> int:
        return _port(value)

    @field_validator("path")
    @classmethod
    def _path_ok(cls, value: str) -> str:
        if not value.startswith("/") or any(c in value for c in " \r\n\t") or len(value) > 2048:
            raise ValueError(f"path must be an absolute URL path without spaces, got {value[:80]!r}")
        return value

    @field_validator("expected_status")
    @classmethod
    def _status_ok(cls, value: int) -> int:
        if not 100 <= value <= 599:
            raise ValueError(f"expected_status must be an HTTP status (100-599), got {value}")
        return value


class HealthCheckTcp(_Strict):
    port: int

    @field_validator("port")
    @classmethod
    def _port_ok(cls, value: int) -> int:
        return _port(value)


class HealthCheckExec(_Strict):
    command: list[str] = Field(min_length=1, max_length=256)
    working_dir: str | None = None

    @field_validator("command")
    @classmethod
    def _command_ok(cls, value: list[str]) -> list[str]:
        if not value[0]:
            raise ValueError("command[0] must name a program")
        return value


class HealthCheck(_Strict, WireModel):
    """``health_check``: stored with the reference's defaults filled in."""

    type: Literal["none", "http", "tcp", "exec"] = "none"
    interval: str = "10s"
    timeout: str = "2s"
    start_period: str = "30s"
    failure_threshold: int = Field(default=3, ge=1, le=MAX_THRESHOLD)
    success_threshold: int = Field(default=1, ge=1, le=MAX_THRESHOLD)
    http: HealthCheckHTTP | None = None
    tcp: HealthCheckTcp | None = None
    exec: HealthCheckExec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> HealthCheck:
        _duration(self.interval, "interval", minimum=0.1)
        _duration(self.timeout, "timeout", minimum=0.01)
        _duration(self.start_period, "start_period", allow_zero=True)
        if self.type != "none" and getattr(self, self.type) is None:
            raise ValueError(f"type {self.type} needs its {self.type!r} settings")
        others = [kind for kind in ("http", "tcp", "exec") if kind != self.type and getattr(self, kind)]
        if others:
            raise ValueError(f"type {self.type} takes no {', '.join(others)} settings")
        return self

    @property
    def enabled(self) -> bool:
        return self.type != "none"


class RestartPolicy(_Strict, WireModel):
    """``restart_policy``: whole-instance supervision."""

    policy: Literal["never", "always", "on_failure"] = "never"
    backoff: str = "5s"
    max_attempts: int = Field(default=0, ge=0, le=1_000_000)  # 0: unlimited
    stable_after: str = "10m"

    @model_validator(mode="after")
    def _durations(self) -> RestartPolicy:
        _duration(self.backoff, "backoff", allow_zero=True)
        _duration(self.stable_after, "stable_after", minimum=1.0)
        return self


class AutoStandbyPolicy(_Strict, WireModel):
    """``auto_standby``: standby after ``idle_timeout`` without inbound TCP connections."""

    enabled: bool = False
    idle_timeout: str | None = None
    ignore_source_cidrs: list[str] = Field(default_factory=list, max_length=256)
    ignore_destination_ports: list[int] = Field(default_factory=list, max_length=256)

    @field_validator("ignore_source_cidrs")
    @classmethod
    def _cidrs_ok(cls, value: list[str]) -> list[str]:
        normalized = []
        for cidr in value:
            try:
                network = ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"ignore_source_cidrs: {cidr!r} is not a CIDR such as 10.0.0.0/8") from None
            normalized.append(str(network))
        return normalized

    @field_validator("ignore_destination_ports")
    @classmethod
    def _ports_ok(cls, value: list[int]) -> list[int]:
        return [_port(port) for port in value]

    @model_validator(mode="after")
    def _timeout(self) -> AutoStandbyPolicy:
        _duration(self.idle_timeout, "idle_timeout", minimum=1.0)
        if self.enabled and self.idle_timeout is None:
            raise ValueError("idle_timeout is required when auto_standby is enabled")
        return self


HealthState = Literal["disabled", "starting", "healthy", "unhealthy", "unknown"]


class InstanceHealthStatus(WireModel):
    """``health_status``: what the health monitor saw last (kept in memory only)."""

    status: HealthState
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_checked_at: datetime | None = None
    last_error: str | None = None
    last_failure_at: datetime | None = None
    last_success_at: datetime | None = None


class RestartStatus(WireModel):
    """``restart_status``: the restart supervisor's bookkeeping, kept in the instance's record so
    that a pending restart and the attempt count survive a server restart."""

    attempts: int = 0
    blocked_reason: Literal["manual_stop", "max_attempts_exceeded"] | None = None
    last_attempt_at: datetime | None = None
    last_reason: Literal["health_check_failed"] | None = None
    next_attempt_at: datetime | None = None


class AutoStandbyMemory(BaseModel):
    """What auto-standby remembers of an instance across server restarts (in its record)."""

    idle_since: datetime | None = None
    last_inbound_activity_at: datetime | None = None
    hold_until: datetime | None = None


AutoStandbyReason = Literal[
    "unsupported_platform",
    "policy_missing",
    "policy_disabled",
    "instance_not_running",
    "network_disabled",
    "missing_ip",
    "has_vgpu",
    "active_inbound_connections",
    "idle_timeout_not_elapsed",
    "observer_error",
    "ready_for_standby",
]
AutoStandbyState = Literal[
    "unsupported",
    "disabled",
    "ineligible",
    "active",
    "idle_countdown",
    "ready_for_standby",
    "standby_requested",
    "error",
]


class AutoStandbyStatus(WireModel):
    """``GET /instances/{id}/auto-standby/status``: what the auto-standby controller sees."""

    supported: bool
    configured: bool
    enabled: bool
    eligible: bool
    status: AutoStandbyState
    reason: AutoStandbyReason
    active_inbound_connections: int = 0
    tracking_mode: str
    idle_timeout: str | None = None
    idle_since: datetime | None = None
    last_inbound_activity_at: datetime | None = None
    next_standby_at: datetime | None = None
    countdown_remaining: str | None = None
    hold_until: datetime | None = None
