"""The shapes of builds and builders: the API's (``hypeman.types.Build``, ``BuildEvent``,
``Builder`` in the official SDK 0.28.0) and the records kept on disk.

A build's record is the one owner of its state; the API's ``Build`` is the record plus what only
the running server knows (``queue_position``), and a builder's ``active_build_id`` and
``queued_builds`` are derived from the builds, never stored with the builder.
"""

from __future__ import annotations

import enum
import re
import secrets
import string
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hypemand.images.errors import InvalidName
from hypemand.images.reference import (
    DEFAULT_DOMAIN,
    DEFAULT_TAG,
    NAME_TOTAL_LENGTH_MAX,
    SHA256_DIGEST_RE,
    TAG_RE,
    parse_reference,
    validate_repository_path,
)
from hypemand.tags import check_tags
from hypemand.wire import WireModel

# The reference's policy defaults (hypeman-behaviour.md §5.8).
DEFAULT_TIMEOUT_SECONDS = 600
DEFAULT_MEMORY_MB = 2048
DEFAULT_CPUS = 2
MAX_TIMEOUT_SECONDS = 24 * 3600
MIN_MEMORY_MB = 256
MAX_MEMORY_MB = 64 * 1024
MAX_CPUS = 64
DEFAULT_BUILDER_DISK_GB = 10
MAX_BUILDER_DISK_GB = 1024
# A secret's id names a file in the server's secret directory and a `--mount=type=secret,id=`.
SECRET_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# A caller-chosen builder id is one path component under builders/ (the volume id rule).
BUILDER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
ID_RULE = "must be 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit"
# The server's own images (the builder, the tests' Debian) are ``hypeman/...``: no build may
# replace one.
SYSTEM_NAMESPACE = "hypeman/"
MAX_IMAGE_NAME = NAME_TOTAL_LENGTH_MAX + 1 + 128  # a repository, ':' and a tag


def split_image_name(name: str) -> tuple[str, str]:
    """``team/app:v1`` -> (``team/app``, ``v1``); no tag -> ``latest``."""
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1:]
    return name, DEFAULT_TAG


def check_image_name(name: str) -> str:
    """A build's ``image_name``: a repository as a ``/v2`` push names it, with an optional
    ``:tag`` of the push's tag grammar, outside :data:`SYSTEM_NAMESPACE`. ValueError otherwise."""
    if len(name) > MAX_IMAGE_NAME:
        raise ValueError(f"longer than {MAX_IMAGE_NAME} characters")
    repository, tag = split_image_name(name)
    try:
        validate_repository_path(repository)
    except InvalidName as exc:
        raise ValueError(str(exc)) from None
    if not TAG_RE.fullmatch(tag):
        raise ValueError(f"{tag!r} is not a tag (1-128 letters, digits, '_', '.' or '-', "
                         "not starting with '.' or '-')")
    normalised = parse_reference(repository)  # docker.io/hypeman/x is hypeman/x
    if normalised.domain == DEFAULT_DOMAIN and normalised.path.startswith(SYSTEM_NAMESPACE):
        raise ValueError(f"{SYSTEM_NAMESPACE}... names are the server's own images; choose another name")
    return name


def new_id() -> str:
    """24 lowercase alphanumerics starting with a letter, like the reference's CUID2 ids."""
    alphabet = string.ascii_lowercase + string.digits
    return secrets.choice(string.ascii_lowercase) + "".join(secrets.choice(alphabet) for _ in range(23))


class BuildStatus(enum.StrEnum):
    QUEUED = "queued"
    BUILDING = "building"
    PUSHING = "pushing"
    READY = "ready"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (BuildStatus.READY, BuildStatus.FAILED, BuildStatus.CANCELLED)


class BuilderStatus(enum.StrEnum):
    READY = "ready"
    PRUNING = "pruning"
    DELETING = "deleting"
    ERROR = "error"


class BuildProvenance(WireModel):
    base_image_digest: str | None = None
    buildkit_version: str | None = None  # here: the builder's version ("buildah 1.28.2")
    lockfile_hashes: dict[str, str] | None = None
    source_hash: str | None = None
    timestamp: datetime | None = None


class SecretRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str

    @field_validator("id")
    @classmethod
    def _id_ok(cls, value: str) -> str:
        if not SECRET_ID.fullmatch(value):
            raise ValueError(ID_RULE)
        return value


