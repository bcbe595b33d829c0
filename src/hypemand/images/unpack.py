"""Apply OCI layer tarballs to a root directory, safely and with whiteouts.

Every write goes through :meth:`LayerApplier._resolve_parent`, which walks the parent
directories of an entry inside the root without ever leaving it:

* entry names that are absolute or contain ``..`` are refused (the layer fails);
* a parent that is a symlink is followed *inside the root* (absolute targets are taken
  relative to the root, as the guest will see them); a symlink whose target climbs above
  the root is refused;
* the entry's own last component is never followed: an existing symlink there is
  replaced, not written through;
* hard links must name an existing non-directory inside the root.

Whiteouts (``.wh.<name>`` deletes ``<name>`` from lower layers; ``.wh..wh..opq`` empties a
directory of lower-layer content) follow the OCI image spec. Owners, modes, mtimes, device
nodes, fifos and extended attributes are kept (this runs as root; where the kernel refuses
a device node, the entry is skipped and counted).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import zstandard

from hypemand.images.errors import UnsafeLayer

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_MAX_SYMLINK_HOPS = 40


def _split_member_name(name: str) -> list[str]:
    """Turn an archive member name into safe path components, or refuse it."""
    if name.startswith("/"):
        raise UnsafeLayer(f"layer entry has an absolute path: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UnsafeLayer(f"layer entry escapes the root: {name!r}")
    if "\x00" in name:
        raise UnsafeLayer(f"layer entry name contains NUL: {name!r}")
    return parts


@contextlib.contextmanager
def open_layer(path: Path) -> Iterator[IO[bytes]]:
    """Open a layer blob as an uncompressed tar stream, detecting gzip/zstd by magic."""
    with path.open("rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        if magic[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=raw) as gz:
                yield gz  # type: ignore[misc]
        elif magic == b"\x28\xb5\x2f\xfd":
            with zstandard.ZstdDecompressor().stream_reader(raw) as zs:
                yield zs
        else:
            yield raw


class LayerApplier:
    """Applies layers, lowest first, to ``root``. One instance per image build."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.skipped_devices = 0
        self._euid = os.geteuid()

    # ---- path resolution inside the root -------------------------------------------

    def _resolve_parent(self, parts: list[str], create: bool = True) -> list[str] | None:
        """Resolve directory components inside the root, creating missing ones if ``create``.

        Returns the real (symlink-free) component list of the directory relative to the
        root, or None when a component is missing and ``create`` is false.
        """
        hops = 0
        resolved: list[str] = []
        queue = list(parts)
        while queue:
            component = queue.pop(0)
            if component in ("", "."):
                continue
            if component == "..":
                if not resolved:
                    raise UnsafeLayer("a symlink in the layer points outside the image root")
                resolved.pop()
                continue
            candidate = self.root.joinpath(*resolved, component)
            try:
                st = os.lstat(candidate)
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(candidate, 0o755)
                resolved.append(component)
                continue
            if stat.S_ISDIR(st.st_mode):
                resolved.append(component)
            elif stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise UnsafeLayer("too many levels of symbolic links in layer paths")
                target = os.readlink(candidate)
                target_parts = target.split("/")
                if target.startswith("/"):
                    resolved = []
                queue = target_parts + queue
            else:
                where = "/".join([*resolved, component])
                raise UnsafeLayer(f"layer path goes through a non-directory: /{where}")
        return resolved

    def _path_for(self, parts: list[str]) -> Path:
        """Absolute host path of an entry: resolved parent plus the literal last component."""
        parent = self._resolve_parent(parts[:-1])
        assert parent is not None
        return self.root.joinpath(*parent, parts[-1])

    def _existing_path_for(self, parts: list[str]) -> Path | None:
        """Like :meth:`_path_for` but creates nothing; None if the parent does not exist."""
        parent = self._resolve_parent(parts[:-1], create=False)
        return None if parent is None else self.root.joinpath(*parent, parts[-1])

    # ---- removal helpers -----------------------------------------------------------

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)

    # ---- layer application ---------------------------------------------------------

    def apply(self, layer: Path) -> None:
        with open_layer(layer) as stream:
            try:
                archive = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115 - closed below
            except tarfile.TarError as exc:
                raise UnsafeLayer(f"layer is not a tar archive: {exc}") from exc
            with archive:
                self._apply_members(archive)

    def _apply_members(self, archive: tarfile.TarFile) -> None:
        # Paths this layer created: whiteouts and opaque markers only hide lower layers.
        created: set[tuple[str, ...]] = set()
        try:
            for member in archive:
                parts = _split_member_name(member.name)
                if not parts:
                    continue  # the root itself ("./"): keep the root as it is
                base = parts[-1]
                if base == OPAQUE_MARKER:
                    self._opaque(parts[:-1], created)
                    continue
                if base.startswith(WHITEOUT_PREFIX):
                    hidden = base[len(WHITEOUT_PREFIX) :]
                    if hidden in ("", ".", ".."):
                        raise UnsafeLayer(f"invalid whiteout entry {member.name!r}")
                    target = [*parts[:-1], hidden]
                    hidden_path = self._existing_path_for(target)
                    if hidden_path is not None and tuple(target) not in created:
                        self._remove(hidden_path)
                    continue
                self._apply_member(archive, member, parts)
                created.add(tuple(parts))
        except (tarfile.TarError, EOFError, OSError, zstandard.ZstdError) as exc:
            raise UnsafeLayer(f"cannot read layer: {exc}") from exc

    def _opaque(self, dir_parts: list[str], created: set[tuple[str, ...]]) -> None:
        resolved = self._resolve_parent(dir_parts, create=False)
        if resolved is None:
            return
        directory = self.root.joinpath(*resolved)
        for child in os.listdir(directory):
            if (*dir_parts, child) not in created:
                self._remove(directory / child)

    def _apply_member(self, archive: tarfile.TarFile, member: tarfile.TarInfo, parts: list[str]) -> None:
        path = self._path_for(parts)
        existing = None
        with contextlib.suppress(FileNotFoundError):
            existing = os.lstat(path)
        if member.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                self._remove(path)
                existing = None
            if existing is None:
                os.mkdir(path, 0o700)
        else:
            if existing is not None:
                self._remove(path)
            if member.isreg():
                self._write_file(archive, member, path)
            elif member.issym():
                os.symlink(member.linkname, path)
            elif member.islnk():
                self._hardlink(member, path)
                return  # a hard link shares the target's inode and metadata
            elif member.ischr() or member.isblk():
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                try:
                    os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
                except PermissionError:
                    self.skipped_devices += 1
                    log.info("skipping device node %s: not permitted", member.name)
                    return
            elif member.isfifo():
                os.mkfifo(path, 0o600)
            else:
                log.info("skipping unsupported tar entry %s (type %r)", member.name, member.type)
                return
        self._set_metadata(member, path)

    def _write_file(self, archive: tarfile.TarFile, member: tarfile.TarInfo, path: Path) -> None:
        source = archive.extractfile(member)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            if source is not None:
                shutil.copyfileobj(source, out, 1 << 20)

    def _hardlink(self, member: tarfile.TarInfo, path: Path) -> None:
        target_parts = _split_member_name(member.linkname)
        if not target_parts:
            raise UnsafeLayer(f"hard link {member.name!r} has an empty target")
        target = self._path_for(target_parts)
        try:
            st = os.lstat(target)
        except FileNotFoundError as exc:
            raise UnsafeLayer(
                f"hard link {member.name!r} points to a missing file {member.linkname!r}"
            ) from exc
        if stat.S_ISDIR(st.st_mode):
            raise UnsafeLayer(f"hard link {member.name!r} points to a directory")
        os.link(target, path, follow_symlinks=False)

    def _set_metadata(self, member: tarfile.TarInfo, path: Path) -> None:
        is_link = member.issym()
        if self._euid == 0:
            os.chown(path, member.uid, member.gid, follow_symlinks=False)
        for key, value in (member.pax_headers or {}).items():
            if key.startswith("SCHILY.xattr."):
                with contextlib.suppress(OSError):
                    os.setxattr(path, key[len("SCHILY.xattr.") :], value.encode("utf-8", "surrogateescape"),
                                follow_symlinks=False)
        if not is_link:
            # chmod after chown: chown clears setuid/setgid bits.
            os.chmod(path, stat.S_IMODE(member.mode))
        with contextlib.suppress(OSError, OverflowError, ValueError):
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


def apply_layers(root: Path, layers: list[Path]) -> LayerApplier:
    applier = LayerApplier(root)
    for layer in layers:
        applier.apply(layer)
    return applier
