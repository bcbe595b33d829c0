"""What the server's own OCI registry (``/v2``) keeps: blob upload sessions and pushed manifests.

Nothing here knows HTTP. ``api/registry.py`` turns requests into calls on :class:`RegistryService`
and :class:`RegistryError` into the OCI distribution error shape.

On disk (all under ``<data_dir>/images/``, so an upload's data file can be renamed into the
blob store without copying):

- ``uploads/<uuid>/session.json`` and ``uploads/<uuid>/data``: one blob upload in progress. The
  data file grows with every PATCH; its size *is* the upload offset, so an upload survives a
  server restart and a client can resume after an interrupted chunk by asking for the offset.
- ``registry/<repository>/_manifests/revisions/sha256/<hex>.json``: a manifest pushed to this
  repository (its media type and size; the bytes themselves are a blob in the blob store).
- ``registry/<repository>/_manifests/tags/<tag>.json``: the digest a tag points at.

Repository path components can never start with ``_`` (see :data:`REPOSITORY_RE`), so the
``_manifests`` directory cannot collide with a nested repository name.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from pydantic import BaseModel

from hypemand.errors import DomainError
from hypemand.fsutil import read_json, write_atomic, write_model_atomic
from hypemand.images.blobs import sha256_digest
from hypemand.images.media_types import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
)

log = logging.getLogger(__name__)

# OCI distribution spec name/reference grammar; always used with fullmatch (``$`` would let a
# trailing newline through).
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
MAX_REPOSITORY_LENGTH = 255

# Abandoned uploads are removed when they have not been touched for this long.
STALE_UPLOAD_SECONDS = 24 * 3600
WRITE_BUFFER_BYTES = 1024 * 1024



class RegistryError(DomainError):
    """An error of the registry protocol; ``code`` is the OCI error code (``BLOB_UNKNOWN`` ...)."""

    def __init__(self, status: int, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message, code)
        self.status = status
        self.detail = detail


class UploadRangeError(RegistryError):
    """A chunk does not start where the upload currently ends (HTTP 416)."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(416, "BLOB_UPLOAD_INVALID", message)
        self.size = size


def blob_unknown(digest: str) -> RegistryError:
    return RegistryError(404, "BLOB_UNKNOWN", f"blob unknown to registry: {digest}", {"digest": digest})


class BlobStoreLike(Protocol):
    """The part of the image store's ``BlobStore`` that the registry uses."""

    def path(self, digest: str) -> Path: ...

    def has(self, digest: str) -> bool: ...

    def temp_path(self) -> Path: ...

    def commit_file(self, tmp: Path, expected_digest: str, *, computed_digest: str | None = None) -> Path: ...


class ManifestImporter(Protocol):
    """The image service: turns a pushed manifest into an image (queued conversion, no pull)."""

    def import_manifest(self, repository: str, reference: str, manifest: bytes, media_type: str) -> Any: ...


def validate_repository(name: str) -> str:
    if len(name) > MAX_REPOSITORY_LENGTH or not REPOSITORY_RE.fullmatch(name):
        raise RegistryError(400, "NAME_INVALID", f"invalid repository name: {name!r}", {"name": name})
    return name


def validate_digest(digest: str) -> str:
    if not DIGEST_RE.fullmatch(digest):
        raise RegistryError(400, "DIGEST_INVALID", f"unsupported or malformed digest: {digest!r}",
                            {"digest": digest})
    return digest


def is_digest(reference: str) -> bool:
    return reference.startswith("sha256:") or ":" in reference


def parse_content_range(value: str) -> tuple[int, int]:
    """``Content-Range`` of a chunk: ``<start>-<end>`` (inclusive); ``bytes`` prefixes are tolerated."""
    match = re.fullmatch(r"\s*(?:bytes[ =])?\s*(\d+)-(\d+)(?:/(?:\d+|\*))?\s*", value)
    if not match:
        raise RegistryError(400, "BLOB_UPLOAD_INVALID", f"malformed Content-Range: {value!r}")
    start, end = int(match.group(1)), int(match.group(2))
    if end < start:
        raise RegistryError(400, "BLOB_UPLOAD_INVALID", f"Content-Range ends before it starts: {value!r}")
    return start, end


def range_header(size: int) -> str:
    """The ``Range`` response header for an upload holding ``size`` bytes.

    Inclusive end offset, as the distribution registry sends it (``0-0`` when empty).
    """
    return f"0-{max(size - 1, 0)}"


