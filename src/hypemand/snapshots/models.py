"""The snapshot domain's models: the API's shapes and the stored record."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from hypemand.instances.models import InstanceRecord, InstanceState, validate_name, validate_tags
from hypemand.savedvm.models import SnapshotCompressionConfig
from hypemand.wire import WireModel

SnapshotKind = Literal["Standby", "Stopped"]
CompressionState = Literal["none", "compressing", "compressed", "error"]
HypervisorName = Literal["qemu", "qemu-microvm"]


class Snapshot(WireModel):
    """``GET /snapshots/{id}``: every field is read from what is stored."""

    NULLABLE = frozenset({"compressed_size_bytes", "compression_error", "name", "uncompressed_size_bytes"})

    id: str
    name: str | None = None
    kind: SnapshotKind
    created_at: datetime
    size_bytes: int
    source_instance_id: str
    source_instance_name: str
    source_hypervisor: HypervisorName
    tags: dict[str, str] | None = None
    compression: SnapshotCompressionConfig | None = None
    compression_state: CompressionState = "none"
    compression_error: str | None = None
    compressed_size_bytes: int | None = None
    uncompressed_size_bytes: int | None = None


class SnapshotRecord(BaseModel):
    """``snapshots/<id>/snapshot.json``, written once the payload in ``guest/`` is complete (a
    directory without it is a snapshot that was never finished, removed at start)."""

    format_version: Literal[1] = 1
    snapshot: Snapshot
    # The source instance as it was: restore and fork rebuild the VM's settings from it.
    instance: InstanceRecord
    # Digest of every payload file's content, by file name (see hypemand.savedvm.digest);
    # checked before a restore or fork uses the files.
    digests: dict[str, str]
    qemu_version: str
    # The instance whose snapshot schedule made this snapshot (hypemand/policies/schedules.py);
    # None for a client's own. Only the schedule's retention deletes snapshots that carry it.
    scheduled_by: str | None = None


class CreateSnapshotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: SnapshotKind
    name: str | None = None
    tags: dict[str, str] | None = None
    compression: SnapshotCompressionConfig | None = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str | None) -> str | None:
        return validate_name(value) if value is not None else None

    @field_validator("tags")
    @classmethod
    def _tags_ok(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return validate_tags(value)


TargetState = Literal["Running", "Standby", "Stopped"]


class RestoreSnapshotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_state: InstanceState | None = None
    target_hypervisor: str | None = None


class ForkSnapshotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    target_state: InstanceState | None = None
    target_hypervisor: str | None = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        return validate_name(value)


class ForkInstanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    from_running: bool = False
    target_state: InstanceState | None = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        return validate_name(value)
