"""ImageService: the images domain's one entry point (pull, push import, queue, lookups).

Flow of ``create``: parse the reference, resolve the manifest digest at the registry
(synchronously, so a missing image or platform fails the request itself), store the
manifest, then under the service lock either join the job already working on that digest
or write a ``pending`` record and enqueue a job. Workers (``max_concurrent``, default 1)
take jobs FIFO: ``pulling`` (download config and layers into the shared BlobStore; a blob
already there is not fetched again), ``converting`` (unpack layers, build the disk), then
``ready`` or ``failed`` with the reason in ``error``.

Restart: every record still ``pending``/``pulling``/``converting`` is re-queued from its
stored manifest; a pull that borrowed credentials (which were never written down) is
marked failed instead, with a message asking to retry with fresh credentials.

``ready_for_boot`` is what an instance create waits on: a client may create an instance from a
name right after ``POST /images`` (or without it), so the image is waited for, and pulled
first if the server does not know it.

The service also owns the server's own registry (``push_registry``, see ``uploads.py``), which
imports pushed manifests through :meth:`ImageService.import_manifest`; starting the service
sweeps its abandoned uploads and keeps sweeping them until the service stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypemand.errors import BadRequest, DomainError
from hypemand.fsutil import is_no_space
from hypemand.images.disk import DiskFormat, build_disk
from hypemand.images.errors import (
    CredentialConflict,
    DigestInvalid,
    ImageNotFound,
    ImageNotReady,
    ImagePullFailed,
    InvalidName,
    InvalidTags,
    RateLimited,
    RegistryError,
)
from hypemand.images.manifests import image_config_from, parse_manifest
from hypemand.images.media_types import MANIFEST_TYPES
from hypemand.images.models import (
    IN_PROGRESS,
    ContentRecord,
    CreateImageRequest,
    Image,
    ImageStatus,
    NamePointer,
    PullSource,
    ReadyImage,
    RegistryCredentials,
    utcnow,
)
from hypemand.images.reference import (
    Platform,
    Reference,
    check_registry_allowed,
    host_platform,
    parse_platform,
    parse_reference,
    pushed_image_reference,
)
from hypemand.images.registry_client import RegistryClient, select_platform
from hypemand.images.store import ImageStore
from hypemand.images.unpack import apply_layers
from hypemand.images.uploads import DEFAULT_UPLOAD_MAX_AGE_SECONDS, RegistryService
from hypemand.layout import DataLayout
from hypemand.tags import check_tags

log = logging.getLogger(__name__)

_PARALLEL_BLOB_DOWNLOADS = 3
# How often a boot waiting on an image looks again when no job signals its end (the short
# moment between a record being written and its job being queued).
_UNSIGNALLED_WAIT_SECONDS = 0.1
INTERRUPTED_CREDENTIALED_PULL = (
    "credentialed image pull was interrupted by a server restart; "
    "submit POST /images again with fresh credentials"
)


def validate_tags(tags: dict[str, str] | None) -> dict[str, str]:
    try:
        return dict(check_tags(tags) or {})
    except ValueError as exc:
        raise InvalidTags(str(exc)) from None


@dataclass
class _Job:
    digest: str
    credentials: RegistryCredentials | None
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def fingerprint(self) -> tuple[str, str, str]:
        return self.credentials.fingerprint() if self.credentials else ("", "", "")


class ImageService:
    def __init__(
        self,
        layout: DataLayout,
        *,
        max_concurrent: int | None = None,
        disk_format: DiskFormat | None = None,
        registry: RegistryClient | None = None,
        platform: Platform | None = None,
        resolve_timeout: float = 30.0,
        upload_max_age: float = DEFAULT_UPLOAD_MAX_AGE_SECONDS,
        allowed_registries: frozenset[str] | None = None,
    ) -> None:
        self.store = ImageStore(layout.image_store)
        self.allowed_registries = allowed_registries
        self.blobs = self.store.blobs
        # The /v2 push side: uploads land in the same blob store, manifests come back here.
        self.push_registry = RegistryService(self.store.paths, self.blobs, self,
                                             upload_max_age=upload_max_age)
        self.max_concurrent = max_concurrent or 1
        self.disk_format = disk_format or DiskFormat.EXT4
        self.platform = platform or host_platform()
        self.resolve_timeout = resolve_timeout
        self._registry = registry or RegistryClient()
        self._lock = asyncio.Lock()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._waiting: list[str] = []
        self._jobs: dict[str, _Job] = {}
        self._workers: list[asyncio.Task[None]] = []
        # The instance domain sets this so that content a VM boots from is never removed.
        self.content_in_use: Callable[[str], bool] = lambda _digest: False

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self.blobs.clean_partials()
        await asyncio.to_thread(self.store.clean_deleted)  # rmtree of whole image trees
        await self._recover()
        await self.push_registry.start()
        self._workers = [asyncio.create_task(self._worker(), name=f"image-worker-{i}")
                         for i in range(self.max_concurrent)]

    async def stop(self) -> None:
        """Stop workers. Unfinished records keep their status and resume at the next start."""
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []
        await self.push_registry.stop()
        await self._registry.aclose()

    async def _recover(self) -> None:
        records = sorted(self.store.list_records(), key=lambda r: r.created_at)
        for record in records:
            if record.status not in IN_PROGRESS:
                continue
            if record.source.borrowed_credentials:
                await self._write(record, status="failed", error=INTERRUPTED_CREDENTIALED_PULL)
                continue
            if not self.blobs.has(record.digest):
                await self._write(record, status="failed", error="image manifest missing after restart")
                continue
            log.info("resuming interrupted image job %s (%s)", record.digest, record.status)
            await self._enqueue(record, None)

    # ---- public API: pull, push import, lookups ---------------------------------------

    async def create(self, request: CreateImageRequest) -> Image:
        ref = parse_reference(request.name)
        check_registry_allowed(ref, self.allowed_registries)
        platform = parse_platform(request.platform) if request.platform else self.platform
        tags = validate_tags(request.tags)
        credentials = request.credentials if request.credentials and request.credentials.present else None
        try:
            async with asyncio.timeout(self.resolve_timeout):
                index, resolved = await self._registry.resolve(ref, platform, credentials)
        except TimeoutError as exc:
            seconds = f"{self.resolve_timeout:.0f}"
            raise RegistryError(f"registry {ref.domain} did not answer within {seconds}s") from exc
        manifest = resolved.manifest
        await asyncio.to_thread(self.blobs.write_bytes, manifest.data, manifest.digest)
        if index is not None:
            await asyncio.to_thread(self.blobs.write_bytes, index.data, index.digest)
        source = PullSource(kind="registry", repository=ref.repository, platform=str(platform),
                            borrowed_credentials=credentials is not None)
        return await self._register(
            ref, manifest.digest, manifest.media_type, source, resolved.platform, credentials,
            tags if request.tags is not None else None,
        )

    async def import_manifest(
        self, repository: str, reference: str, manifest: bytes, media_type: str
    ) -> Image:
        """Turn a manifest pushed to ``/v2/<repository>/manifests/<reference>`` into an image.

        All blobs must already be in the BlobStore. The image is named by normalising the
        /v2 path the way a pull reference is: ``team/app`` + ``v1`` -> ``docker.io/team/app:v1``
        (``app`` -> ``docker.io/library/app:v1``; a digest reference gives ``...@sha256:...``).
        Everything is checked (the name, the manifest's whole shape, the platform an index
        offers) before anything is written.
        """
        ref = pushed_image_reference(repository, reference)
        parsed = parse_manifest(manifest, media_type)
        kind = parsed.media_type
        platform = None
        digest = ""
        if parsed.is_index:
            index = parsed.document.model_dump(mode="json", by_alias=True, exclude_none=True)
            digest, kind, platform = select_platform(index, self.platform)
            if not self.blobs.has(digest):
                raise DigestInvalid(f"manifest {digest} named by the index was not pushed")
            if kind not in MANIFEST_TYPES:
                raise BadRequest(f"the index entry for {platform} is a {kind!r}, not an image manifest",
                                 code="manifest_invalid")
        expected = reference if ref.is_digest else None
        manifest_digest = await asyncio.to_thread(self.blobs.write_bytes, manifest, expected)
        digest = digest or manifest_digest
        source = PullSource(kind="push", repository=ref.repository, platform=str(self.platform))
        return await self._register(ref, digest, kind, source, platform, None, None)

    async def list_images(self, tags: dict[str, str] | None = None) -> list[Image]:
        images = []
        for pointer in self.store.list_pointers():
            if tags and any(pointer.tags.get(k) != v for k, v in tags.items()):
                continue
            record = self.store.read_record(pointer.digest)
            if record is not None:
                images.append(self._image(pointer, record))
        return sorted(images, key=lambda i: (i.created_at, i.name))

    async def get(self, name: str) -> Image:
        pointer, record = self._lookup(parse_reference(name))
        return self._image(pointer, record)

    async def get_ready(self, name: str) -> ReadyImage:
        """The disk and run settings of a ready image, for booting it by name."""
        pointer, record = self._lookup(parse_reference(name))
        return self._ready(pointer.name, record)

    async def get_ready_by_digest(self, digest: str) -> ReadyImage:
        """Same, pinned to content: what an instance that already booted should use."""
        record = self.store.read_record(digest)
        if record is None:
            raise ImageNotFound(f"image content {digest} not found")
        return self._ready(digest, record)

    async def tag(self, source: str, target: str) -> Image:
        source_ref = parse_reference(source)
        try:
            target_ref = parse_reference(target)
        except InvalidName as exc:
            raise InvalidName(f"invalid target reference: {exc}") from exc
        if target_ref.is_digest:
            raise InvalidName("target must be a tag reference, not a digest")
        async with self._lock:
            pointer, record = self._lookup(source_ref)
            if record.status != "ready":
                raise ImageNotReady(f"image {pointer.name} is {record.status}, not ready")
            previous = self.store.read_pointer(str(target_ref))
            new = NamePointer(name=str(target_ref), digest=record.digest, tags=dict(pointer.tags))
            await asyncio.to_thread(self.store.write_pointer, new)
            if previous is not None and previous.digest != record.digest:
                await self._collect(previous.digest)
            return self._image(new, record)

    async def delete(self, name: str) -> None:
        ref = parse_reference(name)
        async with self._lock:
            if ref.is_digest and ref.tag is None:
                doomed = [p for p in self.store.list_pointers()
                          if p.digest == ref.digest and parse_reference(p.name).repository == ref.repository]
                if not doomed and self.store.read_record(ref.digest or "") is None:
                    raise ImageNotFound(f"image {ref} not found")
                for pointer in doomed:
                    self.store.delete_pointer(pointer.name)
                await self._collect(ref.digest or "")
                return
            existing = self.store.read_pointer(str(ref))
            if existing is None:
                raise ImageNotFound(f"image {ref} not found")
            self.store.delete_pointer(existing.name)
            await self._collect(existing.digest)

    async def wait(self, name: str) -> Image:
        """Wait until the image is ready or failed; callers bound it with ``asyncio.timeout``."""
        while True:
            image = await self.get(name)
            job = self._jobs.get(image.digest)
            if image.status not in IN_PROGRESS or job is None:
                return image
            await job.done.wait()

    # ---- booting by name --------------------------------------------------------------

    async def ready_for_boot(self, name: str, timeout: float) -> ReadyImage:  # noqa: ASYNC109
        """The ready image ``name`` for an instance about to boot from it, waited for if need be:

        - ready: returned at once;
        - pending, pulling or converting: waited for (woken by its job's end);
        - unknown here: pulled the way ``POST /images`` pulls it (resolved at its registry
          first, no credentials), then waited for. If that pull cannot even start, the error
          is ``ImageNotFound`` (404 ``not_found``) naming the reason, except ``RateLimited``
          (429) and ``CredentialConflict`` (409), which pass through;
        - failed, before or while waited for: ``ImagePullFailed`` (409 ``image_not_ready``),
          its message saying that the pull failed and the pull's own error.

        ``timeout`` (seconds) bounds everything; when it runs out, ``ImageNotReady`` (409
        ``image_not_ready``) says what the image is still doing. The pull itself goes on.
        ``InvalidName`` (400) for a malformed name; ``ImageNotFound`` if the name is deleted
        meanwhile.
        """
        ref = parse_reference(name)
        try:
            async with asyncio.timeout(timeout):
                return await self._ready_after_pull(ref)
        except TimeoutError as exc:
            progress = self._progress(ref)
            raise ImageNotReady(f"image {ref} is not ready after {timeout:g}s: {progress}") from exc

    async def _ready_after_pull(self, ref: Reference) -> ReadyImage:
        try:
            pointer, record = self._lookup(ref)
        except ImageNotFound:
            await self._pull_for_boot(ref)
            pointer, record = self._lookup(ref)
        while record.status in IN_PROGRESS:
            job = self._jobs.get(record.digest)
            if job is not None:
                await job.done.wait()
            else:
                await asyncio.sleep(_UNSIGNALLED_WAIT_SECONDS)
            pointer, record = self._lookup(ref)
        if record.status == "failed":
            reason = record.error or "no reason was recorded"
            raise ImagePullFailed(f"the pull of image {pointer.name} failed: {reason}")
        return self._ready(pointer.name, record)

    async def _pull_for_boot(self, ref: Reference) -> None:
        """Start pulling an image this server does not know, as ``POST /images`` would."""
        # Shielded: a boot whose wait runs out, or whose client goes away, must not cut the
        # registration in half (a record written but never queued would stay pending).
        starting = asyncio.ensure_future(self.create(CreateImageRequest(name=str(ref))))
        starting.add_done_callback(lambda task: task.cancelled() or task.exception())
        try:
            await asyncio.shield(starting)
        except (RateLimited, CredentialConflict):
            raise
        except DomainError as exc:
            raise ImageNotFound(f"image {ref} is not on this server and could not be pulled: {exc}") from exc

    def _progress(self, ref: Reference) -> str:
        """What an image that is not ready yet is doing, for a timeout's message."""
        try:
            _, record = self._lookup(ref)
        except ImageNotFound:
            return "its pull has not started yet (its registry has not answered)"
        if record.status == "pending" and record.digest in self._waiting:
            return f"it is queued behind {self._waiting.index(record.digest)} other pulls"
        return f"it is still {record.status}"

    # ---- internals: registration, queue, lookups --------------------------------------

    async def _register(self, ref: Reference, digest: str, media_type: str, source: PullSource,
                        platform: str | None, credentials: RegistryCredentials | None,
                        tags: dict[str, str] | None) -> Image:
        async with self._lock:
            record = self.store.read_record(digest)
            if record is not None and record.status == "failed" and digest not in self._jobs:
                # failures are not cached: retry from scratch
                await asyncio.to_thread(self.store.remove_content, digest)
                record = None
            if record is None:
                record = ContentRecord(digest=digest, status="pending", source=source,
                                       manifest_media_type=media_type, platform=platform or source.platform)
                await asyncio.to_thread(self.store.write_record, record)
                await self._enqueue(record, credentials)
            elif record.status in IN_PROGRESS:
                job = self._jobs.get(digest)
                wanted = credentials.fingerprint() if credentials else ("", "", "")
                if job is not None and job.fingerprint != wanted:
                    raise CredentialConflict("image pull already in flight with different credentials; "
                                             "retry after the current pull completes")
            name = str(ref)
            previous = self.store.read_pointer(name)
            pointer = NamePointer(
                name=name,
                digest=digest,
                created_at=previous.created_at if previous and previous.digest == digest else utcnow(),
                tags=tags if tags is not None else (previous.tags if previous else {}),
            )
            await asyncio.to_thread(self.store.write_pointer, pointer)
            if previous is not None and previous.digest != digest:
                await self._collect(previous.digest)
            return self._image(pointer, record)

    async def _enqueue(self, record: ContentRecord, credentials: RegistryCredentials | None) -> None:
        job = _Job(digest=record.digest, credentials=credentials)
        self._jobs[record.digest] = job
        await self._write(record, status="pending", error=None, job_id=job.job_id)
        self._waiting.append(record.digest)
        self._queue.put_nowait(record.digest)

    def _lookup(self, ref: Reference) -> tuple[NamePointer, ContentRecord]:
        pointer = self.store.read_pointer(str(ref))
        if pointer is None and ref.is_digest and ref.tag is None and ref.digest:
            # ``repo@sha256:...`` also finds content pulled into that repository by a tag.
            record = self.store.read_record(ref.digest)
            if record is not None and record.source.repository == ref.repository:
                pointer = NamePointer(name=str(ref), digest=ref.digest, created_at=record.created_at)
        if pointer is None:
            raise ImageNotFound(f"image {ref} not found")
        record = self.store.read_record(pointer.digest)
        if record is None:
            raise ImageNotFound(f"image {ref} not found (content {pointer.digest} is gone)")
        return pointer, record

    def _image(self, pointer: NamePointer, record: ContentRecord) -> Image:
        position = None
        if record.status == "pending" and record.digest in self._waiting:
            position = self._waiting.index(record.digest) + 1
        ready = record.status == "ready"
        return Image(
            name=pointer.name,
            digest=record.digest,
            status=record.status,
            created_at=record.created_at,
            platform=record.platform,
            queue_position=position,
            error=record.error,
            size_bytes=record.size_bytes if ready else None,
            entrypoint=record.config.entrypoint,
            cmd=record.config.cmd,
            env=record.config.env,
            working_dir=record.config.working_dir,
            tags=dict(pointer.tags),
        )

    def _ready(self, name: str, record: ContentRecord) -> ReadyImage:
        if record.status != "ready":
            raise ImageNotReady(f"image {name} is {record.status}, not ready")
        disk = self.store.disk_path(record)
        if not disk.is_file():
            raise ImageNotFound(f"disk of image {name} is missing")
        return ReadyImage(
            name=name, digest=record.digest, platform=record.platform, disk_path=disk,
            disk_format=record.disk_format or "ext4", size_bytes=record.size_bytes or disk.stat().st_size,
            entrypoint=record.config.entrypoint, cmd=record.config.cmd, env=record.config.env or {},
            working_dir=record.config.working_dir, user=record.config.user,
        )

    async def _collect(self, digest: str) -> None:
        """Remove content no name points at, unless a job or a VM still uses it."""
        if any(p.digest == digest for p in self.store.list_pointers()):
            return
        job = self._jobs.get(digest)
        if job is not None:
            if digest in self._waiting:  # not started yet: cancel it
                self._waiting.remove(digest)
                del self._jobs[digest]
                job.done.set()
            else:
                return  # running: the worker collects it when done
        if self.content_in_use(digest):
            return
        await asyncio.to_thread(self.store.remove_content, digest)

    async def _write(self, record: ContentRecord, **changes: Any) -> ContentRecord:
        for key, value in changes.items():
            setattr(record, key, value)
        record.updated_at = utcnow()
        # fsync of the file and its directory: milliseconds to seconds on a busy disk.
        await asyncio.to_thread(self.store.write_record, record)
        return record

    async def _set_status(self, job: _Job, status: ImageStatus, **changes: Any) -> ContentRecord | None:
        async with self._lock:
            record = self.store.read_record(job.digest)
            if record is None or record.job_id != job.job_id:
                return None  # deleted or superseded meanwhile
            return await self._write(record, status=status, **changes)

    # ---- internals: the worker --------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            digest = await self._queue.get()
            if digest not in self._waiting:
                continue  # a stale queue entry of a job cancelled while it waited
            self._waiting.remove(digest)
            job = self._jobs.get(digest)
            if job is None:
                continue  # cancelled while waiting
            try:
                await self._run(job)
            except asyncio.CancelledError:
                raise
            except DomainError as exc:
                await self._set_status(job, "failed", error=str(exc))
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
                if not is_no_space(exc):
                    log.exception("image job %s failed", digest)
                else:  # an expected condition: the pull fails saying so, the server goes on
                    log.warning("image job %s failed: the data disk is full", digest)
                    error = "insufficient_storage: no space left on the data disk for the image"
                await self._set_status(job, "failed", error=error)
            except Exception as exc:
                log.exception("image job %s failed", digest)
                await self._set_status(job, "failed", error=f"{type(exc).__name__}: {exc}")
            finally:
                if self._jobs.get(digest) is job:
                    del self._jobs[digest]
                job.done.set()
            async with self._lock:
                await self._collect(digest)

    async def _run(self, job: _Job) -> None:
        record = self.store.read_record(job.digest)
        if record is None or record.job_id != job.job_id:
            return
        manifest = json.loads(self.blobs.read_bytes(job.digest))
        config_desc = manifest.get("config") or {}
        layer_descs = manifest.get("layers")
        if not config_desc.get("digest") or not isinstance(layer_descs, list):
            raise BadRequest("manifest has no config or no layers", code="manifest_invalid")
        for layer in layer_descs:
            kind = str(layer.get("mediaType", ""))
            if "tar" not in kind:
                raise BadRequest(f"unsupported layer media type {kind!r}", code="manifest_invalid")
        descriptors = [config_desc, *layer_descs]
        if record.source.kind == "registry":
            await self._set_status(job, "pulling")
            await self._download(record, job, descriptors)
        else:
            missing = [d["digest"] for d in descriptors if not self.blobs.has(d["digest"])]
            if missing:
                raise DigestInvalid(f"pushed image is missing blobs: {', '.join(missing)}")
        config, platform = image_config_from(self.blobs.read_bytes(config_desc["digest"]))
        layers = [d["digest"] for d in layer_descs]
        if await self._set_status(job, "converting", config=config, layers=layers,
                                  platform=platform or record.platform) is None:
            return
        size = await asyncio.to_thread(self._convert, job.digest, layers)
        await self._set_status(job, "ready", size_bytes=size, disk_format=self.disk_format.value, error=None)

    async def _download(self, record: ContentRecord, job: _Job, descriptors: list[dict[str, Any]]) -> None:
        ref = parse_reference(f"{record.source.repository}@{record.digest}")
        gate = asyncio.Semaphore(_PARALLEL_BLOB_DOWNLOADS)

        async def fetch(desc: dict[str, Any]) -> None:
            async with gate:
                size = desc.get("size")
                await self._registry.fetch_blob(ref, desc["digest"], self.blobs, job.credentials,
                                                expected_size=size if isinstance(size, int) else None)

        await asyncio.gather(*(fetch(d) for d in descriptors))

    def _convert(self, digest: str, layers: list[str]) -> int:
        """Unpack and build the disk inside the content's own directory (blocking)."""
        content = self.store.content(digest)
        work = content.work
        shutil.rmtree(work, ignore_errors=True)
        # The unpacked tree holds the image's setuid binaries, device nodes and world-writable
        # directories on the host: no other host user may reach into it (or race its writes).
        work.mkdir(mode=0o700)
        os.chmod(work, 0o700)
        rootfs = content.unpacked
        fmt = self.disk_format
        partial = content.partial_disk(fmt.value)
        try:
            applier = apply_layers(rootfs, [self.blobs.path(d) for d in layers])
            if applier.skipped_devices:
                log.info("image %s: %d device nodes skipped", digest, applier.skipped_devices)
            size = build_disk(rootfs, partial, fmt)
            os.replace(partial, content.disk(fmt.value))
            return size
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def release(self, digest: str) -> None:
        """An instance stopped using this content: remove it if no name and no VM needs it."""
        async with self._lock:
            if self.store.read_record(digest) is not None:
                await self._collect(digest)
