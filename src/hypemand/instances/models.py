"""The instance domain's models: the stored record, and the API's request and response shapes.

Field names and enums follow the Hypeman API (``hypeman.types.Instance`` in the official SDK);
the record holds what the server must remember, and nothing that can be read from the host.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hypemand.hypervisor.base import Board
from hypemand.policies.models import (
    AutoStandbyMemory,
    AutoStandbyPolicy,
    HealthCheck,
    InstanceHealthStatus,
    RestartPolicy,
    RestartStatus,
)
from hypemand.savedvm.models import SnapshotCompressionConfig
from hypemand.tags import check_tags
from hypemand.wire import WireModel

NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
NAME_MAX = 63
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
# What the guest can take. The program's environment and arguments reach it through the config
# disk (guest/config_disk.py: at most 8 MiB) and then execve() in the guest, which refuses one
# string over 128 KiB (the kernel's MAX_ARG_STRLEN) and more than 2 MiB of them all (a quarter of
# the default 8 MiB stack). These leave a quarter of that for the image's own environment.
MAX_ENV = 1024
MAX_EXEC_STRING_BYTES = 128 * 1024 - 1  # one argument or "KEY=VALUE" as UTF-8, without its NUL
MAX_ENV_ENTRY_BYTES = MAX_EXEC_STRING_BYTES
MAX_ENV_TOTAL_BYTES = 1536 * 1024  # every "KEY=VALUE" with its NUL
MAX_ARGS_TOTAL_BYTES = 256 * 1024  # entrypoint and cmd together, each argument with its NUL


class InstanceState(StrEnum):
    CREATED = "Created"
    INITIALIZING = "Initializing"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"
    STOPPED = "Stopped"
    STANDBY = "Standby"
    UNKNOWN = "Unknown"


def validate_name(value: str) -> str:
    if len(value) > NAME_MAX or not NAME_PATTERN.fullmatch(value):
        raise ValueError(
            f"must be 1-{NAME_MAX} lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


def validate_tags(value: dict[str, str] | None) -> dict[str, str] | None:
    return check_tags(value)


def _shown(key: str) -> str:
    """A variable name for a message: names are not checked yet, so one may be huge."""
    return repr(key) if len(key) <= 64 else f"{key[:64]!r}... ({len(key)} characters)"


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def validate_env(value: dict[str, str] | None) -> dict[str, str] | None:
    """An instance's environment (a create's, or a merged update's): count, names, and the sizes
    the guest can take (see MAX_ENV_TOTAL_BYTES)."""
    if value is None:
        return None
    if len(value) > MAX_ENV:
        raise ValueError(f"at most {MAX_ENV} variables, not {len(value)}")
    total = 0
    for key, item in value.items():
        if not _ENV_KEY.match(key):
            raise ValueError(f"invalid environment variable name {_shown(key)}")
        if "\0" in item:
            raise ValueError(f"environment variable {_shown(key)} contains a NUL byte")
        entry = _utf8_size(key) + 1 + _utf8_size(item)
        if entry > MAX_ENV_ENTRY_BYTES:
            raise ValueError(f"environment variable {_shown(key)} is {entry} bytes; "
                             f"one may have at most {MAX_ENV_ENTRY_BYTES}")
        total += entry + 1
    if total > MAX_ENV_TOTAL_BYTES:
        raise ValueError(f"the environment is {total} bytes; at most {MAX_ENV_TOTAL_BYTES} are allowed")
    return value


def validate_arguments(value: list[str] | None) -> list[str] | None:
    """Entrypoint or cmd: each argument without NUL and of a size execve() takes in the guest."""
    for arg in value or []:
        if "\0" in arg:
            raise ValueError("arguments must not contain NUL bytes")
        size = _utf8_size(arg)
        if size > MAX_EXEC_STRING_BYTES:
            raise ValueError(f"an argument is {size} bytes; one may have at most {MAX_EXEC_STRING_BYTES}")
    return value


def validate_args(entrypoint: list[str] | None, cmd: list[str] | None) -> None:
    """Entrypoint and cmd together: a size the guest takes (see MAX_ARGS_TOTAL_BYTES)."""
    total = sum(_utf8_size(arg) + 1 for arg in [*(entrypoint or []), *(cmd or [])])
    if total > MAX_ARGS_TOTAL_BYTES:
        raise ValueError(
            f"entrypoint and cmd take {total} bytes; at most {MAX_ARGS_TOTAL_BYTES} are allowed"
        )


class SnapshotPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    compression: SnapshotCompressionConfig | None = None
    standby_compression_delay: str | None = None


class NetworkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    bandwidth_download: str | None = None
    bandwidth_upload: str | None = None
    egress: dict[str, Any] | None = None


# Fields of the API that later work will build: accepted in the schema so that a request using
# them gets a clear "not supported yet" instead of a generic unknown-field error.
UNSUPPORTED_CREATE_FIELDS = (
    "devices",
    "gpu",
    "credentials",
    "disk_io_bps",
)


class VolumeMountRequest(BaseModel):
    """One volume to attach at create (the SDK's ``VolumeMountParam``)."""

    model_config = ConfigDict(extra="forbid")

    volume_id: str = Field(min_length=1, max_length=512)
    mount_path: str = Field(min_length=1, max_length=4096)
    readonly: bool = False
    overlay: bool = False
    overlay_size: str | None = None


class AttachVolumeRequest(BaseModel):
    """``POST /instances/{id}/volumes/{volume_id}``: the SDK sends ``mount_path`` and
    ``readonly``; ``overlay`` and ``overlay_size`` are accepted too (as on create)."""

    model_config = ConfigDict(extra="forbid")

    mount_path: str = Field(min_length=1, max_length=4096)
    readonly: bool = False
    overlay: bool = False
    overlay_size: str | None = None


class VolumeMountRecord(BaseModel):
    """An attachment, kept only in the instance's record (a volume's ``attachments`` are derived
    from every instance's). ``overlay_bytes``: the size of the instance's private upper disk
    (``vol-overlays/<volume_id>.raw``) in overlay mode, else 0."""

    volume_id: str
    mount_path: str
    readonly: bool
    overlay: bool = False
    overlay_bytes: int = 0


class VolumeMount(WireModel):
    """An attachment as the API shows it (the SDK's ``VolumeMount``)."""

    volume_id: str
    mount_path: str
    readonly: bool
    overlay: bool
    overlay_size: str | None = None


class CreateInstanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    image: str = Field(min_length=1, max_length=512)
    vcpus: int = Field(default=2, ge=1, le=256)
    size: str = "1GB"
    hotplug_size: str | None = None
    overlay_size: str = "10GB"
    env: dict[str, str] | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    tags: dict[str, str] | None = None
    hypervisor: str | None = None
    platform: str | None = None
    network: NetworkRequest | None = None
    skip_guest_agent: bool = False
    skip_kernel_headers: bool = False
    ttl: str | None = None
    expires_at: datetime | None = None
    snapshot_policy: SnapshotPolicy | None = None
    volumes: list[VolumeMountRequest] | None = None
    devices: list[Any] | None = None
    gpu: dict[str, Any] | None = None
    health_check: HealthCheck | None = None
    restart_policy: RestartPolicy | None = None
    auto_standby: AutoStandbyPolicy | None = None
    credentials: dict[str, Any] | None = None
    disk_io_bps: str | None = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("tags")
    @classmethod
    def _tags_ok(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return validate_tags(value)

    @field_validator("env")
    @classmethod
    def _env_ok(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return validate_env(value)

    @field_validator("entrypoint", "cmd")
    @classmethod
    def _each_argument_ok(cls, value: list[str] | None) -> list[str] | None:
        return validate_arguments(value)

    @model_validator(mode="after")
    def _args_ok(self) -> CreateInstanceRequest:
        validate_args(self.entrypoint, self.cmd)
        return self

    @model_validator(mode="after")
    def _one_expiry(self) -> CreateInstanceRequest:
        if self.ttl is not None and self.expires_at is not None:
            raise ValueError("give ttl or expires_at, not both")
        return self


class UpdateInstanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    env: dict[str, str] | None = None
    ttl: str | None = None
    expires_at: datetime | None = None
    auto_standby: AutoStandbyPolicy | None = None
    health_check: HealthCheck | None = None
    restart_policy: RestartPolicy | None = None

    @field_validator("env")
    @classmethod
    def _env_ok(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return validate_env(value)

    @model_validator(mode="after")
    def _one_expiry(self) -> UpdateInstanceRequest:
        if self.ttl is not None and self.expires_at is not None:
            raise ValueError("give ttl or expires_at, not both")
        return self


class StartInstanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None

    @field_validator("entrypoint", "cmd")
    @classmethod
    def _each_argument_ok(cls, value: list[str] | None) -> list[str] | None:
        return validate_arguments(value)

    @model_validator(mode="after")
    def _args_ok(self) -> StartInstanceRequest:
        validate_args(self.entrypoint, self.cmd)
        return self


class InstanceNetwork(WireModel):
    NULLABLE = frozenset({"ip", "mac"})

    enabled: bool
    name: str = "default"
    ip: str | None = None
    mac: str | None = None
    bandwidth_download: str | None = None
    bandwidth_upload: str | None = None


class Instance(WireModel):
    """An instance as the API shows it: the record plus what was read from the host just now."""

    NULLABLE = frozenset({"expires_at", "exit_code", "started_at", "state_error", "stopped_at"})

    id: str
    name: str
    image: str
    state: InstanceState
    state_error: str | None = None
    created_at: datetime
    expires_at: datetime | None = None
    platform: str
    size: str
    hotplug_size: str | None = None
    overlay_size: str
    vcpus: int
    env: dict[str, str]
    tags: dict[str, str]
    network: InstanceNetwork
    hypervisor: Literal["qemu", "qemu-microvm"]
    started_at: datetime | None = None
    stopped_at: datetime | None = None
    exit_code: int | None = None
    exit_message: str | None = None
    has_snapshot: bool = False
    snapshot_policy: SnapshotPolicy | None = None
    current_phase: str
    current_phase_since: datetime
    phase_durations_ms: dict[str, int]
    volumes: list[VolumeMount] = Field(default_factory=list)
    health_check: HealthCheck | None = None
    health_status: InstanceHealthStatus | None = None
    restart_policy: RestartPolicy | None = None
    restart_status: RestartStatus | None = None
    auto_standby: AutoStandbyPolicy | None = None


class WaitForStateResponse(WireModel):
    state: InstanceState
    timed_out: bool
    state_error: str | None = None


class InstanceStats(WireModel):
    instance_id: str
    instance_name: str
    cpu_seconds: float
    memory_rss_bytes: int
    memory_vms_bytes: int
    network_rx_bytes: int
    network_tx_bytes: int
    allocated_vcpus: int
    allocated_memory_bytes: int
    memory_utilization_ratio: float | None = None


class GuestExitInfo(BaseModel):
    code: int
    message: str


class InstanceRecord(BaseModel):
    """``guests/<id>/instance.json``: what an instance is. Written atomically on every change;
    its state is never stored here, it is read from the host."""

    format_version: Literal[1] = 1
    id: str
    name: str
    image: str  # as the user named it
    image_digest: str  # the content it boots: re-tagging the name never changes the instance
    platform: str
    board: Board
    vcpus: int
    memory_bytes: int
    hotplug_bytes: int = 0
    overlay_bytes: int
    env: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    network_enabled: bool = True
    mac: str
    # The VM's address on the bridge network; None for no NIC or QEMU's user-mode NIC. Held (no
    # other VM may take it) only while the VM runs or is in standby: see instances/networking.py.
    ip: str | None = None
    # Bytes per second, resolved at create (the default share when none was asked for).
    bandwidth_download: int | None = None
    bandwidth_upload: int | None = None
    skip_guest_agent: bool = False
    stop_timeout: float = 5.0
    snapshot_policy: SnapshotPolicy | None = None
    expires_at: datetime | None = None
    created_at: datetime
    # False until the first boot launched: a server that died in between removes it at start.
    provisioned: bool = False
    started_at: datetime | None = None
    stopped_at: datetime | None = None
    # Where this boot's output starts in the console log (it is appended across boots).
    console_offset: int = 0
    # When the program started and the agent answered in this VM's life. A restore keeps them
    # (the same processes continue); a fresh boot clears them; a fork sets them only once its
    # new identity is in place, so it is not Running before.
    program_started_at: datetime | None = None
    agent_ready_at: datetime | None = None
    exit: GuestExitInfo | None = None
    # Why the VM ended abnormally (its VMM killed or failed, the guest kernel panicked); None for
    # a normal end. Shown as state_error (and exit_message, when the program left none).
    crash: str | None = None
    # A fork resumes another VM's memory: until the agent has given it its own randomness, MAC
    # and hostname, it must not be reported Running (set by the fork, cleared once done).
    identity_pending: bool = False
    phase: str = "created"
    phase_since: datetime
    phase_ms: dict[str, int] = Field(default_factory=dict)
    # Volumes attached, in the order the guest gets their disks (see instances/volumes.py).
    volumes: list[VolumeMountRecord] = Field(default_factory=list)
    # Policies (hypemand/policies): what the instance asked for, and the supervisors' own
    # bookkeeping that must survive a server restart.
    health_check: HealthCheck | None = None
    restart_policy: RestartPolicy | None = None
    restart_status: RestartStatus | None = None
    auto_standby: AutoStandbyPolicy | None = None
    auto_standby_memory: AutoStandbyMemory | None = None


class StandbyInstanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    compression: SnapshotCompressionConfig | None = None
    compression_delay: str | None = None
