"""On-disk image records. All writes are atomic (temp file + fsync + rename).

Layout under ``<data_dir>/images/`` (``hypemand.layout.ImageStorePaths``)::

    blobs/sha256/<hex>            layers, configs and manifests (BlobStore, shared)
    blobs/tmp/                    partial downloads and uploads
    content/<hex>/record.json     ContentRecord of the manifest digest <hex>
    content/<hex>/rootfs.ext4     the read-only disk (or rootfs.erofs)
    content/<hex>/work/           scratch space of a running conversion
    names/<sha256(name)>.json     NamePointer: a name -> a manifest digest

Content is immutable once ready: a moving tag rewrites only its pointer, so a VM that
boots ``content/<hex>/rootfs.ext4`` never sees its disk change.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from pathlib import Path

from pydantic import ValidationError

from hypemand.fsutil import write_model_atomic
from hypemand.images.blobs import BlobStore
from hypemand.images.models import ContentRecord, NamePointer
from hypemand.layout import DELETING_PREFIX, ImageContentPaths, ImageStorePaths

log = logging.getLogger(__name__)


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


class ImageStore:
    def __init__(self, paths: ImageStorePaths) -> None:
        self.paths = paths
        self.blobs = BlobStore(paths.blobs)
        self._content = paths.contents
        self._names = paths.names
        self._content.mkdir(parents=True, exist_ok=True)
        self._names.mkdir(parents=True, exist_ok=True)

    # ---- content records -------------------------------------------------------------

    def content(self, digest: str) -> ImageContentPaths:
        return self.paths.content(_hex(digest))

    def disk_path(self, record: ContentRecord) -> Path:
        return self.content(record.digest).disk(record.disk_format or "ext4")

    def read_record(self, digest: str) -> ContentRecord | None:
        path = self.content(digest).record
        try:
            return ContentRecord.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValidationError:
            log.warning("ignoring unreadable image record %s", path)
            return None

    def write_record(self, record: ContentRecord) -> None:
        write_model_atomic(self.content(record.digest).record, record)

    def list_records(self) -> list[ContentRecord]:
        records = []
        for entry in sorted(self._content.iterdir()):
            record = self.read_record("sha256:" + entry.name)
            if record is not None:
                records.append(record)
        return records

    def remove_content(self, digest: str) -> None:
        # Rename first so a crash mid-delete never leaves a half-removed but valid record.
        content = self.content(digest)
        doomed = content.doomed
        with contextlib.suppress(FileNotFoundError):
            content.directory.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def clean_deleted(self) -> None:
        for leftover in self._content.glob(f"{DELETING_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    # ---- name pointers ---------------------------------------------------------------

    def _pointer_path(self, name: str) -> Path:
        return self.paths.name_pointer(hashlib.sha256(name.encode()).hexdigest()[:40])

    def read_pointer(self, name: str) -> NamePointer | None:
        try:
            pointer = NamePointer.model_validate_json(self._pointer_path(name).read_bytes())
        except (FileNotFoundError, ValidationError):
            return None
        return pointer if pointer.name == name else None

    def write_pointer(self, pointer: NamePointer) -> None:
        write_model_atomic(self._pointer_path(pointer.name), pointer)

    def delete_pointer(self, name: str) -> bool:
        path = self._pointer_path(name)
        if not path.exists():
            return False
        path.unlink()
        return True

    def list_pointers(self) -> list[NamePointer]:
        pointers = []
        for path in sorted(self._names.glob("*.json")):
            try:
                pointers.append(NamePointer.model_validate_json(path.read_bytes()))
            except (FileNotFoundError, ValidationError):
                continue
        return pointers
