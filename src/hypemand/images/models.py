"""Pydantic models of the images domain: one per concept.

``Image`` is the API shape and matches ``hypeman.types.Image`` (SDK 0.28.0) field for
field, so strict response validation passes. ``ContentRecord`` and ``NamePointer`` are the
on-disk records (see ``store.py``). ``ReadyImage`` is what the instance domain boots.
``ImageManifest`` and ``ImageIndex`` (with ``Descriptor`` and ``ManifestPlatform``) are the
shapes a pushed manifest must have (see ``manifests.py``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from hypemand.images.reference import SHA256_DIGEST_RE

ImageStatus = Literal["pending", "pulling", "converting", "ready", "failed"]
IN_PROGRESS: tuple[ImageStatus, ...] = ("pending", "pulling", "converting")


def utcnow() -> datetime:
    return datetime.now(UTC)


class RegistryCredentials(BaseModel):
    """Borrowed for one pull; kept in memory only, never written or logged."""

    username: str | None = None
    password: SecretStr | None = None
    registry_token: SecretStr | None = None

    @property
    def present(self) -> bool:
        return bool(self.username or self.password or self.registry_token)

    def fingerprint(self) -> tuple[str, str, str]:
        return (
            self.username or "",
            self.password.get_secret_value() if self.password else "",
            self.registry_token.get_secret_value() if self.registry_token else "",
        )


class CreateImageRequest(BaseModel):
    name: str
    platform: str | None = None
    credentials: RegistryCredentials | None = None
    tags: dict[str, str] | None = None


class TagImageRequest(BaseModel):
    target: str


class ImageConfig(BaseModel):
    """The parts of the OCI image config a VM needs to run the image as Docker would."""

    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: dict[str, str] | None = None
    working_dir: str | None = None
    user: str | None = None


class Image(BaseModel):
    """API model: ``GET /images/{name}`` and friends."""

    name: str
    digest: str
    status: ImageStatus
    created_at: datetime
    platform: str | None = None
    queue_position: int | None = None
    error: str | None = None
    size_bytes: int | None = None
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: dict[str, str] | None = None
    working_dir: str | None = None
    tags: dict[str, str] | None = None


class PullSource(BaseModel):
    """Where the content of a record comes from, to resume the job after a restart."""

    kind: Literal["registry", "push"]
    repository: str  # normalised, e.g. docker.io/library/alpine or 127.0.0.1:5000/team/app
    platform: str
    borrowed_credentials: bool = False


class ContentRecord(BaseModel):
    """One image content, keyed by its (platform-specific) manifest digest."""

    digest: str
    status: ImageStatus
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    source: PullSource
    manifest_media_type: str | None = None
    platform: str | None = None
    error: str | None = None
    size_bytes: int | None = None
    disk_format: str | None = None
    config: ImageConfig = Field(default_factory=ImageConfig)
    layers: list[str] = Field(default_factory=list)
    job_id: str = ""


class NamePointer(BaseModel):
    """A name (``repo:tag`` or ``repo@digest``) pointing at one content digest."""

    name: str
    digest: str
    created_at: datetime = Field(default_factory=utcnow)
    tags: dict[str, str] = Field(default_factory=dict)


class ReadyImage(BaseModel):
    """Everything needed to boot an image: its disk and how to run it."""

    name: str
    digest: str
    platform: str | None
    disk_path: Path
    disk_format: str
    size_bytes: int
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    working_dir: str | None = None
    user: str | None = None


# ---- pushed manifests (OCI image manifest / index, Docker schema 2 / manifest list) --------
#
# Validated strictly (no "5" for 5, no string for an object) and completely before anything of a
# push is stored, so that code reading a stored manifest can trust its shape. Unknown fields are
# allowed, as both specs require; the stored bytes are the client's, not a re-serialisation.


class _OciShape(BaseModel):
    # By alias only: ``media_type`` in a manifest must not stand in for ``mediaType``.
    model_config = ConfigDict(strict=True, extra="ignore")


class ManifestPlatform(_OciShape):
    """``platform`` of an index entry."""

    architecture: str
    os: str
    os_version: str | None = Field(default=None, alias="os.version")
    os_features: list[str] | None = Field(default=None, alias="os.features")
    variant: str | None = None
    features: list[str] | None = None


class Descriptor(_OciShape):
    """A reference to content by digest; only sha256 content can be stored here."""

    media_type: str = Field(alias="mediaType", min_length=1)
    digest: str = Field(pattern=rf"^{SHA256_DIGEST_RE.pattern}$")
    size: int = Field(ge=0)
    urls: list[str] | None = None
    annotations: dict[str, str] | None = None
    data: str | None = None
    artifact_type: str | None = Field(default=None, alias="artifactType")
    platform: ManifestPlatform | None = None


class ImageManifest(_OciShape):
    """One image: a config blob and its layers."""

    schema_version: Literal[2] = Field(alias="schemaVersion")
    media_type: str | None = Field(default=None, alias="mediaType")
    artifact_type: str | None = Field(default=None, alias="artifactType")
    config: Descriptor
    layers: list[Descriptor]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None


class ImageIndex(_OciShape):
    """Several manifests, usually one per platform."""

    schema_version: Literal[2] = Field(alias="schemaVersion")
    media_type: str | None = Field(default=None, alias="mediaType")
    artifact_type: str | None = Field(default=None, alias="artifactType")
    manifests: list[Descriptor]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None
