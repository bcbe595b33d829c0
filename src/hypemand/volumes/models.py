"""The volume API's shapes (``hypeman.types.Volume`` in the official SDK) and the stored record.

A volume's attachments are not stored with it: they are the instance records' (one owner per
concept), so :class:`Volume` is a :class:`VolumeRecord` plus what the instance manager says.
"""

from __future__ import annotations

import re
import secrets
import string
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hypemand.errors import BadRequest
from hypemand.instances.models import validate_name
from hypemand.tags import check_tags
from hypemand.wire import WireModel

GIB = 1 << 30
# The largest volume: a sparse file this big takes ~60 MB of metadata and 0.2 s of mke2fs, and
# stays well below ext4's 16 TiB file-size limit on the data disk.
MAX_SIZE_GB = 4096
# A caller-chosen id is one path component under volumes/: letters, digits, '_', '-', '.', not
# starting with '.' (those names are the service's own: staging directories).
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ArchiveTooLarge(BadRequest):
    code = "archive_too_large"


def new_volume_id() -> str:
    """24 lowercase alphanumerics starting with a letter, like the reference's CUID2 ids."""
    alphabet = string.ascii_lowercase + string.digits
    return secrets.choice(string.ascii_lowercase) + "".join(secrets.choice(alphabet) for _ in range(23))


def check_volume_id(value: str) -> str:
    if not _ID.fullmatch(value):
        raise ValueError("must be 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit")
    return value


class VolumeAttachment(WireModel):
    instance_id: str
    mount_path: str
    readonly: bool


class VolumeRecord(BaseModel):
    """``volumes/<id>/volume.json``: written last when a volume is made, removed first when it goes."""

    id: str
    name: str
    size_gb: int
    tags: dict[str, str] = Field(default_factory=dict)
    created_at: datetime

    def to_wire(self, attachments: list[VolumeAttachment]) -> Volume:
        return Volume(id=self.id, name=self.name, size_gb=self.size_gb, tags=dict(self.tags),
                      created_at=self.created_at, attachments=attachments)


class Volume(WireModel):
    """``GET /volumes/{id}``."""

    id: str
    name: str
    size_gb: int
    tags: dict[str, str]
    created_at: datetime
    attachments: list[VolumeAttachment]


class CreateVolumeRequest(BaseModel):
    """``POST /volumes`` (JSON), and the query of ``POST /volumes/from-archive``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    size_gb: int = Field(ge=1, le=MAX_SIZE_GB, strict=True)
    id: str | None = None
    tags: dict[str, str] | None = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("id")
    @classmethod
    def _id_ok(cls, value: str | None) -> str | None:
        return None if value is None else check_volume_id(value)

    @field_validator("tags")
    @classmethod
    def _tags_ok(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return check_tags(value)

    @property
    def size_bytes(self) -> int:
        return self.size_gb * GIB
