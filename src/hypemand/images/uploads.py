"""What the server's own OCI registry (``/v2``) keeps: blob upload sessions and pushed manifests.

Nothing here knows HTTP. ``api/registry.py`` turns requests into calls on :class:`RegistryService`
and :class:`DistributionError` into the OCI distribution error shape.

On disk (all under ``<data_dir>/images/``, so an upload's data file can be renamed into the
blob store without copying; see ``hypemand.layout.ImageStorePaths``):

- ``uploads/<uuid>/session.json`` and ``uploads/<uuid>/data``: one blob upload in progress. The
  data file grows with every PATCH; its size *is* the upload offset, so an upload survives a
  server restart and a client can resume after an interrupted chunk by asking for the offset.
- ``registry/<repository>/_manifests/revisions/sha256/<hex>.json``: a manifest pushed to this
  repository (its media type and size; the bytes themselves are a blob in the blob store).
- ``registry/<repository>/_manifests/tags/<tag>.json``: the digest a tag points at.

Repository path components can never start with ``_`` (see
:data:`hypemand.images.reference.REPOSITORY_PATH_RE`, the one grammar of repository names, tags
and digests), so the ``_manifests`` directory cannot collide with a nested repository name.

Every request is checked completely before anything is created: a refused request leaves no
upload directory, no manifest record and no tag behind. Uploads that are abandoned (untouched
for ``upload_max_age``, 24 h by default) are swept when the service starts and periodically
while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
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
from hypemand.images.errors import InvalidName
from hypemand.images.manifests import ManifestInvalid, ParsedManifest, parse_manifest
from hypemand.images.media_types import INDEX_TYPES, MANIFEST_TYPES, MAX_MANIFEST_BYTES
from hypemand.images.models import Descriptor, ImageIndex
from hypemand.images.reference import (
    SHA256_DIGEST_RE,
    TAG_RE,
    pushed_image_reference,
    validate_repository_path,
)
from hypemand.layout import ImageStorePaths, RepositoryPaths, UploadPaths

log = logging.getLogger(__name__)

# Abandoned uploads are removed when they have not been touched for this long (default).
DEFAULT_UPLOAD_MAX_AGE_SECONDS = 24 * 3600.0
# How often the running service looks for abandoned uploads, at most.
DEFAULT_SWEEP_INTERVAL_SECONDS = 3600.0
WRITE_BUFFER_BYTES = 1024 * 1024


class DistributionError(DomainError):
    """An error answered on ``/v2`` in the OCI distribution shape; ``code`` is the OCI error code
    (``BLOB_UNKNOWN`` ...). Not to be confused with ``images.errors.RegistryError``: a remote
    registry this server pulls from failed."""

    def __init__(self, status: int, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message, code)
        self.status = status
        self.detail = detail


class UploadRangeError(DistributionError):
    """A chunk does not start where the upload currently ends (HTTP 416)."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(416, "BLOB_UPLOAD_INVALID", message)
        self.size = size


def blob_unknown(digest: str) -> DistributionError:
    return DistributionError(404, "BLOB_UNKNOWN", f"blob unknown to registry: {digest}", {"digest": digest})


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
    """The repository grammar of ``reference.py`` (the same one pulls use), as a registry error."""
    try:
        return validate_repository_path(name)
    except InvalidName as exc:
        raise DistributionError(400, "NAME_INVALID", f"invalid repository name: {name!r} ({exc})",
                            {"name": name}) from exc


def validate_reference(repository: str, reference: str, manifest_digest: str | None = None) -> None:
    """A manifest reference: a tag, or a digest (which must be ``manifest_digest`` when given).

    Also checks that the image the push would create has a valid name, so that the import after
    the manifest is stored cannot refuse the name.
    """
    if is_digest(reference):
        validate_digest(reference)
        if manifest_digest is not None and reference != manifest_digest:
            message = f"manifest digest is {manifest_digest}, not {reference}"
            raise DistributionError(400, "DIGEST_INVALID", message, {"digest": reference})
    elif not TAG_RE.fullmatch(reference):
        raise DistributionError(400, "TAG_INVALID", f"invalid tag: {reference!r}", {"tag": reference})
    try:
        pushed_image_reference(repository, reference)
    except InvalidName as exc:
        raise DistributionError(400, "NAME_INVALID", str(exc), {"name": repository}) from exc


def validate_digest(digest: str) -> str:
    if not SHA256_DIGEST_RE.fullmatch(digest):
        raise DistributionError(400, "DIGEST_INVALID", f"unsupported or malformed digest: {digest!r}",
                            {"digest": digest})
    return digest


