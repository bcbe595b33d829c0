"""A build's source: the upload stored as it came, its tree unpacked safely, its Dockerfile, the
hashes of its lockfiles.

``receive_source`` runs on the event loop and writes in a worker thread; ``unpack_source``,
``read_dockerfile`` and ``lockfile_hashes`` are blocking (the caller runs them in a thread). The
unpacking is the volumes' (:class:`hypemand.volumes.archive.Unpacker`): the same refusals of
traversal, absolute names, links out of the tree, devices, FIFOs and oversized headers, each
naming the entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
import tempfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from hypemand.builds.dockerfile import InvalidDockerfile
from hypemand.errors import BadRequest, DomainError
from hypemand.fsutil import fsync_dir, storage_errors
from hypemand.volumes.archive import STREAM_BUFFER, BodyReader, Unpacker, UnsafeArchive
from hypemand.volumes.models import ArchiveTooLarge

MAX_DOCKERFILE_BYTES = 1 << 20
# The provenance's ``lockfile_hashes``: the dependency lockfiles of the usual ecosystems, looked
# for at the context's root only.
LOCKFILES = ("package-lock.json", "yarn.lock", "pnpm-lock.yaml", "poetry.lock", "uv.lock", "Pipfile.lock",
             "requirements.txt", "go.sum", "Cargo.lock", "Gemfile.lock", "composer.lock")
# Entries (inodes) a context may have: far beyond a real one, bounded so that a hostile archive
# of empty files cannot fill the source disk's inode table.
MAX_SOURCE_ENTRIES = 1_000_000
WRITE_BATCH = 1 << 20  # bytes of the body gathered before a write (one thread hop each)
_GZIP_MAGIC = b"\x1f\x8b"
_TAR_BLOCK = 512
_USTAR_MAGIC = (257, b"ustar")  # POSIX and GNU tar both write it in each header


class SourceTooLarge(DomainError):
    status = 413
    code = "too_large"


class InvalidSource(BadRequest):
    code = "invalid_source"


class DockerfileMissing(BadRequest):
    code = "dockerfile_missing"


async def receive_source(body: AsyncIterator[bytes], dest: Path, limit: int) -> str:
    """Store the upload at ``dest`` (temp file, fsync, rename) and return ``sha256:<hex>`` of its
    bytes. More than ``limit`` bytes: 413, the partial file removed and the rest of the body left
    unread (the caller decides whether to drain it). Empty: 400. A full disk: 507."""
    digest = hashlib.sha256()
    fd, tmp = await asyncio.to_thread(_temp_file, dest)
    received = batched = 0
    batch: list[bytes] = []
    try:
        # Buffered: a worker's write and a close after a cancel take the same lock, so the file
        # is never closed under a write still running.
        with os.fdopen(fd, "wb") as out:
            async for chunk in body:
                received += len(chunk)
                if received > limit:
                    raise SourceTooLarge(f"source: the tarball is larger than the server's limit of "
                                         f"{limit} bytes")
                batch.append(chunk)
                batched += len(chunk)
                if batched >= WRITE_BATCH:
                    await asyncio.to_thread(_write, out, digest, batch)
                    batch, batched = [], 0
            if received == 0:
                raise InvalidSource("source: the tarball is empty; a tar.gz archive was expected")
            await asyncio.to_thread(_write, out, digest, batch, True)
        await asyncio.to_thread(_commit, tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # tiny, and also when cancelled (no await here)
        raise
    return f"sha256:{digest.hexdigest()}"


def _temp_file(dest: Path) -> tuple[int, str]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)


def _write(out: BinaryIO, digest: hashlib._Hash, batch: list[bytes], last: bool = False) -> None:
    with storage_errors("the build's source"):
        for chunk in batch:
            digest.update(chunk)
            out.write(chunk)
        if last:
            out.flush()
            os.fsync(out.fileno())


def _commit(tmp: str, dest: Path) -> None:
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def unpack_source(tarball: Path, context_dir: Path, max_bytes: int) -> None:
    """Unpack the tarball (tar.gz, or plain tar: told by its first bytes) into ``context_dir``
    (missing or empty). Refused with 400 ``invalid_source`` naming the entry, or 413 when its
    files hold more than ``max_bytes``; what was unpacked before is left for the caller to
    remove with the build's directory. Blocking."""
    with open(tarball, "rb") as file:
        compressed = _compressed(file)
        file.seek(0)
        reader = BodyReader(lambda: file.read(STREAM_BUFFER), os.fstat(file.fileno()).st_size)
        context_dir.mkdir(parents=True, exist_ok=True)
        unpacker = Unpacker(context_dir, max_bytes, MAX_SOURCE_ENTRIES, holder="build context")
        try:
            with storage_errors("the build's context"):
                unpacker.unpack(reader, compressed)
        except ArchiveTooLarge as exc:
            raise SourceTooLarge(f"source: {exc}") from exc
        except UnsafeArchive as exc:
            raise InvalidSource(f"source: {exc}") from exc


