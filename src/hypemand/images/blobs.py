"""The content-addressed blob store shared by every image (layers, configs, manifests).

Layout (``hypemand.layout.BlobPaths``): ``<data_dir>/images/blobs/sha256/<hex>`` for committed
blobs and ``<data_dir>/images/blobs/tmp/`` for partial downloads and uploads. A blob only appears
under ``sha256/`` after its bytes were hashed and matched the expected digest, and it
appears by an atomic rename, so a reader never sees a partial or corrupt blob. The
``/v2`` push endpoints and the pull path write through the same two steps:
``temp_path()`` then ``commit_file()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path

from hypemand.fsutil import fsync_dir
from hypemand.images.errors import DigestInvalid
from hypemand.images.reference import validate_digest
from hypemand.layout import BlobPaths

_CHUNK = 1 << 20


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


class BlobStore:
    def __init__(self, paths: BlobPaths) -> None:
        self.paths = paths
        self._blobs = paths.committed
        self._tmp = paths.partials
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)

    def clean_partials(self) -> int:
        """Drop leftovers of transfers that a crash interrupted. Call once at start-up."""
        removed = 0
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def path(self, digest: str) -> Path:
        try:
            validate_digest(digest)
        except Exception as exc:
            raise DigestInvalid(str(exc)) from exc
        return self.paths.blob(digest.removeprefix("sha256:"))

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def read_bytes(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def temp_path(self) -> Path:
        """A fresh path on the same filesystem as the store, for a partial transfer."""
        return self.paths.partial(uuid.uuid4().hex)

    def commit_file(self, tmp: Path, expected_digest: str, *, computed_digest: str | None = None) -> Path:
        """Verify ``tmp`` hashes to ``expected_digest`` and move it into the store.

        ``computed_digest`` lets a caller that hashed while streaming skip the re-read.
        On mismatch ``tmp`` is deleted and :class:`DigestInvalid` (``digest_invalid``) raised.
        Blocking: call it through ``asyncio.to_thread`` from the event loop.
        """
        try:
            target = self.path(expected_digest)
            actual = computed_digest or file_digest(tmp)
            if actual != expected_digest:
                raise DigestInvalid(f"digest mismatch: expected {expected_digest}, got {actual}")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        fsync_dir(self._blobs)
        return target

    def write_bytes(self, data: bytes, expected_digest: str | None = None) -> str:
        """Store a small blob (manifest, config) held in memory; return its digest."""
        actual = sha256_digest(data)
        expected = expected_digest or actual
        if self.has(expected) and actual == expected:
            return actual
        tmp = self.temp_path()
        tmp.write_bytes(data)
        self.commit_file(tmp, expected, computed_digest=actual)
        return actual