def is_digest(reference: str) -> bool:
    return reference.startswith("sha256:") or ":" in reference


def parse_content_range(value: str) -> tuple[int, int]:
    """``Content-Range`` of a chunk: ``<start>-<end>`` (inclusive); ``bytes`` prefixes are tolerated."""
    match = re.fullmatch(r"\s*(?:bytes[ =])?\s*(\d+)-(\d+)(?:/(?:\d+|\*))?\s*", value)
    if not match:
        raise DistributionError(400, "BLOB_UPLOAD_INVALID", f"malformed Content-Range: {value!r}")
    start, end = int(match.group(1)), int(match.group(2))
    if end < start:
        raise DistributionError(400, "BLOB_UPLOAD_INVALID", f"Content-Range ends before it starts: {value!r}")
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
    """Upload sessions, pushed manifests and tags of the server's own registry.

    ``upload_max_age``: an upload untouched for this many seconds is abandoned and removed, at
    :meth:`start` and then every ``sweep_interval`` seconds (by default the smaller of an hour and
    the maximum age) until :meth:`stop`.
    """

    def __init__(self, paths: ImageStorePaths, blobs: BlobStoreLike, importer: ManifestImporter | None, *,
                 upload_max_age: float = DEFAULT_UPLOAD_MAX_AGE_SECONDS,
                 sweep_interval: float | None = None) -> None:
        self.paths = paths
        self.uploads_dir = paths.uploads
        self.repositories_dir = paths.repositories
        self.blobs = blobs
        self.importer = importer
        self.upload_max_age = upload_max_age
        self.sweep_interval = sweep_interval or min(DEFAULT_SWEEP_INTERVAL_SECONDS, upload_max_age)
        self._locks: dict[str, asyncio.Lock] = {}
        # Pushes of one repository are serialised so that the /v2 tag and the image name that
        # import_manifest moves always end on the same digest, whichever push came last.
        self._manifest_locks: dict[str, asyncio.Lock] = {}
        self._hashes: dict[str, _RunningHash] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.repositories_dir.mkdir(parents=True, exist_ok=True)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Remove uploads abandoned while the server was down, then keep sweeping."""
        await self.sweep_abandoned_uploads()
        self._sweeper = asyncio.create_task(self._sweep_periodically(), name="registry-upload-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                await self.sweep_abandoned_uploads()
            except OSError:
                # A full or failing disk must not end the sweeping for good; next round retries.
                log.exception("sweeping abandoned uploads failed")

    # -- blobs ---------------------------------------------------------------------------

    def blob_path(self, repository: str, digest: str) -> Path:
        validate_repository(repository)
        validate_digest(digest)
        if not self.blobs.has(digest):
            raise blob_unknown(digest)
        return self.blobs.path(digest)

    def has_blob(self, digest: str) -> bool:
        return bool(SHA256_DIGEST_RE.fullmatch(digest)) and self.blobs.has(digest)

    # -- upload sessions -----------------------------------------------------------------

    async def start_upload(self, repository: str) -> UploadSession:
        validate_repository(repository)
        session = UploadSession(id=str(uuid.uuid4()), repository=repository, started_at=datetime.now(UTC))
        await asyncio.to_thread(self._create_session_files, session)
        self._hashes[session.id] = _RunningHash()
        return session

    def _create_session_files(self, session: UploadSession) -> None:
        upload = self._upload(session.id)
        upload.directory.mkdir(parents=True)
        upload.data.touch()
        write_model_atomic(upload.session, session)

    async def upload_whole_blob(self, repository: str, digest: str, chunk: Chunk) -> str:
        """A monolithic upload (``POST ...?digest=`` with the blob as the body).

        Everything that can be checked is checked before the session exists, and a session that
        fails (wrong digest, broken body) is removed at once: the client never learns its id, so
        nobody could resume it.
        """
        validate_repository(repository)
        validate_digest(digest)
        session = await self.start_upload(repository)
        try:
            return await self.complete_upload(session, digest, chunk)
        except BaseException:
            await self.cancel_upload(session)
            raise

    def get_upload(self, repository: str, upload_id: str) -> UploadSession:
        unknown = _upload_unknown(upload_id)
        try:
            parsed = uuid.UUID(upload_id)
        except ValueError:
            raise unknown from None
        path = self._upload(str(parsed)).session
        try:
            session = UploadSession.model_validate(read_json(path))
        except FileNotFoundError:
            raise unknown from None
        if session.repository != repository:
            raise unknown
        return session

    def upload_size(self, session: UploadSession) -> int:
        try:
            return self._data_path(session).stat().st_size
        except FileNotFoundError:
            # Cancelled, committed or swept while this request waited for the lock.
            raise _upload_unknown(session.id) from None

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
            size = self.upload_size(session)
            data = self._data_path(session)
            running = self._hashes.pop(session.id, None)
            computed = None
            if running is not None and running.size == size:
                computed = "sha256:" + running.hasher.hexdigest()
            try:
                await asyncio.to_thread(self.blobs.commit_file, data, digest, computed_digest=computed)
            except DomainError as exc:
                await self._discard(session)
                if exc.code.lower() == "digest_invalid":
                    raise DistributionError(400, "DIGEST_INVALID", str(exc), {"digest": digest}) from exc
                raise
            await self._discard(session)
        self._locks.pop(session.id, None)
        return digest

    async def cancel_upload(self, session: UploadSession) -> None:
        async with self._lock(session):
            await self._discard(session)
        self._locks.pop(session.id, None)

    async def mount_or_start(self, repository: str, digest: str) -> UploadSession | None:
        """Cross-repository mount: every blob is visible to every repository here, so a mount
        succeeds exactly when the blob exists (``None``); otherwise a normal upload starts."""
        validate_repository(repository)
        validate_digest(digest)
        if self.has_blob(digest):
            return None
        return await self.start_upload(repository)

    async def sweep_abandoned_uploads(self) -> list[str]:
        """Remove every upload untouched for ``upload_max_age``; returns the removed ids.

        An upload whose lock is held (a chunk being written) is never removed; one that is
        removed under its lock makes a later request on it answer ``BLOB_UPLOAD_UNKNOWN``.
        """
        cutoff = time.time() - self.upload_max_age
        removed = []
        for upload_id in await asyncio.to_thread(self._untouched_since, cutoff):
            lock = self._locks.get(upload_id)
            if lock is not None and lock.locked():
                continue
            async with self._locks.setdefault(upload_id, asyncio.Lock()):
                # Looked at again under the lock: a chunk may have arrived since the scan.
                if upload_id not in await asyncio.to_thread(self._untouched_since, cutoff, upload_id):
                    continue
                log.info("removing abandoned upload %s", upload_id)
                await asyncio.to_thread(shutil.rmtree, self._upload(upload_id).directory, True)
                self._hashes.pop(upload_id, None)
                removed.append(upload_id)
            # Only a removed upload's lock goes: a request waiting on it finds the upload gone.
            self._locks.pop(upload_id, None)
        return removed

    def _untouched_since(self, cutoff: float, only: str | None = None) -> list[str]:
        """Upload ids whose directory and files were all last modified before ``cutoff`` (blocking)."""
        directories = [self._upload(only).directory] if only else list(self.uploads_dir.iterdir())
        stale = []
        for directory in directories:
            try:
                touched = max(p.stat().st_mtime for p in [directory, *directory.iterdir()])
            except (FileNotFoundError, NotADirectoryError):
                continue
            if touched < cutoff:
                stale.append(directory.name)
        return stale

    def _data_path(self, session: UploadSession) -> Path:
        return self._upload(session.id).data

    async def _discard(self, session: UploadSession) -> None:
        self._hashes.pop(session.id, None)
        await asyncio.to_thread(shutil.rmtree, self._upload(session.id).directory, True)

    def _lock(self, session: UploadSession) -> asyncio.Lock:
        return self._locks.setdefault(session.id, asyncio.Lock())

    async def _append(self, session: UploadSession, chunk: Chunk) -> None:
        offset = self.upload_size(session)
        path = self._data_path(session)
        expected: int | None = None
        if chunk.content_range is not None:
            start, end = chunk.content_range
            if start != offset:
                raise UploadRangeError(f"chunk starts at {start}, upload holds {offset} bytes", offset)
            expected = end - start + 1
            if chunk.content_length is not None and chunk.content_length != expected:
                raise DistributionError(400, "BLOB_UPLOAD_INVALID",
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
        """Store a pushed manifest, hand it to the image service and point the tag at it.

        Order matters: every check (names, the manifest's complete shape, the presence of what it
        references) comes first, and the image service's import (which can still refuse, e.g. an
        index without the host's platform) comes before this registry records the revision and
        the tag, so a refused push leaves no tag that GET would serve.
        """
        validate_repository(repository)
        digest = sha256_digest(body)
        validate_reference(repository, reference, digest)
        if len(body) > MAX_MANIFEST_BYTES:
            raise DistributionError(413, "SIZE_INVALID", f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
        parsed = self._check_manifest(repository, body, content_type)

        revision = ManifestRevision(digest=digest, media_type=parsed.media_type, size=len(body))
        repo_dir = self._repo_dir(repository)
        async with self._manifest_locks.setdefault(repository, asyncio.Lock()):
            if self.importer is not None:
                result = self.importer.import_manifest(repository, reference, body, parsed.media_type)
                if inspect.isawaitable(result):
                    await result
            if not self.blobs.has(digest):
                tmp = self.blobs.temp_path()
                await asyncio.to_thread(write_atomic, tmp, body)
                await asyncio.to_thread(self.blobs.commit_file, tmp, digest)
            await asyncio.to_thread(write_model_atomic,
                                    repo_dir.revision(digest[7:]), revision)
            if not is_digest(reference):
                await asyncio.to_thread(write_model_atomic, repo_dir.tag(reference),
                                        TagRecord(digest=digest))
        return revision

    def get_manifest(self, repository: str, reference: str) -> tuple[ManifestRevision, Path]:
        validate_repository(repository)
        repo_dir = self._repo_dir(repository)
        if is_digest(reference):
            validate_digest(reference)
            digest = reference
        else:
            tag_path = repo_dir.tag(reference)
            if not TAG_RE.fullmatch(reference) or not tag_path.exists():
                raise _manifest_unknown(repository, reference)
            digest = TagRecord.model_validate(read_json(tag_path)).digest
        if not self._has_revision(repository, digest):
            raise _manifest_unknown(repository, reference)
        revision_path = repo_dir.revision(digest[7:])
        return ManifestRevision.model_validate(read_json(revision_path)), self.blobs.path(digest)

    def tags(self, repository: str) -> list[str]:
        validate_repository(repository)
        tags_dir = self._repo_dir(repository).tags
        if not tags_dir.is_dir():
            raise DistributionError(404, "NAME_UNKNOWN", f"repository not known: {repository}",
                                {"name": repository})
        return sorted(p.name.removesuffix(".json") for p in tags_dir.glob("*.json"))

    def _repo_dir(self, repository: str) -> RepositoryPaths:
        return self.paths.repository(repository)

    def _upload(self, upload_id: str) -> UploadPaths:
        return self.paths.upload(upload_id)

    def _has_revision(self, repository: str, digest: str) -> bool:
        """Was ``digest`` pushed to ``repository`` as a manifest (and are its bytes still here)?"""
        revision = self._repo_dir(repository).revision(digest[7:])
        return revision.exists() and self.blobs.has(digest)

    def _check_manifest(self, repository: str, body: bytes, content_type: str | None) -> ParsedManifest:
        """The manifest's validated shape, after checking that everything it references is here:
        an image manifest's config and layers as blobs, an index's manifests as manifests pushed
        to this repository (as the distribution registry requires)."""
        try:
            parsed = parse_manifest(body, content_type)
        except ManifestInvalid as exc:
            raise DistributionError(400, "MANIFEST_INVALID", str(exc)) from exc
        document = parsed.document
        if isinstance(document, ImageIndex):
            for entry in document.manifests:
                if entry.media_type in MANIFEST_TYPES | INDEX_TYPES:
                    if not self._has_revision(repository, entry.digest):
                        raise _manifest_blob_unknown(entry, repository, "manifest")
                elif not self.blobs.has(entry.digest):
                    raise _manifest_blob_unknown(entry, repository, "blob")
        else:
            for descriptor in [document.config, *document.layers]:
                if not self.blobs.has(descriptor.digest):
                    raise _manifest_blob_unknown(descriptor, repository, "blob")
        return parsed


def _upload_unknown(upload_id: str) -> DistributionError:
    return DistributionError(404, "BLOB_UPLOAD_UNKNOWN", f"blob upload unknown: {upload_id}")


def _manifest_blob_unknown(descriptor: Descriptor, repository: str, kind: str) -> DistributionError:
    message = f"manifest references {kind} {descriptor.digest}, which was not pushed to {repository}"
    return DistributionError(400, "MANIFEST_BLOB_UNKNOWN", message, {"digest": descriptor.digest})


def _manifest_unknown(repository: str, reference: str) -> DistributionError:
    return DistributionError(404, "MANIFEST_UNKNOWN", f"manifest unknown: {repository}:{reference}",
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
