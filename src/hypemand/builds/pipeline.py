"""The steps of one build's run, between the queue and the record: the inputs, the VM, the result.

:class:`BuildPipeline` makes the builder image ready (imported into the store the first time),
exports the bases and stages them (``base_store``), copies the build's secrets, picks the cache
disk (the builder's, or a fresh scratch disk), hands the VM part to :class:`BuildRunner`, and
imports what it produced through the ``/v2`` push path. What it learns on the way (the builder's
version, the base's digest, the VM's id) it notes in the record through the service's ``note``.
The status, the timeout and the cleanup are the service's.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable
from pathlib import Path
from typing import Protocol

from hypemand.aiotools import run_to_completion
from hypemand.builds import base_store, disks, oci_layout, rootfs
from hypemand.builds.builders import BuilderService
from hypemand.builds.events import BuildLog
from hypemand.builds.models import BuildRecord
from hypemand.builds.runner import BuildFailed, BuildJob, BuildRunner
from hypemand.images.reference import parse_reference, pushed_image_reference
from hypemand.images.service import ImageService
from hypemand.layout import BuildPaths
from hypemand.volumes.disk import make_disk

GIB = 1 << 30
SCRATCH_DISK_GB = 20  # sparse: costs what the build writes


class Noter(Protocol):
    def __call__(self, **changes: object) -> Awaitable[None]: ...


class BuildPipeline:
    def __init__(self, images: ImageService, builders: BuilderService, runner: BuildRunner,
                 system_dir: Path, secrets_dir: Path | None) -> None:
        self.images = images
        self.builders = builders
        self.runner = runner
        self.system_dir = system_dir  # where the setup step made the builder's root
        self.secrets_dir = secrets_dir

    async def build(self, record: BuildRecord, paths: BuildPaths, build_log: BuildLog, note: Noter) -> Path:
        """Everything up to the result's layout in ``paths.output`` (BuildFailed and the store's
        errors pass through)."""
        await build_log.append(b"==> preparing the builder image\n")
        prepared = await asyncio.to_thread(rootfs.ensure_rootfs, rootfs.BUILDER, self.system_dir)
        builder_image = await oci_layout.ensure_system_image(self.images, prepared.layout,
                                                             rootfs.BUILDER.name)
        buildah = prepared.info.packages.get("buildah", "unknown")
        await note(builder_version=f"buildah {buildah}")
        await build_log.append(b"==> exporting base images\n")
        wanted = list(record.base_images)
        if wanted and record.spec.base_image_digest:  # the first stage's base, pinned
            wanted[0] = f"{parse_reference(wanted[0]).repository}@{record.spec.base_image_digest}"
        # A pull of a missing base may be cancelled; the copying after it is waited for.
        bases = await oci_layout.export_layout(self.images, wanted, paths.bases)
        if bases:
            await note(base_image_digest=bases[0].digest)
        builder = record.spec.builder_id is not None
        if not builder:
            await build_log.append(b"==> unpacking base images\n")
        # Threads whose files the run's cleanup removes next are waited for, even on a cancel.
        layers = await run_to_completion(asyncio.to_thread(
            base_store.stage_bases, paths, bases, record.base_images, builder))
        await run_to_completion(asyncio.to_thread(self._copy_secrets, record, paths))
        if record.spec.builder_id is not None:
            await self.builders.used(record.spec.builder_id)
            cache = self.builders.cache_disk(record.spec.builder_id).cache_disk
        else:
            cache = paths.scratch_disk
            await run_to_completion(asyncio.to_thread(_fresh_disk, cache, SCRATCH_DISK_GB * GIB))

        async def on_vm(instance_id: str) -> None:
            await note(builder_instance_id=instance_id)

        placeholders = {diff_id.removeprefix("sha256:") for diff_id in layers}
        # Booted by digest: a push to its name meanwhile cannot change what runs the build.
        pinned = f"{parse_reference(builder_image.name).repository}@{builder_image.digest}"
        job = BuildJob(record=record, paths=paths, cache_disk=cache, builder_image=pinned,
                       cache_ref=disks.cache_ref(record.id, record.spec.builder_id), persistent_cache=builder,
                       base_layers=placeholders, pull=record.base_images if builder else [])
        output = await self.runner.build(job, build_log.append, on_vm)
        await asyncio.to_thread(base_store.substitute_base_layers, output, layers)
        return output

    def _copy_secrets(self, record: BuildRecord, paths: BuildPaths) -> None:
        if not record.spec.secrets or self.secrets_dir is None:
            return
        target = paths.secrets
        target.mkdir(parents=True, exist_ok=True)
        for secret in record.spec.secrets:
            shutil.copyfile(self.secrets_dir / secret.id, target / secret.id)

    async def publish(self, record: BuildRecord, output: Path) -> tuple[str, str]:
        """The result into the store as ``builds/<id>`` (or ``image_name``), ready: its manifest
        digest and the image's name."""
        repository, tag = record.image_repository or f"builds/{record.id}", record.image_tag
        digest = await oci_layout.import_layout(self.images, output, repository, tag)
        name = str(pushed_image_reference(repository, tag))
        image = await self.images.wait(name)
        if image.status != "ready":
            raise BuildFailed(f"the built image could not be converted: {image.error}")
        return digest, name


def _fresh_disk(disk: Path, size: int) -> None:
    disk.unlink(missing_ok=True)
    make_disk(disk, size)
