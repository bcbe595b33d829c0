"""Content digests of snapshot files, checked before a guest ever starts on them.

The digest covers a file's logical content and size, and only that: holes count as zeros,
and all-zero 4 KiB pages are skipped wherever they are, so a reflink, an extent copy and a
decompressed copy (which turns zero pages into holes) of one file all have the same digest,
while a changed byte, a truncation or an extension changes it. In bytes hashed::

    H( concatenated non-zero pages || each run of them as (offset, length) u64le
       || run count u64le || size u64le || b"hypemand-pages-v1" )

The runs fix where each page's bytes belong, and the run lengths fix how many data bytes came
first, so the encoding is unambiguous. Holes are never read (that is what makes hashing a
sparse guest RAM file fast). The hash is xxh3-128, chosen by measurement over BLAKE3 (see
README.md): these digests catch corruption and truncation, not an attacker who can write the
snapshot store, so a non-cryptographic 128-bit hash is enough.
"""

from __future__ import annotations

import os
import struct
import sys
from array import array
from itertools import chain
from pathlib import Path
from typing import Protocol

import xxhash

from hypemand.savedvm.errors import SavedVMCorrupt
from hypemand.savedvm.sparse import NonZeroPages

DIGEST_ALGORITHM = "xxh3-128"
_LAYOUT_TAG = b"hypemand-pages-v1"


class Hasher(Protocol):
    def update(self, data: memoryview | bytes, /) -> object: ...

    def hexdigest(self) -> str: ...


class PageDigest:
    """The digest fed as a stream: the non-zero pages' bytes, then their runs and the size.

    The compressor and the expander use this to digest the data they already hold, so a
    memory file's digest costs no second read.
    """

    def __init__(self, hasher: Hasher | None = None, name: str = DIGEST_ALGORITHM) -> None:
        self._hasher: Hasher = hasher if hasher is not None else xxhash.xxh3_128()
        self.name = name

    def update(self, pages: memoryview | bytes) -> None:
        self._hasher.update(pages)

    def finish(self, runs: list[tuple[int, int]], size: int) -> str:
        layout = array("Q", chain.from_iterable(runs))
        if sys.byteorder == "big":
            layout.byteswap()
        self._hasher.update(layout.tobytes())
        self._hasher.update(struct.pack("<QQ", len(runs), size) + _LAYOUT_TAG)
        return f"{self.name}:{self._hasher.hexdigest()}"


def file_digest(path: Path) -> str:
    """``"xxh3-128:<hex>"`` of the file's logical content and size (see the module doc)."""
    return digest_with(path, PageDigest())


def digest_with(path: Path, digest: PageDigest) -> str:
    """The file's digest computed with ``digest`` (the benchmark compares hashes with it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pages = NonZeroPages(fd, size, path)
        for data in pages:
            digest.update(data)
        return digest.finish(pages.runs, size)
    finally:
        os.close(fd)


def verify_file(path: Path, expected: str, expected_size: int | None = None) -> None:
    """Raise :class:`SavedVMCorrupt` unless ``path`` still has digest ``expected``.

    With ``expected_size`` (the size recorded with the digest) a truncated or extended file
    is reported as such, before any reading.
    """
    algorithm, _, _hex = expected.partition(":")
    if algorithm != DIGEST_ALGORITHM:
        raise SavedVMCorrupt(f"{path}: recorded digest {expected!r} is not an {DIGEST_ALGORITHM} digest")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SavedVMCorrupt(f"{path} is missing") from None
    if expected_size is not None and size != expected_size:
        raise SavedVMCorrupt(f"{path}: size is {size} bytes, {expected_size} were recorded")
    actual = file_digest(path)
    if actual != expected:
        raise SavedVMCorrupt(
            f"{path}: content differs from the recorded digest (size {size} bytes; "
            f"digest {actual}, recorded {expected})"
        )