class _RunningHash:
    """sha256 of an upload's data so far, kept while the chunks arrive in order in this process,
    so that completing a large upload does not read it back. Lost on restart: then the blob
    store hashes the file."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, handle: IO[bytes], data: bytearray) -> None:
        handle.write(data)
        self.hasher.update(data)
        self.size += len(data)


@dataclass(frozen=True)
class Chunk:
    """One request body appended to an upload."""

    body: AsyncIterator[bytes]
    content_range: tuple[int, int] | None = None
    content_length: int | None = None


class UploadSession(BaseModel):
    id: str
    repository: str
    started_at: datetime


class ManifestRevision(BaseModel):
    digest: str
    media_type: str
    size: int


class TagRecord(BaseModel):
    digest: str


class RegistryService:
    """Upload sessions, pushed manifests and tags of the server's own registry."""

    def __init__(self, images_dir: Path, blobs: BlobStoreLike, importer: ManifestImporter | None) -> None:
        self.uploads_dir = images_dir / "uploads"
        self.repositories_dir = images_dir / "registry"
        self.blobs = blobs
        self.importer = importer
        self._locks: dict[str, asyncio.Lock] = {}
        # Pushes of one repository are serialised so that the /v2 tag and the image name that
        # import_manifest moves always end on the same digest, whichever push came last.
        self._manifest_locks: dict[str, asyncio.Lock] = {}
        self._hashes: dict[str, _RunningHash] = {}
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.repositories_dir.mkdir(parents=True, exist_ok=True)

    # -- blobs ---------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        validate_digest(digest)
        if not self.blobs.has(digest):
            raise blob_unknown(digest)
        return self.blobs.path(digest)

    def has_blob(self, digest: str) -> bool:
        return bool(DIGEST_RE.fullmatch(digest)) and self.blobs.has(digest)

    # -- upload sessions -----------------------------------------------------------------

    def start_upload(self, repository: str) -> UploadSession:
        validate_repository(repository)
        self.purge_stale_uploads()
        session = UploadSession(id=str(uuid.uuid4()), repository=repository, started_at=datetime.now(UTC))
        directory = self.uploads_dir / session.id
        directory.mkdir(parents=True)
        (directory / "data").touch()
        write_model_atomic(directory / "session.json", session)
        self._hashes[session.id] = _RunningHash()
        return session

    def get_upload(self, repository: str, upload_id: str) -> UploadSession:
        unknown = RegistryError(404, "BLOB_UPLOAD_UNKNOWN", f"blob upload unknown: {upload_id}")
        try:
            parsed = uuid.UUID(upload_id)
        except ValueError:
            raise unknown from None
        path = self.uploads_dir / str(parsed) / "session.json"
        if not path.exists():
            raise unknown
        session = UploadSession.model_validate(read_json(path))
        if session.repository != repository:
            raise unknown
        return session

    def upload_size(self, session: UploadSession) -> int:
        return self._data_path(session).stat().st_size

    async def upload_status(self, session: UploadSession) -> int:
        """The upload's current size, after any chunk still being written has finished."""
        async with self._lock(session):
            return self.upload_size(session)

    async def append_chunk(self, session: UploadSession, chunk: Chunk) -> int:
        """Append a PATCH body; returns the upload's new size."""
        async with self._lock(session):
            await self._append(session, chunk)
            return self.upload_size(session)

    async def complete_upload(self, session: UploadSession, digest: str, chunk: Chunk | None) -> str:
        """Append the final (optional) chunk, verify the digest and move the data into the blob store.

        On a digest mismatch the upload is discarded, as the distribution registry does: nothing
        is committed and the client has to start again.
        """
        validate_digest(digest)
        async with self._lock(session):
            if chunk is not None:
                await self._append(session, chunk)
            data = self._data_path(session)
            running = self._hashes.pop(session.id, None)
            computed = None
            if running is not None and running.size == data.stat().st_size:
                computed = "sha256:" + running.hasher.hexdigest()
            try:
                await asyncio.to_thread(self.blobs.commit_file, data, digest, computed_digest=computed)
            except DomainError as exc:
                self._discard(session)
                if exc.code.lower() == "digest_invalid":
                    raise RegistryError(400, "DIGEST_INVALID", str(exc), {"digest": digest}) from exc
                raise
            self._discard(session)
        self._locks.pop(session.id, None)
        return digest

    async def cancel_upload(self, session: UploadSession) -> None:
        async with self._lock(session):
            self._discard(session)
        self._locks.pop(session.id, None)

    async def mount_or_start(self, repository: str, digest: str) -> UploadSession | None:
        """Cross-repository mount: every blob is visible to every repository here, so a mount
        succeeds exactly when the blob exists (``None``); otherwise a normal upload starts."""
        validate_repository(repository)
        if self.has_blob(digest):
            return None
        return self.start_upload(repository)

    def purge_stale_uploads(self, max_age: float = STALE_UPLOAD_SECONDS) -> None:
        cutoff = time.time() - max_age
        for directory in self.uploads_dir.iterdir():
            lock = self._locks.get(directory.name)
            if lock is not None and lock.locked():
                continue
            try:
                touched = max(p.stat().st_mtime for p in [directory, *directory.iterdir()])
            except (FileNotFoundError, ValueError):
                continue
            if touched < cutoff:
                log.info("removing abandoned upload %s", directory.name)
                shutil.rmtree(directory, ignore_errors=True)
                self._locks.pop(directory.name, None)
                self._hashes.pop(directory.name, None)

    def _data_path(self, session: UploadSession) -> Path:
        return self.uploads_dir / session.id / "data"

    def _discard(self, session: UploadSession) -> None:
        self._hashes.pop(session.id, None)
        shutil.rmtree(self.uploads_dir / session.id, ignore_errors=True)

    def _lock(self, session: UploadSession) -> asyncio.Lock:
        return self._locks.setdefault(session.id, asyncio.Lock())

    async def _append(self, session: UploadSession, chunk: Chunk) -> None:
        path = self._data_path(session)
        if not path.exists():
            raise RegistryError(404, "BLOB_UPLOAD_UNKNOWN", f"blob upload unknown: {session.id}")
        offset = path.stat().st_size
        expected: int | None = None
        if chunk.content_range is not None:
            start, end = chunk.content_range
            if start != offset:
                raise UploadRangeError(f"chunk starts at {start}, upload holds {offset} bytes", offset)
            expected = end - start + 1
            if chunk.content_length is not None and chunk.content_length != expected:
                raise RegistryError(400, "BLOB_UPLOAD_INVALID",
                                    f"Content-Length {chunk.content_length} does not match Content-Range")
        running = self._hashes.get(session.id)
        if running is not None and running.size != offset:
            del self._hashes[session.id]
            running = None
        written = await _stream_to_file(path, chunk.body, running or _RunningHash())
        if expected is not None and written != expected:
            # A complete request whose body disagrees with its range: undo it. (An interrupted
            # request never gets here; what did arrive is kept so that the client can resume.)
            await asyncio.to_thread(_truncate, path, offset)
            self._hashes.pop(session.id, None)
            raise UploadRangeError(f"chunk has {written} bytes, Content-Range says {expected}", offset)

    # -- manifests -----------------------------------------------------------------------

    async def put_manifest(self, repository: str, reference: str, body: bytes,
                           content_type: str | None) -> ManifestRevision:
        """Store a pushed manifest, point the tag at it and hand it to the image service."""
        validate_repository(repository)
        digest = sha256_digest(body)
        if is_digest(reference):
            validate_digest(reference)
            if reference != digest:
                raise RegistryError(400, "DIGEST_INVALID",
                                    f"manifest digest is {digest}, not {reference}", {"digest": reference})
        elif not TAG_RE.fullmatch(reference):
            raise RegistryError(400, "TAG_INVALID", f"invalid tag: {reference!r}", {"tag": reference})
        if len(body) > MAX_MANIFEST_BYTES:
            raise RegistryError(413, "SIZE_INVALID", f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
        media_type = self._check_manifest(repository, body, content_type)

        if not self.blobs.has(digest):
            tmp = self.blobs.temp_path()
            await asyncio.to_thread(write_atomic, tmp, body)
            await asyncio.to_thread(self.blobs.commit_file, tmp, digest)
        revision = ManifestRevision(digest=digest, media_type=media_type, size=len(body))
        repo_dir = self._repo_dir(repository)
        async with self._manifest_locks.setdefault(repository, asyncio.Lock()):
            write_model_atomic(repo_dir / "revisions" / "sha256" / f"{digest[7:]}.json", revision)
            if not is_digest(reference):
                write_model_atomic(repo_dir / "tags" / f"{reference}.json", TagRecord(digest=digest))
            if self.importer is not None:
                result = self.importer.import_manifest(repository, reference, body, media_type)
                if inspect.isawaitable(result):
                    await result
        return revision

    def get_manifest(self, repository: str, reference: str) -> tuple[ManifestRevision, Path]:
        validate_repository(repository)
        repo_dir = self._repo_dir(repository)
        if is_digest(reference):
            validate_digest(reference)
            digest = reference
        else:
            tag_path = repo_dir / "tags" / f"{reference}.json"
            if not TAG_RE.fullmatch(reference) or not tag_path.exists():
                raise _manifest_unknown(repository, reference)
            digest = TagRecord.model_validate(read_json(tag_path)).digest
        revision_path = repo_dir / "revisions" / "sha256" / f"{digest[7:]}.json"
        if not revision_path.exists() or not self.blobs.has(digest):
            raise _manifest_unknown(repository, reference)
        return ManifestRevision.model_validate(read_json(revision_path)), self.blobs.path(digest)

    def tags(self, repository: str) -> list[str]:
        validate_repository(repository)
        tags_dir = self._repo_dir(repository) / "tags"
        if not tags_dir.is_dir():
            raise RegistryError(404, "NAME_UNKNOWN", f"repository not known: {repository}",
                                {"name": repository})
        return sorted(p.name.removesuffix(".json") for p in tags_dir.glob("*.json"))

    def _repo_dir(self, repository: str) -> Path:
        return self.repositories_dir / repository / "_manifests"

    def _check_manifest(self, repository: str, body: bytes, content_type: str | None) -> str:
        """Return the manifest's media type after checking that everything it references is here."""
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise RegistryError(400, "MANIFEST_INVALID", f"manifest is not JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
            raise RegistryError(400, "MANIFEST_INVALID", "only schemaVersion 2 manifests are supported")
        declared = doc.get("mediaType")
        header_type = (content_type or "").split(";")[0].strip()
        media_type = declared if isinstance(declared, str) and declared else header_type
        if not media_type:
            # OCI manifests may omit mediaType; the shape tells which kind it is.
            media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
        if media_type in MANIFEST_TYPES:
            config = doc.get("config")
            layers = doc.get("layers")
            if not isinstance(config, dict) or not isinstance(layers, list):
                raise RegistryError(400, "MANIFEST_INVALID", "image manifest needs config and layers")
            for descriptor in [config, *layers]:
                self._require_blob(descriptor, repository)
        elif media_type in INDEX_TYPES:
            manifests = doc.get("manifests")
            if not isinstance(manifests, list):
                raise RegistryError(400, "MANIFEST_INVALID", "index needs a manifests list")
            for descriptor in manifests:
                self._require_blob(descriptor, repository)
        else:
            raise RegistryError(400, "MANIFEST_INVALID", f"unsupported manifest media type: {media_type!r}")
        return media_type

    def _require_blob(self, descriptor: Any, repository: str) -> None:
        digest = descriptor.get("digest") if isinstance(descriptor, dict) else None
        if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
            raise RegistryError(400, "MANIFEST_INVALID", f"bad descriptor digest in manifest: {digest!r}")
        if not self.blobs.has(digest):
            raise RegistryError(400, "MANIFEST_BLOB_UNKNOWN",
                                f"manifest references {digest}, which was not pushed to {repository}",
                                {"digest": digest})


def _manifest_unknown(repository: str, reference: str) -> RegistryError:
    return RegistryError(404, "MANIFEST_UNKNOWN", f"manifest unknown: {repository}:{reference}",
                         {"name": repository, "reference": reference})


async def _stream_to_file(path: Path, body: AsyncIterator[bytes], running: _RunningHash) -> int:
    """Append a request body to ``path`` without holding it in memory; returns bytes written.

    Whatever arrived is written even if the body ends early (client gone), so an interrupted
    chunk leaves a consistent prefix that the client can resume after.
    """
    handle: IO[bytes] = await asyncio.to_thread(open, path, "ab")
    start = running.size
    buffer = bytearray()
    try:
        try:
            async for piece in body:
                buffer += piece
                if len(buffer) >= WRITE_BUFFER_BYTES:
                    await asyncio.to_thread(running.write, handle, buffer)
                    buffer = bytearray()
        finally:
            if buffer:
                await asyncio.to_thread(running.write, handle, buffer)
    finally:
        await asyncio.to_thread(handle.close)
    return running.size - start


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as handle:
        handle.truncate(size)
