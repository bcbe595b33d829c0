"""The build context of ``hypeman build``: a directory packed as tar.gz, less what its
``.dockerignore`` excludes, written to a temporary file so that it is streamed to the server,
never held in memory.

``.dockerignore`` follows Docker's rules: one pattern per line, ``#`` starts a comment, every
pattern is taken from the context's root (``*.pyc`` is ``./*.pyc`` only; ``**/*.pyc`` is any
depth), ``*`` and ``?`` stay inside one path component, ``**`` spans any number of them, a
pattern that matches a directory excludes everything in it, and ``!`` re-includes what an earlier
pattern excluded (the last pattern that matches a path decides). Each pattern is cleaned as
Docker cleans it and anchored at the root, which makes it a gitignore pattern that ``pathspec``
matches with the same meaning.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pathspec import GitIgnoreSpec

from hypeman_cli.errors import CLIError

DOCKERIGNORE = ".dockerignore"
DOCKERFILE = "Dockerfile"
COMPRESS_LEVEL = 6  # gzip's own default: level 9 costs much more time for a few percent


def dockerignore_patterns(lines: Iterable[str]) -> list[str]:
    """``.dockerignore`` lines as root-anchored gitignore patterns (comments and blanks dropped).

    Docker trims each line, cleans the path (``./a/`` is ``a``, ``a//b/../c`` is ``a/c``) and drops
    a leading ``/``; a trailing ``/`` does not limit a pattern to directories as in gitignore. A
    pattern that can never match inside the context (``..``, ``.``) is left out.
    """
    patterns = []
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        body = line[1:].strip() if negated else line
        cleaned = posixpath.normpath(body).lstrip("/") if body else ""
        if cleaned in ("", ".") or cleaned == ".." or cleaned.startswith("../"):
            continue
        patterns.append(("!/" if negated else "/") + cleaned)
    return patterns


class IgnoreRules:
    """Which context paths (relative, ``/``-separated) a ``.dockerignore`` excludes."""

    def __init__(self, lines: Iterable[str] = ()) -> None:
        self.patterns = dockerignore_patterns(lines)
        self._spec = GitIgnoreSpec.from_lines(self.patterns)
        # Without a `!` pattern nothing under an excluded directory can come back, so the walk
        # need not enter it (node_modules, .git).
        self.has_exceptions = any(pattern.startswith("!") for pattern in self.patterns)

    @classmethod
    def of(cls, context: Path) -> IgnoreRules:
        path = context / DOCKERIGNORE
        if not path.is_file():
            return cls()
        try:
            return cls(path.read_text(encoding="utf-8", errors="replace").splitlines())
        except OSError as exc:
            raise CLIError(f"cannot read {path}: {exc.strerror or exc}") from None

    def excluded(self, relative: str) -> bool:
        return bool(self.patterns) and self._spec.match_file(relative)


@dataclass
class PackedContext:
    file: IO[bytes]
    entries: int
    size: int


class _Packer:
    """Adds the walk's entries to the tar: regular files, directories and symlinks (kept as
    links: the server refuses any that point out of the context); sockets, FIFOs and devices
    are left out. Owners become root (as COPY makes them) so no local user names leave."""

    def __init__(self, root: Path, archive: tarfile.TarFile, rules: IgnoreRules, always: set[str]) -> None:
        self.root = root
        self.archive = archive
        self.rules = rules
        self.always = always
        self.added_dirs: set[str] = set()
        self.entries = 0

    def _add(self, path: Path, relative: str) -> None:
        info = self.archive.gettarinfo(str(path), arcname=relative)
        if info.islnk():  # a hard link to a file met earlier: sent as a file of its own
            info.type = tarfile.REGTYPE
            info.linkname = ""
            info.size = path.stat().st_size
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        if info.isreg():
            with path.open("rb") as source:
                self.archive.addfile(info, source)
        else:
            self.archive.addfile(info)
        self.entries += 1
        if info.isdir():
            self.added_dirs.add(relative)

    def _add_parents(self, relative: str) -> None:
        """The directories above a re-included path, when they were excluded themselves."""
        parts = relative.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            parent = "/".join(parts[:depth])
            if parent not in self.added_dirs:
                self._add(self.root / parent, parent)

    def walk(self, directory: Path, prefix: str) -> None:
        with os.scandir(directory) as scanned:
            entries = sorted(scanned, key=lambda entry: entry.name)
        for entry in entries:
            relative = f"{prefix}{entry.name}"
            mode = entry.stat(follow_symlinks=False).st_mode
            excluded = self.rules.excluded(relative) and relative not in self.always
            if stat.S_ISDIR(mode):
                if not excluded:
                    self._add_parents(relative)
                    self._add(Path(entry.path), relative)
                if not excluded or self.rules.has_exceptions:
                    self.walk(Path(entry.path), relative + "/")
            elif (stat.S_ISREG(mode) or stat.S_ISLNK(mode)) and not excluded:
                self._add_parents(relative)
                self._add(Path(entry.path), relative)


def pack_context(context: Path, rules: IgnoreRules | None = None, always: Iterable[str] = (),
                 spool_dir: str | None = None) -> PackedContext:
    """``context`` as a gzipped tar in an anonymous temporary file, positioned at its start.

    ``always`` names paths kept whatever the ``.dockerignore`` says. Entry names are relative
    (``Dockerfile``, ``src/app.py``), with no ``./`` and no entry for the root itself.
    """
    rules = rules if rules is not None else IgnoreRules.of(context)
    # Returned open (the caller closes it once sent): no `with` here.
    spool = tempfile.TemporaryFile(prefix="hypeman-build-", suffix=".tar.gz", dir=spool_dir)  # noqa: SIM115
    try:
        with tarfile.open(fileobj=spool, mode="w:gz", compresslevel=COMPRESS_LEVEL,
                          format=tarfile.PAX_FORMAT) as archive:
            packer = _Packer(context, archive, rules, set(always))
            packer.walk(context, "")
        size = spool.tell()
        spool.seek(0)
    except OSError as exc:
        spool.close()
        where = f": {exc.filename}" if exc.filename else ""
        raise CLIError(f"packing the build context {context} failed: {exc.strerror or exc}{where}") from None
    except BaseException:
        spool.close()
        raise
    return PackedContext(spool, packer.entries, size)
