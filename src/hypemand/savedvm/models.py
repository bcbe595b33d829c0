"""The stored shapes of a saved VM: its standby record and its compression settings."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from hypemand.savedvm.codec import Compression


class SnapshotCompressionConfig(BaseModel):
    """The API's compression setting (``SnapshotCompressionConfig`` in the SDK), as asked for;
    :func:`hypemand.savedvm.codec.normalize` turns it into an effective :class:`Compression`."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool
    # Any case on the way in ("ZSTD"); stored and answered normalized (see savedvm.codec).
    algorithm: str | None = None
    level: int | None = None


class CompressionPlan(BaseModel):
    """How and when to compress a saved VM's memory in the background."""

    compression: Compression
    delay_seconds: float = 0.0


class StandbyRecord(BaseModel):
    """``standby.json``: written last by a standby, removed first by a restore, so its presence
    is what makes an instance ``Standby``. It lets a restore check what it is about to load."""

    created_at: datetime
    state_digest: str
    memory_size: int
    qemu_version: str
    compression: CompressionPlan | None = None
