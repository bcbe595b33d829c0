"""Unpack a tar.gz stream into a staging directory, refusing anything that could reach outside it
or that a volume should not hold. Blocking: runs in a worker thread.

The archive is read once, as a stream (``tarfile`` mode ``r|gz``): nothing is held in memory but
one entry's header (long names and pax headers are bounded, :data:`MAX_HEADER_BYTES`) and one
copy buffer. Refused, each with a message naming the entry (:class:`UnsafeArchive`, 400):

* names that are absolute or contain ``..``, or a NUL;
* an entry below a symbolic link of the archive (the unpacking never follows a link);
* symbolic links whose target is absolute or climbs above the volume's root;
* hard links whose target is outside the archive's tree, missing, or a directory;
* device nodes, FIFOs and entry types tar writers do not produce for files.

Limits are checked before each entry is written, so an oversized archive stops at the entry
that crosses them (:class:`ArchiveTooLarge`, 400 ``archive_too_large``): the regular files'
bytes against the volume's size, the number of entries against its inode count, and the
compressed stream itself (:class:`BodyReader`) against the size plus gzip's overhead.

Owners (when the server runs as root), modes, mtimes and ``user.``/``security.`` extended
attributes are kept; ``mke2fs -d`` carries them into the file system.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypemand.errors import BadRequest
from hypemand.volumes.models import ArchiveTooLarge

MAX_HEADER_BYTES = 1 << 20  # a pax header or GNU long name/link: 1 MiB is far beyond any real one
COPY_CHUNK = 1 << 20
STREAM_BUFFER = 256 << 10  # compressed bytes decompressed at a time
_XATTR_PREFIX = "SCHILY.xattr."
# Extended attributes a volume keeps. trusted.* (overlayfs's own, among others) and system.*
# other than ACLs mean something to the guest's kernel, not to the files.
_XATTRS_KEPT = ("user.", "security.", "system.posix_acl_")
_LONG_HEADERS = {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                 tarfile.SOLARIS_XHDTYPE}


class UnsafeArchive(BadRequest):
    code = "bad_request"


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses a pax header or GNU long name larger than MAX_HEADER_BYTES before
    ``tarfile`` reads it into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _LONG_HEADERS and self.size > MAX_HEADER_BYTES:
            raise UnsafeArchive(f"the archive has a {self.size}-byte extended header; at most "
                                f"{MAX_HEADER_BYTES} bytes are accepted")
        return super()._proc_member(tarfile_)  # type: ignore[misc,no-any-return]


class BodyReader:
    """A read-only binary stream over ``next_chunk()`` (b"" at the end), counting what it gives
    and refusing more than ``limit`` bytes."""

    def __init__(self, next_chunk: Callable[[], bytes], limit: int) -> None:
        self._next_chunk = next_chunk
        self._limit = limit
        self._buffer = b""
        self._offset = 0
        self._eof = False
        self.received = 0

    def read(self, size: int = -1) -> bytes:
        while not self._eof and (size < 0 or len(self._buffer) - self._offset < size):
            chunk = self._next_chunk()
            if not chunk:
                self._eof = True
                break
            self.received += len(chunk)
            if self.received > self._limit:
                raise ArchiveTooLarge(f"the archive is larger than the {self._limit} bytes a volume of "
                                      "this size can take")
            self._buffer = self._buffer[self._offset:] + chunk
            self._offset = 0
        end = len(self._buffer) if size < 0 else min(len(self._buffer), self._offset + size)
        data = self._buffer[self._offset:end]
        self._offset = end
        return data


class GunzipReader:
    """The decompressed bytes of a gzip stream (members one after another, as gzip(1) writes
    them), never more than asked for at a time: ``tarfile``'s own ``r|gz`` decompresses a whole
    input buffer at once, which for a highly compressible archive is hundreds of MB in memory
    (and copied again at every header)."""

    def __init__(self, raw: BodyReader) -> None:
        self._raw = raw
        self._inflate = zlib.decompressobj(wbits=31)  # gzip framing only
        self._started = False

    def read(self, size: int = -1) -> bytes:
        size = COPY_CHUNK if size < 0 else size
        while True:
            inflate = self._inflate
            if inflate.eof:  # a member ended: another may follow
                pending = inflate.unused_data or self._raw.read(STREAM_BUFFER)
                if not pending:
                    return b""
                self._inflate = inflate = zlib.decompressobj(wbits=31)
            elif inflate.unconsumed_tail:
                pending = inflate.unconsumed_tail
            else:
                pending = self._raw.read(STREAM_BUFFER)
                if not pending:
                    raise UnsafeArchive("the archive ends in the middle of its gzip stream" if self._started
                                        else "the body is empty; a tar.gz archive was expected")
            self._started = True
            data = inflate.decompress(pending, size)
            if data:
                return data


@dataclass
class Unpacked:
    """What an archive held, for the file system built from it."""

    entries: int = 0
    file_bytes: int = 0
    root_mode: int | None = None  # the archive's own "./" entry, if it has one
    root_owner: tuple[int, int] | None = None
    _directories: list[tuple[Path, tarfile.TarInfo]] = field(default_factory=list)


def split_name(name: str, what: str = "entry") -> list[str]:
    """An archive name as path components below the root, or UnsafeArchive."""
    if "\x00" in name:
        raise UnsafeArchive(f"archive {what} {name!r} has a NUL character in its name")
    if name.startswith("/"):
        raise UnsafeArchive(f"archive {what} {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"archive {what} {name!r} has '..' in its path")
    return parts


def symlink_stays_inside(parent: list[str], target: str) -> bool:
    """Whether a symbolic link in directory ``parent`` (components below the root) pointing at
    ``target`` resolves, as text, to a place inside the root."""
    if not target or target.startswith("/") or "\x00" in target:
        return False
    depth = len(parent)
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return False
        elif part not in ("", "."):
            depth += 1
    return True


class Unpacker:
    """Unpacks one archive stream into ``root`` (an empty directory). ``holder`` names what the
    tree becomes, in refusals: a volume here, a build's context in ``hypemand.builds.source``."""

    def __init__(self, root: Path, max_file_bytes: int, max_entries: int, holder: str = "volume") -> None:
        self.root = root
        self.max_file_bytes = max_file_bytes
        self.max_entries = max_entries
        self.holder = holder
        self.result = Unpacked()
        self._as_root = os.geteuid() == 0

    def unpack(self, stream: BodyReader, compressed: bool = True) -> Unpacked:
        """Unpack a tar.gz stream, or a plain tar one when not ``compressed``."""
        kind, source = ("tar.gz", GunzipReader(stream)) if compressed else ("tar", stream)
        try:
            with tarfile.open(fileobj=source, mode="r|",  # type: ignore[call-overload]
                              tarinfo=_BoundedTarInfo, bufsize=STREAM_BUFFER) as archive:
                for member in archive:
                    self._member(archive, member)
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise UnsafeArchive(f"the body is not a readable {kind} archive: {exc}") from exc
        for path, member in reversed(self.result._directories):  # children first: mtimes stay
            self._metadata(path, member)
        return self.result

    def _member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        parts = split_name(member.name)
        if not parts:
            if member.isdir():
                self.result.root_mode = stat.S_IMODE(member.mode)
                self.result.root_owner = (member.uid, member.gid)
            return
        result = self.result
        result.entries += 1
        if result.entries > self.max_entries:
            raise ArchiveTooLarge(f"the archive has more than the {self.max_entries} entries a "
                                  f"{self.holder} of this size has inodes for")
        if member.ischr() or member.isblk() or member.isfifo():
            raise UnsafeArchive(f"archive entry {member.name!r} is a device node or FIFO; a {self.holder} "
                                "holds files, directories and links only")
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise UnsafeArchive(f"archive entry {member.name!r} has an unsupported type {member.type!r}")
        path = self._directory(parts[:-1], member.name) / parts[-1]
        existing = _lstat(path)
        if existing is not None and (member.isdir() or stat.S_ISDIR(existing.st_mode)):
            if member.isdir() and stat.S_ISDIR(existing.st_mode):
                result._directories.append((path, member))
                return
            raise UnsafeArchive(f"archive entry {member.name!r} replaces a directory with a file, or "
                                "a file with a directory")
        if existing is not None:
            path.unlink()  # a later entry of the same name wins, as with tar
        if member.isdir():
            path.mkdir(mode=0o700)
            result._directories.append((path, member))
        elif member.isreg():
            result.file_bytes += member.size
            if result.file_bytes > self.max_file_bytes:
                raise ArchiveTooLarge(f"the archive's files are larger than the {self.holder} "
                                      f"({self.max_file_bytes} bytes); reached at {member.name!r}")
            self._write(archive, member, path)
            self._metadata(path, member)
        elif member.issym():
            if not symlink_stays_inside(parts[:-1], member.linkname):
                raise UnsafeArchive(f"symbolic link {member.name!r} -> {member.linkname!r} points outside "
                                    f"the {self.holder}")
            os.symlink(member.linkname, path)
            self._metadata(path, member)
        else:
            self._hard_link(member, path)

    def _directory(self, parts: list[str], name: str) -> Path:
        """The directory ``parts`` below the root, made (0700 until its own entry says more) where
        missing; never through a symbolic link."""
        directory = self.root
        for part in parts:
            directory = directory / part
            found = _lstat(directory)
            if found is None:
                directory.mkdir(mode=0o755)
            elif stat.S_ISLNK(found.st_mode):
                raise UnsafeArchive(f"archive entry {name!r} lies below a symbolic link")
            elif not stat.S_ISDIR(found.st_mode):
                raise UnsafeArchive(f"archive entry {name!r} lies below a file that is not a directory")
        return directory

    def _write(self, archive: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
        source = archive.extractfile(member)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            while source is not None and (chunk := source.read(COPY_CHUNK)):
                out.write(chunk)

    def _hard_link(self, member: tarfile.TarInfo, path: Path) -> None:
        target_parts = split_name(member.linkname, f"hard link {member.name!r} to")
        if not target_parts:
            raise UnsafeArchive(f"hard link {member.name!r} has no target")
        target = self._directory_existing(target_parts[:-1], member.name) / target_parts[-1]
        found = _lstat(target)
        if found is None or stat.S_ISDIR(found.st_mode):
            raise UnsafeArchive(f"hard link {member.name!r} -> {member.linkname!r} does not name a file "
                                "earlier in the archive")
        os.link(target, path, follow_symlinks=False)

    def _directory_existing(self, parts: list[str], name: str) -> Path:
        directory = self.root
        for part in parts:
            directory = directory / part
            found = _lstat(directory)
            if found is None or not stat.S_ISDIR(found.st_mode):
                raise UnsafeArchive(f"hard link {name!r} does not name a file earlier in the archive")
        return directory

    def _metadata(self, path: Path, member: tarfile.TarInfo) -> None:
        if self._as_root:
            os.chown(path, member.uid, member.gid, follow_symlinks=False)
        for key, value in (member.pax_headers or {}).items():
            name = key[len(_XATTR_PREFIX):]
            if key.startswith(_XATTR_PREFIX) and name.startswith(_XATTRS_KEPT):
                with contextlib.suppress(OSError):
                    os.setxattr(path, name, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
        if not member.issym():
            os.chmod(path, stat.S_IMODE(member.mode))  # after chown, which clears setuid bits
        with contextlib.suppress(OSError, OverflowError, ValueError):
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