def _compressed(file: BinaryIO) -> bool:
    """True for gzip, False for a plain tar; 400 for anything else (the first tar block is
    looked at, also inside the gzip stream, so the refusal can say what the source is not)."""
    head = file.read(64 << 10)
    compressed = head.startswith(_GZIP_MAGIC)
    if compressed:
        try:
            head = zlib.decompressobj(wbits=31).decompress(head, _TAR_BLOCK)
        except zlib.error as exc:
            raise InvalidSource(f"source: the tarball is not a readable gzip stream: {exc}") from exc
    offset, magic = _USTAR_MAGIC
    block = head[:_TAR_BLOCK]
    empty = block.count(0) == _TAR_BLOCK  # an archive with no entries: a block of zeros
    if len(block) < _TAR_BLOCK or not (block[offset:offset + len(magic)] == magic or empty):
        raise InvalidSource("source: the upload is not a tar archive (gzip-compressed or plain)")
    return compressed


def read_dockerfile(context_dir: Path, form_dockerfile: str | None, path: str = "Dockerfile") -> str:
    """The Dockerfile's text: the form's when it gave one, else the file ``path`` of the source
    tree, a regular file inside it (a symbolic link may point within the tree, never out).
    Blocking."""
    if form_dockerfile is not None:
        if len(form_dockerfile.encode()) > MAX_DOCKERFILE_BYTES:
            raise InvalidDockerfile(f"dockerfile: larger than {MAX_DOCKERFILE_BYTES} bytes")
        return form_dockerfile
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if path.startswith("/") or not parts or ".." in parts:
        raise InvalidSource(f"the Dockerfile's path {path!r} must be a path inside the source")
    root = context_dir.resolve()
    found = Path(os.path.realpath(context_dir.joinpath(*parts)))
    if not found.is_relative_to(root):
        raise InvalidSource(f"source: {path!r} is a symbolic link that leads out of the source tree")
    try:
        fd = os.open(found, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        raise DockerfileMissing(f"no Dockerfile: the source tarball has no {path!r} and the request has no "
                                "'dockerfile' field; give one either way") from None
    except OSError as exc:  # a loop of symbolic links
        raise InvalidSource(f"source: {path!r} cannot be read: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidSource(f"source: {path!r} is not a regular file")
        data = os.read(fd, MAX_DOCKERFILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_DOCKERFILE_BYTES:
        raise InvalidDockerfile(f"source: {path!r} is larger than {MAX_DOCKERFILE_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise InvalidDockerfile(f"source: {path!r} is not UTF-8 text: {exc}") from exc


def lockfile_hashes(context: Path) -> dict[str, str]:
    """``{name: "sha256:<hex>"}`` of the :data:`LOCKFILES` at the context's root that are regular
    files (a symbolic link is not followed: it may lead out of the tree), hashed a buffer at a
    time. Blocking."""
    found: dict[str, str] = {}
    for name in LOCKFILES:
        try:
            # O_NONBLOCK: a FIFO of that name would otherwise block the open.
            fd = os.open(context / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:  # missing, a symbolic link (ELOOP), unreadable: not a lockfile to report
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                with open(fd, "rb", closefd=False) as file:
                    found[name] = "sha256:" + hashlib.file_digest(file, "sha256").hexdigest()
        finally:
            os.close(fd)
    return found
