"""One build's VM part: the source disk, the builder VM, buildah inside it, the copy out.

The steps (the inputs were staged by :mod:`hypemand.builds.pipeline`), bounded by the build's
timeout (the service's ``asyncio.timeout``):

1. ``staging/`` (context, Dockerfile, bases, ``storage.conf``, secrets) becomes the read-only
   source disk;
2. the builder VM is created from the builder image (by digest), with the source disk at
   ``/src`` and the cache disk (the builder's, or a scratch one) at ``/mnt/cache``, without
   network;
3. :data:`BUILD_SCRIPT` runs through the guest agent: buildah pulls a builder's bases into its
   store (the others come unpacked), builds with ``--isolation chroot --layers`` and writes the
   result as an OCI layout with a placeholder for each base layer; every output line goes to the
   build's log;
4. the layout is copied out (only ``oci-layout``, ``index.json`` and ``blobs/sha256/<hex>``, each
   no larger than announced and all within :data:`MAX_OUTPUT_BYTES`: the VM ran the
   Dockerfile's code and is not trusted).

Whatever ends a run (success, failure, timeout, a cancel, once or again), the VM's end runs to
completion before :meth:`BuildRunner.build` returns or raises: a builder's cache disk is flushed,
the disks are revoked, the VM is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from hypemand.aiotools import run_to_completion
from hypemand.builds import disks
from hypemand.builds.models import BuildRecord
from hypemand.errors import DomainError
from hypemand.guest.client import AgentClient
from hypemand.guest.transfer import GetEntry, GetEntryError
from hypemand.images.disk import build_ext4
from hypemand.instances.models import CreateInstanceRequest, NetworkRequest, VolumeMountRequest
from hypemand.layout import BuildPaths

log = logging.getLogger(__name__)

SOURCE_MOUNT = "/src"
CACHE_MOUNT = "/mnt/cache"  # /var is the image's own: a volume may not cover it
OUTPUT_DIR = "/tmp/hypeman-build-output"
BUILT_IMAGE = "localhost/hypeman-build-result:latest"
AGENT_WAIT_SECONDS = 300.0
# The builder VM's writable root holds buildah's run directory and the output layout.
BUILDER_OVERLAY = "20GB"
ERROR_TAIL_LINES = 20
BUILD_TAG = "hypeman.build"  # on a builder VM: the build it runs
SYNC_SECONDS = 60.0
MAX_OUTPUT_BYTES = 20 << 30  # the builder VM's writable root (BUILDER_OVERLAY) cannot hold more
_BLOB_PATH = re.compile(r"^blobs/sha256/[0-9a-f]{64}$")
_LAYOUT_FILES = frozenset({"oci-layout", "index.json"})

# Runs in the builder VM: "$@" are the hex digests of the bases' layers (uncompressed).
BUILD_SCRIPT = r"""
set -eu
export CONTAINERS_STORAGE_CONF=/src/storage.conf
i=0
for ref in $PULL; do  # a builder's build keeps its bases in the builder's store
    echo "==> loading base image $ref"
    id=$(buildah pull --quiet "oci:/src/bases:base$i")
    buildah tag "$id" "$ref"
    i=$((i + 1))
