"""BuildService: the `/builds` API's domain — intake, the queue, runs, cancel, events, recovery.

* **Intake** (:meth:`BuildService.create`): the source is streamed to ``source.tar.gz`` (over
  the limit: 413 before it is stored whole), unpacked safely, its Dockerfile found and scanned
  for base images; any refusal is a 400 and leaves nothing behind. Then the record is written
  (``queued``) and the build joins the queue: 202.
* **The queue** is FIFO. At most ``max_concurrent`` builds run (the reference's
  ``MAX_CONCURRENT_BUILDS``, default 1), and one per *lane*: a builder's builds share its cache
  disk and run one at a time; the others wait in order (``queue_position`` is 1 for the next
  build to start).
* **A run** (its steps: :mod:`hypemand.builds.pipeline`) is bounded by ``timeout_seconds``; the
  record says ``building``, then ``pushing`` while the image is imported, then ``ready`` or
  ``failed``. Its end is settled on every path, also a cancel before its first step: the builder
  VM is deleted before ``DELETE`` answers, the record says how it ended, the queue moves on.
* **Recovery**: builds the last server left ``building``/``pushing`` are queued again (their
  source is on disk), once; a second interruption fails them. Builder VMs of builds not running
  are deleted at start (named ``build-<id>`` and tagged for a build this server has).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from hypemand.aiotools import run_to_completion
from hypemand.builds import dockerfile, source
from hypemand.builds.builders import BuilderService
from hypemand.builds.disks import BuildVolumes
from hypemand.builds.events import BuildLog, stream
from hypemand.builds.models import (
    Build,
    BuilderStatus,
    BuildEvent,
    BuildProvenance,
    BuildRecord,
    BuildSpec,
    BuildStatus,
    new_id,
    split_image_name,
)
from hypemand.builds.pipeline import BuildPipeline, Noter
from hypemand.builds.runner import BUILD_TAG, BuildFailed, BuildRunner, RunnerHost, builder_vm_name
from hypemand.errors import BadRequest, Conflict, DomainError, NotFound
from hypemand.fsutil import load_record_dirs, write_model_atomic
from hypemand.guest.client import AgentClient
from hypemand.images.service import ImageService
from hypemand.instances.manager import InstanceManager
from hypemand.instances.models import CreateInstanceRequest
from hypemand.layout import BUILD_RECORD, BuildPaths, DataLayout

log = logging.getLogger(__name__)

MAX_RECOVERIES = 1


@dataclass(frozen=True)
class BuildSettings:
    max_concurrent: int = 1
    max_source_bytes: int = 1 << 30
    max_context_bytes: int = 8 << 30
    secrets_dir: Path | None = None


class _InstancesHost(RunnerHost):
    def __init__(self, instances: InstanceManager) -> None:
        self.instances = instances

    async def create_vm(self, request: CreateInstanceRequest) -> str:
        return (await self.instances.create(request)).id

    async def agent(self, instance_id: str, wait: float) -> AgentClient:
        return await self.instances.guest_agent(instance_id, wait_for_agent=wait)

    async def delete_vm(self, instance_id: str) -> None:
        with contextlib.suppress(NotFound):
            await self.instances.delete(instance_id)


class BuildService:
    def __init__(self, layout: DataLayout, images: ImageService, instances: InstanceManager,
                 volumes: BuildVolumes, builders: BuilderService, settings: BuildSettings,
                 system_dir: Path) -> None:
        self.layout = layout
        self.images = images
        self.instances = instances
        self.builders = builders
        self.settings = settings
        self.pipeline = BuildPipeline(images, builders, BuildRunner(_InstancesHost(instances), volumes),
                                      system_dir, settings.secrets_dir)
        builders.usage = self
        self._records: dict[str, BuildRecord] = {}
        self._logs: dict[str, BuildLog] = {}
        self._queue: list[str] = []
        self._running: dict[str, asyncio.Task[None]] = {}
        self._lanes: dict[str, str] = {}  # lane -> the build running in it
        self._record_locks: dict[str, asyncio.Lock] = {}
        self._stopping = False

    # ---- start and stop ---------------------------------------------------------------------

    async def start(self) -> None:
        self._records = await asyncio.to_thread(self._load)
        for record in sorted(self._records.values(), key=lambda r: (r.created_at, r.id)):
            if record.status in (BuildStatus.BUILDING, BuildStatus.PUSHING):
                await self._recover(record)
            elif record.status is BuildStatus.QUEUED:
                self._queue.append(record.id)
        await self._delete_stray_vms()
        self._dispatch()

    async def _recover(self, record: BuildRecord) -> None:
        log_ = self._log(record.id)
        if record.recoveries >= MAX_RECOVERIES:
            await log_.append(b"==> the server stopped during the build again; giving up\n")
            await self._finish(record.id, BuildStatus.FAILED,
                               error="the server stopped twice while this build ran; submit it again")
            return
        await log_.append(b"==> the server stopped during the build; it starts again\n")
        await self._update(record.id, status=BuildStatus.QUEUED, started_at=None, builder_instance_id=None,
                           recoveries=record.recoveries + 1)
        self._queue.append(record.id)

    async def _delete_stray_vms(self) -> None:
        """Builder VMs whose build is not running (a killed server left them): named and tagged
        for a build this server has (a client's own instance is never taken for one)."""
        for instance in await self.instances.list_instances():
            build_id = (instance.tags or {}).get(BUILD_TAG)
            if (build_id is not None and build_id in self._records and build_id not in self._running
                    and instance.name == builder_vm_name(build_id)):
                log.info("deleting builder VM %s of build %s", instance.id, build_id)
                with contextlib.suppress(NotFound):
                    await self.instances.delete(instance.id)

    async def stop(self) -> None:
        """Running builds are interrupted but stay ``building`` on disk: the next start runs
        them again."""
        self._stopping = True
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _load(self) -> dict[str, BuildRecord]:
        records = load_record_dirs(self.layout.builds, BUILD_RECORD, BuildRecord)
        return {record.id: record for record in records}

    # ---- reads ------------------------------------------------------------------------------

    def _record(self, build_id: str) -> BuildRecord:
        found = self._records.get(build_id)
        if found is None:
            raise NotFound(f"build {build_id!r} not found")
        return found

    async def get(self, build_id: str) -> Build:
        return self._wire(self._record(build_id))

    async def list_builds(self, tags: dict[str, str] | None = None) -> list[Build]:
        wanted = (tags or {}).items()
        found = [r for r in self._records.values() if all(r.spec.tags.get(k) == v for k, v in wanted)]
        return [self._wire(r) for r in sorted(found, key=lambda r: (r.created_at, r.id))]

    def events(self, build_id: str, follow: bool) -> AsyncIterator[BuildEvent]:
        record = self._record(build_id)
        return stream(self._log(record.id), lambda: self._records[build_id].status, follow)

    def _wire(self, record: BuildRecord) -> Build:
        duration = None
        if record.started_at is not None and record.completed_at is not None:
            duration = int((record.completed_at - record.started_at).total_seconds() * 1000)
        position = self._queue.index(record.id) + 1 if record.id in self._queue else None
        return Build(
            id=record.id, created_at=record.created_at, status=record.status,
            builder_id=record.spec.builder_id, builder_instance_id=record.builder_instance_id,
            completed_at=record.completed_at,
            duration_ms=duration, error=record.error, image_digest=record.image_digest,
            image_ref=record.image_ref, queue_position=position, started_at=record.started_at,
            tags=record.spec.tags,
            provenance=BuildProvenance(
                base_image_digest=record.base_image_digest, source_hash=record.source_hash,
                buildkit_version=record.builder_version, lockfile_hashes=record.lockfile_hashes or None,
                timestamp=record.completed_at,
            ),
        )

    # BuilderUsage, for the builder service
    def active_build(self, builder_id: str) -> str | None:
        return self._lanes.get(_builder_lane(builder_id))

    def queued_builds(self, builder_id: str) -> list[str]:
        return [b for b in self._queue if self._records[b].spec.builder_id == builder_id]

    def builder_changed(self) -> None:
        self._dispatch()

    # ---- intake -----------------------------------------------------------------------------

    async def create(self, spec: BuildSpec, body: AsyncIterator[bytes]) -> Build:
        self._check_spec(spec)
        build_id = new_id()
        paths = self.layout.build(build_id)
        try:
            record = await self._intake(build_id, paths, spec, body)
            self._check_builder(spec)  # it may have gone while the source arrived
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, paths.directory, True)
            raise
        self._records[build_id] = record
        self._queue.append(build_id)
        self._log(build_id).status(BuildStatus.QUEUED)
        self._dispatch()
        return self._wire(record)

    def _check_spec(self, spec: BuildSpec) -> None:
        self._check_builder(spec)
        for secret in spec.secrets:
            if self.settings.secrets_dir is None or not (self.settings.secrets_dir / secret.id).is_file():
                raise BadRequest(f"secrets: no secret {secret.id!r} is configured on this server",
                                 code="secret_not_found")

    def _check_builder(self, spec: BuildSpec) -> None:
        if spec.builder_id is None:
            return
        builder = self.builders.record(spec.builder_id)  # 404
        if builder.status is not BuilderStatus.READY and builder.status is not BuilderStatus.PRUNING:
            raise Conflict(f"builder {builder.id} is {builder.status.value}: prune it or use another",
                           code="builder_not_ready")

    async def _intake(self, build_id: str, paths: BuildPaths, spec: BuildSpec,
                      body: AsyncIterator[bytes]) -> BuildRecord:
        await asyncio.to_thread(paths.log.parent.mkdir, parents=True)
        source_hash = await source.receive_source(body, paths.source, self.settings.max_source_bytes)
        context = paths.context
        await asyncio.to_thread(source.unpack_source, paths.source, context, self.settings.max_context_bytes)
        text = await asyncio.to_thread(source.read_dockerfile, context, spec.dockerfile)
        bases = dockerfile.base_images(text)
        await asyncio.to_thread(paths.dockerfile.write_text, text)
        lockfiles = await asyncio.to_thread(source.lockfile_hashes, context)
        repository, tag = split_image_name(spec.image_name or f"builds/{build_id}")
        record = BuildRecord(
            id=build_id, status=BuildStatus.QUEUED, created_at=datetime.now(UTC), spec=spec,
            source_hash=source_hash, base_images=bases, image_repository=repository, image_tag=tag,
            lockfile_hashes=lockfiles,
        )
        await asyncio.to_thread(write_model_atomic, paths.record, record)
        return record

    # ---- the queue --------------------------------------------------------------------------

    def _dispatch(self) -> None:
        if self._stopping:
            return
        for build_id in list(self._queue):
            if len(self._running) >= self.settings.max_concurrent:
                return
            record = self._records[build_id]
            lane = _lane(record.spec)
            if lane is not None and lane in self._lanes:
                continue
            if record.spec.builder_id is not None and not self._builder_available(record.spec.builder_id):
                continue
            self._queue.remove(build_id)
            if lane is not None:
                self._lanes[lane] = build_id
            task = asyncio.get_running_loop().create_task(self._run(build_id), name=f"build {build_id}")
            self._running[build_id] = task
            task.add_done_callback(functools.partial(self._run_ended, build_id, lane))

    def _run_ended(self, build_id: str, lane: str | None, _task: asyncio.Task[None]) -> None:
        """The run's task is done, however (even cancelled before its first step): its slot and
        lane are free. Synchronous, so nothing can cut it short."""
        self._running.pop(build_id, None)
        if lane is not None:
            self._lanes.pop(lane, None)
        self._dispatch()

    def _builder_available(self, builder_id: str) -> bool:
        """Ready, and not being pruned or deleted right now."""
        try:
            builder = self.builders.record(builder_id)
        except NotFound:
            return False
        return builder.status is BuilderStatus.READY and not self.builders.lock(builder_id).locked()

    async def _run(self, build_id: str) -> None:
        failure = "cancelled"
        try:
            await self._run_build(self._records[build_id])
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # a record that could not be written (a full disk), a bug
            log.exception("build %s failed", build_id)
            failure = f"internal error: {exc}"
        finally:
            await run_to_completion(self._settle(build_id, failure))

    async def _settle(self, build_id: str, failure: str) -> None:
        """The end of a run on every path: a build not finished yet ends ``failed`` (an error)
        or ``cancelled``, unless the server is stopping (the next start runs it again); its
        working files go. Idempotent: ``cancel`` calls it too."""
        if not self._stopping and not self._records[build_id].status.finished:
            status = BuildStatus.CANCELLED if failure == "cancelled" else BuildStatus.FAILED
            error = None if status is BuildStatus.CANCELLED else failure  # error: failed builds only
            try:
                await self._finish(build_id, status, error=error)
            except Exception:  # the disk refuses even that: the state is told, not stored
                log.exception("could not record the end of build %s", build_id)
                self._records[build_id] = self._records[build_id].model_copy(
                    update={"status": status, "error": error, "completed_at": datetime.now(UTC)})
                self._log(build_id).status(status)
        await self._cleanup(self.layout.build(build_id), finished=not self._stopping)

    async def _run_build(self, record: BuildRecord) -> None:
        build_log = self._log(record.id)
        paths = self.layout.build(record.id)
        await self._cleanup(paths, finished=False)  # what an interrupted earlier run left
        record = await self._update(record.id, status=BuildStatus.BUILDING, started_at=datetime.now(UTC))
        deadline = asyncio.timeout(record.spec.timeout_seconds)
        try:
            async with deadline:
                output = await self.pipeline.build(record, paths, build_log, self._noter(record.id))
                record = await self._update(record.id, status=BuildStatus.PUSHING)
                await build_log.append(b"==> importing the image\n")
                digest, name = await self.pipeline.publish(record, output)
        except TimeoutError as exc:
            if not deadline.expired():
                raise BuildFailed(f"a step timed out: {exc}") from exc
            limit = record.spec.timeout_seconds
            await self._finish(record.id, BuildStatus.FAILED,
                               error=f"the build did not finish within its timeout of {limit} s")
            return
        except DomainError as exc:
            await build_log.append(f"==> failed: {exc}\n".encode())
            await self._finish(record.id, BuildStatus.FAILED, error=str(exc))
            return
        await build_log.append(f"==> built {name}\n".encode())
        await self._finish(record.id, BuildStatus.READY, image_digest=digest, image_ref=name)

    def _noter(self, build_id: str) -> Noter:
        async def note(**changes: object) -> None:
            await self._update(build_id, **changes)
        return note

    # ---- cancel -----------------------------------------------------------------------------

    async def cancel(self, build_id: str) -> None:
        record = self._record(build_id)
        if record.status.finished:
            raise Conflict(f"build {build_id} has already ended ({record.status.value})",
                           code="build_finished")
        if build_id in self._queue:
            self._queue.remove(build_id)
        task = self._running.get(build_id)
        if task is not None:
            task.cancel()  # its end deletes the VM, whatever step it was in
            await asyncio.gather(task, return_exceptions=True)
        # A queued build, or a run cancelled before its first step (its finally never ran).
        await run_to_completion(self._settle(build_id, "cancelled"))
        self._dispatch()

    # ---- records ----------------------------------------------------------------------------

    async def _update(self, build_id: str, **changes: object) -> BuildRecord:
        """Change a build's record: the file and the memory together (one writer at a time per
        build, and a cancel waits for the write so the two never disagree)."""
        async def commit() -> BuildRecord:
            before = self._records[build_id]
            record = before.model_copy(update=changes)
            await asyncio.to_thread(write_model_atomic, self.layout.build(build_id).record, record)
            self._records[build_id] = record
            if record.status is not before.status:
                self._log(build_id).status(record.status)
            return record

        async with self._record_locks.setdefault(build_id, asyncio.Lock()):
            return await run_to_completion(commit())

    async def _finish(self, build_id: str, status: BuildStatus, **changes: object) -> None:
        await self._update(build_id, status=status, completed_at=datetime.now(UTC), **changes)

    def _log(self, build_id: str) -> BuildLog:
        found = self._logs.get(build_id)
        if found is None:
            found = self._logs[build_id] = BuildLog(self.layout.build(build_id).log)
        return found

    async def _cleanup(self, paths: BuildPaths, *, finished: bool) -> None:
        """The working files of a run go; the record, the source and the log stay. The unpacked
        context and the Dockerfile stay too until the build has ended: a build the server's stop
        interrupted runs again at the next start."""
        def remove() -> None:
            for tree in (paths.bases, paths.base_store_run, paths.output, paths.pulled_bases,
                         paths.base_store, paths.secrets):
                shutil.rmtree(tree, ignore_errors=True)
            for file in (paths.source_disk, paths.scratch_disk, paths.storage_conf):
                file.unlink(missing_ok=True)
            if finished:
                shutil.rmtree(paths.staging, ignore_errors=True)
        await asyncio.to_thread(remove)


def _lane(spec: BuildSpec) -> str | None:
    if spec.builder_id is not None:
        return _builder_lane(spec.builder_id)
    return None


def _builder_lane(builder_id: str) -> str:
    return f"builder:{builder_id}"