class BuildSpec(BaseModel):
    """What a client asked for (``BuildCreateParams`` less the source), validated."""

    model_config = ConfigDict(extra="forbid")

    dockerfile: str | None = None  # the form's Dockerfile; None: the one in the tarball
    base_image_digest: str | None = None
    builder_id: str | None = None
    cache_scope: str | None = None
    global_cache_key: str | None = None
    is_admin_build: bool = False
    image_name: str | None = None
    secrets: list[SecretRef] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: int = Field(default=DEFAULT_TIMEOUT_SECONDS, ge=1, le=MAX_TIMEOUT_SECONDS)
    memory_mb: int = Field(default=DEFAULT_MEMORY_MB, ge=MIN_MEMORY_MB, le=MAX_MEMORY_MB)
    cpus: int = Field(default=DEFAULT_CPUS, ge=1, le=MAX_CPUS)

    @field_validator("tags")
    @classmethod
    def _tags_ok(cls, value: dict[str, str]) -> dict[str, str]:
        return check_tags(value) or {}

    @field_validator("image_name")
    @classmethod
    def _image_name_ok(cls, value: str | None) -> str | None:
        return None if value is None else check_image_name(value)

    @field_validator("base_image_digest")
    @classmethod
    def _digest_ok(cls, value: str | None) -> str | None:
        if value is not None and not SHA256_DIGEST_RE.fullmatch(value):
            raise ValueError(f"{value[:100]!r} is not a digest: expected sha256:<64 lowercase hex>")
        return value


class BuildRecord(BaseModel):
    """``builds/<id>/build.json``: written atomically at each change of status."""

    id: str
    status: BuildStatus
    created_at: datetime
    spec: BuildSpec
    dockerfile_path: str = "Dockerfile"  # inside the source tree (when the form gave none)
    source_hash: str | None = None  # sha256:<hex> of the tarball as received
    base_images: list[str] = Field(default_factory=list)  # the FROM references, as resolved
    base_image_digest: str | None = None  # the first stage's base, by manifest digest
    image_repository: str | None = None  # where the result goes in /v2 (builds/<id> or image_name)
    image_tag: str = "latest"
    started_at: datetime | None = None
    completed_at: datetime | None = None
    builder_instance_id: str | None = None
    image_digest: str | None = None
    image_ref: str | None = None
    error: str | None = None
    builder_version: str | None = None
    lockfile_hashes: dict[str, str] = Field(default_factory=dict)
    recoveries: int = 0  # times a server restart found it running and queued it again


class Build(WireModel):
    id: str
    created_at: datetime
    status: BuildStatus
    builder_id: str | None = None
    builder_instance_id: str | None = None
    completed_at: datetime | None = None
    duration_ms: int | None = None
    error: str | None = None
    image_digest: str | None = None
    image_ref: str | None = None
    provenance: BuildProvenance | None = None
    queue_position: int | None = None
    started_at: datetime | None = None
    tags: dict[str, str] = Field(default_factory=dict)


class BuildEventType(enum.StrEnum):
    LOG = "log"
    STATUS = "status"
    HEARTBEAT = "heartbeat"


class BuildEvent(WireModel):
    timestamp: datetime
    type: BuildEventType
    content: str | None = None
    status: BuildStatus | None = None


class CreateBuilderRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    name: str | None = Field(default=None, min_length=1, max_length=255)
    disk_size_gb: int | None = Field(default=None, ge=1, le=MAX_BUILDER_DISK_GB, strict=True)
    tags: dict[str, str] | None = None

    @field_validator("id")
    @classmethod
    def _id_ok(cls, value: str | None) -> str | None:
        if value is not None and not BUILDER_ID.fullmatch(value):
            raise ValueError(ID_RULE)
        return value

    @field_validator("tags")
    @classmethod
    def _tags_ok(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_tags(value)


class BuilderRecord(BaseModel):
    """``builders/<id>/builder.json``."""

    id: str
    name: str | None = None
    disk_size_gb: int
    tags: dict[str, str] = Field(default_factory=dict)
    created_at: datetime
    last_used_at: datetime | None = None
    status: BuilderStatus = BuilderStatus.READY
    error: str | None = None


class Builder(WireModel):
    id: str
    created_at: datetime
    disk_size_gb: int
    max_concurrency: int = 1
    queued_builds: list[str] = Field(default_factory=list)
    status: BuilderStatus
    active_build_id: str | None = None
    last_used_at: datetime | None = None
    name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
