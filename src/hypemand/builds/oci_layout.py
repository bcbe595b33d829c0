"""OCI image layouts in and out of the server's image store.

* :func:`import_layout`: a layout (a Debian root made by ``rootfs.py``, a build's output) becomes
  an image exactly the way a ``/v2`` push does: its blobs are committed to the ``BlobStore``
  (verified), then its manifest goes through ``RegistryService.put_manifest``, which validates it,
  records the revision and tag, and hands it to ``ImageService.import_manifest``.
* :func:`ensure_system_image`: the same, once per content: idempotent and safe to call
  concurrently; waits until the image is ready.
* :func:`export_layout`: images of the store (pulled first if missing) written as one layout whose
  index names them ``base0``, ``base1``, ... in order: what a build loads into buildah.

Blobs are hard-linked between the layout and the store when both are on one filesystem (the
store's blobs are never written in place, so sharing an inode is safe), else copied. All file work
runs off the event loop.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import shutil
import stat
import uuid
import weakref
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel

from hypemand.aiotools import run_to_completion
from hypemand.errors import BadRequest
from hypemand.fsutil import fsync_dir, write_atomic
from hypemand.images.errors import DigestInvalid, ImageNotFound, ImagePullFailed, InvalidName
from hypemand.images.manifests import ManifestInvalid, parse_manifest
from hypemand.images.media_types import (
    DOCKER_MANIFEST,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from hypemand.images.models import Descriptor, ImageIndex, ImageManifest, ReadyImage
from hypemand.images.reference import SHA256_DIGEST_RE, parse_reference
from hypemand.images.service import ImageService
from hypemand.layout import OciLayoutPaths

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
# Docker schema 2 media types and their OCI equivalents. The containers/image of Debian's buildah
# and skopeo (1.28, 1.9) finds no image in an OCI layout whose index entry is a Docker manifest
# ("no descriptor found for reference"), so an exported Docker image is described in OCI terms;
# the config and layer bytes are the same (a Docker image config is a valid OCI config).
OCI_EQUIVALENT = {
    DOCKER_MANIFEST: OCI_MANIFEST,
    "application/vnd.docker.container.image.v1+json": "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip":
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
}
# How long export_layout waits for a base image that is not ready (pulled, converted) yet.
DEFAULT_BASE_TIMEOUT_SECONDS = 600.0
_LINK_REFUSED = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES}


class LayoutInvalid(BadRequest):
    """An OCI layout that cannot be imported: not exactly one image, a missing or wrong blob."""

    code = "layout_invalid"


class ExportedBase(BaseModel):
    """One image written by :func:`export_layout`."""

    layout_name: str  # ``base0``...: the index's ``org.opencontainers.image.ref.name``
    reference: str  # as asked
    image_name: str  # the store's name for it (``docker.io/library/alpine:3``)
    digest: str  # its manifest digest in the store (what the provenance names)
    media_type: str  # that manifest's media type (OCI or Docker schema 2)
    # The manifest in the layout: the store's own for an OCI image; for a Docker schema 2 image
    # its OCI rewrite (same config and layers), so this digest differs from ``digest``.
    layout_digest: str


class LayoutImage(BaseModel):
    """The one image of a layout: its manifest bytes and what they name."""

    digest: str
    media_type: str
    body: bytes
    blobs: list[Descriptor]  # config first, then the layers


# ---- reading a layout ----------------------------------------------------------------------------


def read_layout(layout: Path) -> LayoutImage:
    """The single image of the layout at ``layout``, its manifest verified (blocking, small reads).

    Refused (:class:`LayoutInvalid`): no ``index.json``, an index with other than exactly one
    entry, an entry that is not an image manifest, a manifest whose bytes do not hash to the
    index's digest.
    """
    paths = OciLayoutPaths(layout)
    try:
        index_bytes = _read_small(paths.index, "index.json")
        parsed_index = parse_manifest(index_bytes, OCI_INDEX)
    except ManifestInvalid as exc:
        raise LayoutInvalid(f"the layout's index.json is not an image index: {exc}") from exc
    if not isinstance(parsed_index.document, ImageIndex):
        raise LayoutInvalid("the layout's index.json is an image manifest, not an index")
    entries = parsed_index.document.manifests
    if len(entries) != 1:
        raise LayoutInvalid(f"the layout must hold exactly one image; its index has {len(entries)} entries")
    entry = entries[0]
    if entry.media_type not in MANIFEST_TYPES:
        raise LayoutInvalid(f"the layout's image is a {entry.media_type!r}, not an image manifest")
    body = _read_small(_blob_file(paths, entry), f"manifest {entry.digest}")
    actual = "sha256:" + hashlib.sha256(body).hexdigest()
    if actual != entry.digest or len(body) != entry.size:
        raise LayoutInvalid(f"the layout's manifest does not match its index entry {entry.digest} "
                            f"(its bytes hash to {actual}, {len(body)} bytes)")
    try:
        manifest = parse_manifest(body, entry.media_type)
    except ManifestInvalid as exc:
        raise LayoutInvalid(f"the layout's manifest is invalid: {exc}") from exc
    if not isinstance(manifest.document, ImageManifest):
        raise LayoutInvalid("the layout's manifest is an index, not an image manifest")
    document = manifest.document
    return LayoutImage(digest=entry.digest, media_type=manifest.media_type, body=body,
                       blobs=[document.config, *document.layers])


def _read_small(path: Path, what: str) -> bytes:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise LayoutInvalid(f"the layout has no {what}") from None
    if not stat.S_ISREG(info.st_mode):
        raise LayoutInvalid(f"the layout's {what} is not a regular file")
    if info.st_size > MAX_MANIFEST_BYTES:
        raise LayoutInvalid(f"the layout's {what} is larger than {MAX_MANIFEST_BYTES} bytes")
    return path.read_bytes()


def _blob_file(paths: OciLayoutPaths, descriptor: Descriptor) -> Path:
    """The regular file of a blob in the layout (never a symlink: it could point anywhere)."""
    if not SHA256_DIGEST_RE.fullmatch(descriptor.digest):
        raise LayoutInvalid(f"unsupported digest {descriptor.digest!r}")
    path = paths.blob(descriptor.digest)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise LayoutInvalid(f"the layout has no blob {descriptor.digest}") from None
    if not stat.S_ISREG(info.st_mode):
        raise LayoutInvalid(f"the layout's blob {descriptor.digest} is not a regular file")
    if info.st_size != descriptor.size:
        raise LayoutInvalid(f"the layout's blob {descriptor.digest} has {info.st_size} bytes, "
                            f"its descriptor says {descriptor.size}")
    return path


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` (absent) gets ``source``'s bytes: a hard link if the filesystem allows it."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in _LINK_REFUSED:
            raise
        shutil.copyfile(source, target)


# ---- import --------------------------------------------------------------------------------------


async def import_layout(images: ImageService, layout: Path, repository: str, tag: str) -> str:
    """Import the single image of the OCI layout at ``layout`` as ``/v2`` repository
    ``repository`` with ``tag`` (``hypeman/builder`` + ``latest`` -> image
    ``docker.io/hypeman/builder:latest``); returns the manifest digest. The image is then queued
    for conversion like any pushed image: wait for it with ``ImageService.wait``.

    Blobs the store already has are taken from the store (content addressing makes them the same
    bytes); the others are verified while they are committed. A refused layout
    (:class:`LayoutInvalid`) leaves no image, tag or revision; blobs it brought that verified may
    stay in the store, as after an interrupted push.
    """
    image = await asyncio.to_thread(read_layout, layout)
    await asyncio.to_thread(_commit_blobs, images, OciLayoutPaths(layout), image.blobs)
    revision = await images.push_registry.put_manifest(repository, tag, image.body, image.media_type)
    return revision.digest


def _commit_blobs(images: ImageService, paths: OciLayoutPaths, blobs: Iterable[Descriptor]) -> None:
    for descriptor in blobs:
        if images.blobs.has(descriptor.digest):  # a build's base layers are not in its output
            continue
        source = _blob_file(paths, descriptor)
        tmp = images.blobs.temp_path()
        _link_or_copy(source, tmp)
        try:
            images.blobs.commit_file(tmp, descriptor.digest)  # hashes it; removes tmp on mismatch
        except DigestInvalid as exc:
            message = f"the layout's blob {descriptor.digest} does not match its digest: {exc}"
            raise LayoutInvalid(message) from exc


# ---- system images -------------------------------------------------------------------------------

_locks: weakref.WeakKeyDictionary[ImageService, dict[str, asyncio.Lock]] = weakref.WeakKeyDictionary()


async def ensure_system_image(images: ImageService, layout: Path, name: str) -> ReadyImage:
    """The ready image ``name`` (``hypeman/builder:latest`` or ``docker.io/hypeman/builder:latest``)
    with the content of ``layout``: imported unless the store already has that digest under that
    name (pending, converting or ready), then waited for. Concurrent calls for one name import
    once. A conversion that fails raises ``ImagePullFailed``; the next call imports again.
    """
    ref = parse_reference(name)
    if ref.domain != "docker.io" or ref.tag is None or ref.is_digest:
        raise InvalidName(f"a system image is named docker.io/<repository>:<tag>, not {name!r}")
    wanted = await asyncio.to_thread(read_layout, layout)
    image_name = str(ref)
    async with _locks.setdefault(images, {}).setdefault(image_name, asyncio.Lock()):
        try:
            current = await images.get(image_name)
        except ImageNotFound:
            current = None
        if current is None or current.digest != wanted.digest or current.status == "failed":
            await import_layout(images, layout, ref.path, ref.tag)
        done = await images.wait(image_name)
        if done.status != "ready":
            raise ImagePullFailed(f"the import of system image {image_name} failed: {done.error}")
        return await images.get_ready(image_name)


# ---- export --------------------------------------------------------------------------------------


async def export_layout(images: ImageService, refs: list[str], dest: Path, *,
                        timeout: float = DEFAULT_BASE_TIMEOUT_SECONDS) -> list[ExportedBase]:  # noqa: ASYNC109
    """Write the images ``refs`` as one OCI layout at ``dest`` (created if missing), the index's
    entries named ``base0``, ``base1``, ... in the order of ``refs``.

    Each reference is taken as an instance create takes it (``ImageService.ready_for_boot``):
    ready at once, waited for while it converts, pulled first if this server does not have it;
    its errors pass through (404 ``not_found``, 409 ``image_not_ready`` for a failed pull or one
    not ready within ``timeout`` seconds). The layout holds each image's platform manifest (the
    store's content is always the host's platform), config and layers.
    """
    ready = [await images.ready_for_boot(ref, timeout) for ref in refs]
    # The pulls above may be cancelled; the copying, once begun, ends before its files are removed.
    copying = asyncio.to_thread(_write_export, images, refs, ready, OciLayoutPaths(dest))
    return await run_to_completion(copying)


def _write_export(images: ImageService, refs: list[str], ready: list[ReadyImage],
                  paths: OciLayoutPaths) -> list[ExportedBase]:
    paths.blobs.mkdir(parents=True, exist_ok=True)
    exported: list[ExportedBase] = []
    entries: list[dict[str, object]] = []
    for number, (ref, image) in enumerate(zip(refs, ready, strict=True)):
        body = images.blobs.read_bytes(image.digest)  # the store keeps every manifest as a blob
        parsed = parse_manifest(body, None)
        if not isinstance(parsed.document, ImageManifest):
            raise ImageNotFound(f"content {image.digest} of {image.name} is not an image manifest")
        for descriptor in [parsed.document.config, *parsed.document.layers]:
            _export_blob(images, paths, descriptor.digest)
        if parsed.media_type == OCI_MANIFEST:
            _export_blob(images, paths, image.digest)
            layout_body, layout_digest = body, image.digest
        else:
            layout_body = as_oci_manifest(body)
            layout_digest = "sha256:" + hashlib.sha256(layout_body).hexdigest()
            write_atomic(paths.blob(layout_digest), layout_body)
        name = f"base{number}"
        entries.append({"mediaType": OCI_MANIFEST, "digest": layout_digest, "size": len(layout_body),
                        "annotations": {REF_NAME_ANNOTATION: name}})
        exported.append(ExportedBase(layout_name=name, reference=ref, image_name=image.name,
                                     digest=image.digest, media_type=parsed.media_type,
                                     layout_digest=layout_digest))
    fsync_dir(paths.blobs)
    write_atomic(paths.marker, b'{"imageLayoutVersion":"1.0.0"}')
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    write_atomic(paths.index, json.dumps(index, indent=2).encode())
    return exported


def as_oci_manifest(docker_manifest: bytes) -> bytes:
    """A Docker schema 2 manifest rewritten as an OCI image manifest: the same config and layers
    (digests, sizes, URLs, annotations), their media types translated (:data:`OCI_EQUIVALENT`)."""
    document = json.loads(docker_manifest)

    def translated(descriptor: dict[str, object]) -> dict[str, object]:
        kind = str(descriptor.get("mediaType"))
        if kind not in OCI_EQUIVALENT:
            raise LayoutInvalid(f"no OCI equivalent of the media type {kind!r}")
        return dict(descriptor, mediaType=OCI_EQUIVALENT[kind])

    oci = dict(document, mediaType=OCI_MANIFEST, config=translated(document["config"]),
               layers=[translated(layer) for layer in document["layers"]])
    return json.dumps(oci, separators=(",", ":")).encode()


def _export_blob(images: ImageService, paths: OciLayoutPaths, digest: str) -> None:
    target = paths.blob(digest)
    if target.exists():
        return
    if not images.blobs.has(digest):
        raise ImageNotFound(f"blob {digest} is missing from the image store")
    partial = paths.partial_blob(uuid.uuid4().hex)
    try:
        _link_or_copy(images.blobs.path(digest), partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