done
secrets=""
if [ -d /src/secrets ]; then
    for s in /src/secrets/*; do
        [ -f "$s" ] && secrets="$secrets --secret id=$(basename "$s"),src=$s"
    done
fi
echo "==> building"
cd /src/context
# shellcheck disable=SC2086
buildah bud --isolation chroot --pull-never --layers $secrets -f /src/Dockerfile -t "$RESULT" .
echo "==> exporting the image"
rm -rf "$OUTPUT"
mkdir -p "$OUTPUT/blobs/sha256"
for layer in "$@"; do  # the bases' layers: the host has them (see builds/base_store.py)
    : > "$OUTPUT/blobs/sha256/$layer"
done
buildah push --quiet "$RESULT" "oci:$OUTPUT:latest"
"""


class BuildFailed(DomainError):
    """The build ended without an image; ``str`` is what the client reads in ``error``."""

    status = 422
    code = "build_failed"


@dataclass
class BuildJob:
    """What one run needs besides the record: where its files are, and its disks."""

    record: BuildRecord
    paths: BuildPaths
    cache_disk: Path  # the builder's, or the build's scratch disk (made by the caller)
    builder_image: str  # the ready builder image's name
    cache_ref: str  # the cache disk's volume name (one per disk: two VMs never share it)
    persistent_cache: bool  # a builder's disk: flushed before the VM ends (a scratch one is not)
    base_layers: set[str]  # hex uncompressed digests of the bases' layers: placeholders out
    pull: list[str]  # bases the VM pulls from /src/bases (base0, base1...) under these names


def builder_vm_name(build_id: str) -> str:
    return f"build-{build_id}"


class _VM:
    """The builder VM of one run, as far as it got."""

    def __init__(self) -> None:
        self.instance_id: str | None = None
        self.agent: AgentClient | None = None

    async def create(self, host: RunnerHost, request: CreateInstanceRequest) -> None:
        self.instance_id = await host.create_vm(request)


class RunnerHost:
    """What a run uses of the server (the instance manager; a seam for the unit tests)."""

    async def create_vm(self, request: CreateInstanceRequest) -> str:
        raise NotImplementedError

    async def agent(self, instance_id: str, wait: float) -> AgentClient:
        raise NotImplementedError

    async def delete_vm(self, instance_id: str) -> None:
        raise NotImplementedError


LogSink = Callable[[bytes], Awaitable[None]]


class BuildRunner:
    def __init__(self, host: RunnerHost, volumes: disks.BuildVolumes) -> None:
        self.host = host
        self.volumes = volumes

    async def build(self, job: BuildJob, write_log: LogSink, on_vm: Callable[[str], Awaitable[None]]) -> Path:
        """Steps 1 to 3 and the copy out; returns the output layout. Raises BuildFailed.

        Whatever ends it (failure, timeout, cancel, once or again), the VM is ended before this
        returns or raises: its end runs to completion (``run_to_completion``)."""
        record = job.record
        await run_to_completion(asyncio.to_thread(build_ext4, job.paths.staging, job.paths.source_disk,
                                                  "build-source"))
        source = disks.source_ref(record.id)
        self.volumes.grant(source, job.paths.source_disk)
        self.volumes.grant(job.cache_ref, job.cache_disk)
        vm = _VM()
        try:
            request = CreateInstanceRequest(
                name=builder_vm_name(record.id),
                image=job.builder_image,
                vcpus=record.spec.cpus,
                size=f"{record.spec.memory_mb}MB",
                overlay_size=BUILDER_OVERLAY,
                network=NetworkRequest(enabled=False),
                volumes=[
                    VolumeMountRequest(volume_id=source, mount_path=SOURCE_MOUNT, readonly=True),
                    VolumeMountRequest(volume_id=job.cache_ref, mount_path=CACHE_MOUNT),
                ],
                tags={BUILD_TAG: record.id},
                skip_kernel_headers=True,
            )
            await write_log(b"==> starting the builder VM\n")
            await run_to_completion(vm.create(self.host, request))  # a VM made is a VM known
            assert vm.instance_id is not None
            await on_vm(vm.instance_id)
            vm.agent = await self.host.agent(vm.instance_id, AGENT_WAIT_SECONDS)
            await self._run_script(vm.agent, job, write_log)
            await asyncio.to_thread(shutil.rmtree, job.paths.output, True)
            await self._copy_out(vm.agent, job.paths, job.base_layers)
            return job.paths.output
        finally:
            await run_to_completion(self._end(vm, [source, job.cache_ref], flush=job.persistent_cache))

    async def _end(self, vm: _VM, refs: list[str], *, flush: bool) -> None:
        if flush and vm.agent is not None:
            await _flush(vm.agent)
        for ref in refs:
            self.volumes.revoke(ref)
        if vm.instance_id is not None:
            await self._delete_vm(vm.instance_id)

    async def _delete_vm(self, instance_id: str) -> None:
        try:
            await self.host.delete_vm(instance_id)
        except Exception:
            log.exception("could not delete builder VM %s", instance_id)

    async def _run_script(self, agent: AgentClient, job: BuildJob, write_log: LogSink) -> None:
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "RESULT": BUILT_IMAGE,
            "OUTPUT": OUTPUT_DIR,
            "PULL": " ".join(job.pull),
        }
        argv = ["/bin/sh", "-c", BUILD_SCRIPT, "build", *sorted(job.base_layers)]
        proc = await agent.exec(argv, env=env, merge_stderr=True)
        tail = LineTail(ERROR_TAIL_LINES)
        try:
            async for chunk in proc:
                tail.feed(chunk.data)
                await write_log(chunk.data)
            result = await proc.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await proc.kill()
            raise
        if result.exit_code != 0:
            raise BuildFailed(f"the build failed (exit code {result.exit_code}):\n{tail.text()}")

    async def _copy_out(self, agent: AgentClient, paths: BuildPaths, placeholders: set[str]) -> None:
        """The output layout, file by file; anything but a layout's own files is refused."""
        base = Path(OUTPUT_DIR).name
        dest = paths.output
        await asyncio.to_thread(paths.output_blobs.mkdir, parents=True, exist_ok=True)
        budget = [MAX_OUTPUT_BYTES]  # what the VM may still hand back, in all
        async for item in agent.get(OUTPUT_DIR):
            if isinstance(item, GetEntryError):
                raise BuildFailed(f"reading the built image failed: {item.path}: {item.message}")
            relative = _relative(item.header.path, base)
            if item.header.is_dir and relative in ("", "blobs", "blobs/sha256"):
                continue
            if not (relative in _LAYOUT_FILES or _BLOB_PATH.fullmatch(relative)) or item.header.is_dir:
                raise BuildFailed(f"the builder produced an unexpected file {relative!r}")
            if relative.rsplit("/", 1)[-1] in placeholders and item.header.size == 0:
                continue  # a base layer: the host has it
            await _save(item, dest / relative, budget)


async def _flush(agent: AgentClient) -> None:
    """Write the cache disk's dirty pages before the VM is ended: a layer store left half in the
    guest's page cache reads back corrupt in the next build (seen: "file integrity checksum
    failed"). Best effort: a VM that does not answer is ended anyway."""
    try:
        await asyncio.wait_for(agent.run(["/bin/sync"], timeout=SYNC_SECONDS), SYNC_SECONDS + 5)
    except Exception as exc:
        log.warning("could not flush the builder VM's disks: %s", exc)


def _relative(path: str, base: str) -> str:
    if path == base:
        return ""
    if path.startswith(base + "/"):
        return path[len(base) + 1:]
    raise BuildFailed(f"the builder produced an unexpected file {path!r}")


async def _save(item: GetEntry, target: Path, budget: list[int]) -> None:
    """One file of the output, no larger than its header said nor than what is left of the
    budget (the guest is not trusted to stop)."""
    size = item.header.size
    if size > budget[0]:
        raise BuildFailed(f"the built image is larger than {MAX_OUTPUT_BYTES >> 30} GiB")
    budget[0] -= size
    written = 0
    handle = await asyncio.to_thread(open, target, "wb")
    try:
        async for chunk in item:
            written += len(chunk)
            if written > size:
                raise BuildFailed(f"the builder sent more than {size} bytes for {item.header.path}")
            await asyncio.to_thread(handle.write, chunk)
    finally:
        await asyncio.to_thread(handle.close)
    if item.error is not None or written != size:
        raise BuildFailed(f"reading the built image failed: {item.header.path}: {item.error or 'short'}")


class LineTail:
    """The last ``size`` lines of a byte stream (for the error of a failed build), each cut to
    ``width`` bytes: a build that prints one endless line costs no more than a short one."""

    def __init__(self, size: int, width: int = 4096) -> None:
        self.size = size
        self.width = width
        self.lines: list[str] = []
        self.partial = b""

    def feed(self, data: bytes) -> None:
        *complete, last = data.split(b"\n")
        if complete:
            complete[0] = self.partial + complete[0]
            self.partial = b""
            for line in complete[-self.size:]:
                self.lines.append(line[: self.width].decode(errors="replace"))
            del self.lines[: -self.size]
        if len(self.partial) < self.width:
            self.partial += last[: self.width - len(self.partial)]

    def text(self) -> str:
        last = [*self.lines, self.partial.decode(errors="replace")] if self.partial else self.lines
        return "\n".join(last[-self.size:])
