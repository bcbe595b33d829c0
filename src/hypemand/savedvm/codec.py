"""Compression of a saved guest memory file, and its expansion back into a sparse file.

``compress_memory(<dir>/memory.ram)`` writes two files next to it:

* ``memory.ram.zst`` (or ``.lz4``): ONE standard zstd (lz4) frame holding only the non-zero
  4 KiB pages, concatenated in file order. Holes and zero pages are neither read twice nor
  compressed. ``zstd -d`` / ``lz4 -d`` still decompress it (to those pages).
* ``memory.ram.extents``: where those pages go (see :class:`PageLayout`), the file's size and
  its content digest (:mod:`hypemand.savedvm.digest`), which the expansion checks.

zstd runs with all cores and long-distance matching over a 128 MiB window: identical pages are
scattered across guest RAM, beyond the reach of zstd's default window (qemu-on-these-machines
§5: ratio 2.26 -> 4.68 on a 1 GiB guest RAM file at the same speed).

Both directions write under ``<name>.tmp``, fsync and rename, check ``cancelled`` between
chunks (then remove their partial output and raise :class:`CompressionCancelled`), and never
delete their input: the caller decides.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import sys
import threading
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import lz4.frame
import zstandard
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hypemand.errors import BadRequest
from hypemand.fsutil import fsync_dir
from hypemand.savedvm.digest import PageDigest
from hypemand.savedvm.errors import CompressionCancelled, SavedVMCorrupt
from hypemand.savedvm.sparse import CHUNK_SIZE, NonZeroPages

__all__ = [
    "COMPRESSED_SUFFIXES",
    "Algorithm",
    "CompressedMemory",
    "Compression",
    "CompressionCancelled",
    "PageLayout",
    "compress_memory",
    "compressed_files",
    "compressed_path",
    "expand_memory",
    "extent_map_path",
    "normalize",
]

Algorithm = Literal["zstd", "lz4"]
LEVEL_RANGES: dict[str, tuple[int, int]] = {"zstd": (1, 19), "lz4": (0, 9)}
DEFAULT_LEVELS: dict[str, int] = {"zstd": 1, "lz4": 0}
SUFFIXES: dict[str, str] = {"zstd": ".zst", "lz4": ".lz4"}
COMPRESSED_SUFFIXES = tuple(SUFFIXES.values())
EXTENT_MAP_SUFFIX = ".extents"
TMP_SUFFIX = ".tmp"
# 2^27 = 128 MiB: the window the zstd CLI decompresses without --long, and far enough to find
# a page's twin elsewhere in a guest's RAM.
ZSTD_WINDOW_LOG = 27
ZSTD_JOB_SIZE = 8 << 20  # bounds how long a cancel waits: one job per worker thread
# From this level on zstd runs at a few MB/s: jobs stay small so that a cancel lands in a second.
ZSTD_SLOW_LEVEL = 10
ZSTD_SLOW_JOB_SIZE = 1 << 20


def _checked(algorithm: object, level: object) -> tuple[Algorithm, int]:
    """The (algorithm, level) pair with defaults applied, or ValueError saying what is wrong."""
    if algorithm is None:
        algorithm = "zstd"
    if not isinstance(algorithm, str) or algorithm.lower() not in LEVEL_RANGES:
        raise ValueError(f"unsupported compression algorithm {algorithm!r} (use zstd or lz4)")
    name: Algorithm = "zstd" if algorithm.lower() == "zstd" else "lz4"
    if level is None:
        level = DEFAULT_LEVELS[name]
    low, high = LEVEL_RANGES[name]
    if isinstance(level, bool) or not isinstance(level, int) or not low <= level <= high:
        raise ValueError(f"{name} compression level must be an integer from {low} to {high}, got {level!r}")
    return name, level


class Compression(BaseModel):
    """An effective compression setting: the algorithm and a level valid for it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    algorithm: Algorithm = "zstd"
    level: int = Field(default=DEFAULT_LEVELS["zstd"], strict=True)

    @model_validator(mode="before")
    @classmethod
    def _defaults_and_ranges(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            algorithm, level = _checked(data.get("algorithm"), data.get("level"))
            data = {**data, "algorithm": algorithm, "level": level}
        return data


class CompressionConfigLike(Protocol):
    """The API's ``SnapshotCompressionConfig``: {enabled, algorithm?, level?}."""

    @property
    def enabled(self) -> bool: ...

    @property
    def algorithm(self) -> str | None: ...

    @property
    def level(self) -> int | None: ...


def normalize(config: CompressionConfigLike | Mapping[str, Any] | None) -> Compression | None:
    """The effective :class:`Compression` of an API config, or None when it is disabled.

    The algorithm is case-insensitive and defaults to zstd; the level defaults to 1 (zstd) or
    0 (lz4, the fast mode). An unknown algorithm or a level out of range is a ``BadRequest``;
    with ``enabled: false`` the other fields are ignored.
    """
    if config is None:
        return None
    if isinstance(config, Mapping):
        if "enabled" not in config:
            raise BadRequest("compression.enabled is required", code="invalid_request")
        enabled, algorithm, level = config["enabled"], config.get("algorithm"), config.get("level")
    else:
        enabled, algorithm, level = config.enabled, config.algorithm, config.level
    if not isinstance(enabled, bool):
        raise BadRequest("compression.enabled must be true or false", code="invalid_request")
    if not enabled:
        return None
    try:
        name, checked_level = _checked(algorithm, level)
    except ValueError as exc:
        raise BadRequest(f"compression: {exc}", code="invalid_request") from None
    return Compression(algorithm=name, level=checked_level)


@dataclass(frozen=True)
class CompressedMemory:
    path: Path  # <raw>.zst or <raw>.lz4
    extent_map: Path  # <raw>.extents
    compression: Compression
    uncompressed_size: int  # the raw file's logical size
    compressed_size: int  # bytes of the compressed file plus the extent map
    data_size: int  # bytes of non-zero pages (what was compressed)
    content_digest: str  # file_digest() of the raw file, computed on the way


def compressed_path(raw: Path, algorithm: Algorithm) -> Path:
    return raw.with_name(raw.name + SUFFIXES[algorithm])


def extent_map_path(raw: Path) -> Path:
    return raw.with_name(raw.name + EXTENT_MAP_SUFFIX)


def compressed_files(raw: Path) -> list[Path]:
    """The compressed siblings of ``raw`` that exist: compressed files, the extent map, and
    partial ``.tmp`` files of either direction left by a crash."""
    siblings = [raw.name + suffix for suffix in (*COMPRESSED_SUFFIXES, EXTENT_MAP_SUFFIX)]
    candidates = [*siblings, *(name + TMP_SUFFIX for name in siblings), raw.name + TMP_SUFFIX]
    return [path for path in (raw.with_name(name) for name in candidates) if path.exists()]


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


# ---- the extent map -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PageLayout:
    """What ``<raw>.extents`` stores: everything but the page data.

    On disk: ``b"HMPAGES1"``, then little-endian u64 size, u64 data bytes, u64 run count,
    u16 digest length, the digest (ASCII), then one zstd frame of u64le pairs (gap since the
    previous run's end, run length): small numbers that compress to a few bytes per run.
    """

    size: int
    runs: list[tuple[int, int]]
    digest: str

    MAGIC = b"HMPAGES1"
    _HEADER = struct.Struct("<QQQH")

    @property
    def data_bytes(self) -> int:
        return sum(length for _offset, length in self.runs)

    def encode(self) -> bytes:
        pairs = array("Q")
        previous_end = 0
        for offset, length in self.runs:
            pairs.extend((offset - previous_end, length))
            previous_end = offset + length
        if sys.byteorder == "big":
            pairs.byteswap()
        digest = self.digest.encode("ascii")
        header = self._HEADER.pack(self.size, self.data_bytes, len(self.runs), len(digest))
        return self.MAGIC + header + digest + zstandard.ZstdCompressor(level=3).compress(pairs.tobytes())

    @classmethod
    def decode(cls, blob: bytes, path: Path) -> PageLayout:
        def corrupt(why: str) -> SavedVMCorrupt:
            return SavedVMCorrupt(f"{path}: extent map is unusable: {why}")

        start = len(cls.MAGIC) + cls._HEADER.size
        if len(blob) < start or not blob.startswith(cls.MAGIC):
            raise corrupt("not an extent map")
        size, data_bytes, count, digest_length = cls._HEADER.unpack_from(blob, len(cls.MAGIC))
        digest = blob[start : start + digest_length].decode("ascii", errors="replace")
        try:
            packed = zstandard.ZstdDecompressor().decompress(
                blob[start + digest_length :], max_output_size=16 * count
            )
        except zstandard.ZstdError as exc:
            raise corrupt(str(exc)) from None
        pairs = array("Q", packed)
        if sys.byteorder == "big":
            pairs.byteswap()
        if len(pairs) != 2 * count:
            raise corrupt(f"{len(pairs) // 2} runs, the header says {count}")
        runs: list[tuple[int, int]] = []
        end = 0
        for index in range(0, len(pairs), 2):
            offset = end + pairs[index]
            end = offset + pairs[index + 1]
            runs.append((offset, pairs[index + 1]))
        layout = cls(size=size, runs=runs, digest=digest)
        if end > size or layout.data_bytes != data_bytes:
            raise corrupt("runs do not fit the file")
        return layout


def read_page_layout(path: Path) -> PageLayout:
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise SavedVMCorrupt(f"{path} is missing") from None
    return PageLayout.decode(blob, path)


# ---- compress -------------------------------------------------------------------------------------


class _Encoder(Protocol):
    slice_size: int  # how much input to hand over between two cancel checks

    def write(self, data: memoryview) -> None: ...

    def finish(self) -> None: ...


class _ZstdEncoder:
    def __init__(self, level: int, sink: IO[bytes]) -> None:
        # An explicit job size: left to zstd it is sized from the 128 MiB window, so all of a
        # guest's memory is taken in as one or two jobs and the work happens in finish(), where
        # a cancel cannot reach it (a restore would wait out a level-19 compression).
        parameters = zstandard.ZstdCompressionParameters.from_level(
            level, threads=-1, enable_ldm=True, window_log=ZSTD_WINDOW_LOG, write_checksum=True,
            job_size=ZSTD_JOB_SIZE if level < ZSTD_SLOW_LEVEL else ZSTD_SLOW_JOB_SIZE,
        )
        self._writer = zstandard.ZstdCompressor(compression_params=parameters).stream_writer(
            sink, closefd=False
        )
        # zstd takes in all the input at once and does the work at the end of the frame, out of
        # reach of a cancel. Ending a block every so often makes the work keep pace with the
        # input (at the cost of a few bytes), so the caller's cancel check runs between rounds.
        job = ZSTD_JOB_SIZE if level < ZSTD_SLOW_LEVEL else ZSTD_SLOW_JOB_SIZE
        self._flush_every = self.slice_size = job * max(2, os.cpu_count() or 1)
        self._pending = 0

    def write(self, data: memoryview) -> None:
        self._writer.write(data)
        self._pending += len(data)
        if self._pending >= self._flush_every:
            self._writer.flush(zstandard.FLUSH_BLOCK)
            self._pending = 0

    def finish(self) -> None:
        self._writer.flush(zstandard.FLUSH_FRAME)


class _Lz4Encoder:
    slice_size = CHUNK_SIZE  # lz4 keeps pace with its input: no need to cut it finer

    def __init__(self, level: int, sink: IO[bytes]) -> None:
        # 4 MiB independent blocks, as the lz4 CLI writes them; level 0-2 is the fast mode.
        self._compressor = lz4.frame.LZ4FrameCompressor(
            compression_level=level, block_size=lz4.frame.BLOCKSIZE_MAX4MB, content_checksum=True
        )
        self._sink = sink
        self._sink.write(self._compressor.begin())

    def write(self, data: memoryview) -> None:
        self._sink.write(self._compressor.compress(data))

    def finish(self) -> None:
        self._sink.write(self._compressor.flush())


def compress_memory(raw: Path, compression: Compression, cancelled: threading.Event) -> CompressedMemory:
    """Write ``<raw>.zst`` (or ``.lz4``) and ``<raw>.extents`` from the raw memory file.

    Stale compressed siblings (another algorithm's output, partial files) are removed first.
    The extent map is renamed into place before the compressed file, so an existing
    compressed file always has its map. Raises :class:`CompressionCancelled` (no partial file
    left) when ``cancelled`` is set.
    """
    output = compressed_path(raw, compression.algorithm)
    extent_map = extent_map_path(raw)
    output_tmp, map_tmp = _tmp(output), _tmp(extent_map)
    for stale in compressed_files(raw):
        stale.unlink(missing_ok=True)
    try:
        with open(raw, "rb") as source, open(output_tmp, "wb") as sink:
            source_stat = os.fstat(source.fileno())
            pages = NonZeroPages(source.fileno(), source_stat.st_size, raw)
            digest = PageDigest()
            encoder: _Encoder = (
                _ZstdEncoder(compression.level, sink)
                if compression.algorithm == "zstd"
                else _Lz4Encoder(compression.level, sink)
            )
            slice_size = encoder.slice_size
            for data in pages:
                digest.update(data)
                # Fed in slices the encoder finishes one by one, with a cancel check between.
                for start in range(0, len(data), slice_size):
                    if cancelled.is_set():
                        raise CompressionCancelled(f"compression of {raw} was cancelled")
                    encoder.write(data[start : start + slice_size])
            encoder.finish()
            sink.flush()
            os.fchmod(sink.fileno(), stat.S_IMODE(source_stat.st_mode))
            os.fsync(sink.fileno())
        layout = PageLayout(
            size=source_stat.st_size, runs=pages.runs, digest=digest.finish(pages.runs, source_stat.st_size)
        )
        with open(map_tmp, "wb") as map_file:
            map_file.write(layout.encode())
            map_file.flush()
            os.fsync(map_file.fileno())
        if cancelled.is_set():
            raise CompressionCancelled(f"compression of {raw} was cancelled")
        os.replace(map_tmp, extent_map)
        os.replace(output_tmp, output)
    except BaseException:
        output_tmp.unlink(missing_ok=True)
        map_tmp.unlink(missing_ok=True)
        raise
    fsync_dir(raw.parent)
    return CompressedMemory(
        path=output,
        extent_map=extent_map,
        compression=compression,
        uncompressed_size=source_stat.st_size,
        compressed_size=output.stat().st_size + extent_map.stat().st_size,
        data_size=pages.data_bytes,
        content_digest=layout.digest,
    )


# ---- expand ---------------------------------------------------------------------------------------


class _RunWriter:
    """Writes a stream of concatenated page data to the runs it came from; gaps stay holes."""

    def __init__(self, fd: int, runs: list[tuple[int, int]], source: Path) -> None:
        self.fd, self.runs, self.source = fd, runs, source
        self.index = 0  # the run being written
        self.done = 0  # bytes of it written so far

    def write(self, chunk: memoryview | bytes) -> None:
        data = memoryview(chunk)  # slices of it are views, not copies
        position = 0
        while position < len(data):
            if self.index >= len(self.runs):
                raise SavedVMCorrupt(f"{self.source} holds more data than its extent map describes")
            offset, length = self.runs[self.index]
            take = min(length - self.done, len(data) - position)
            written = 0
            while written < take:
                written += os.pwrite(
                    self.fd, data[position + written : position + take], offset + self.done + written
                )
            position += take
            self.done += take
            if self.done == length:
                self.index, self.done = self.index + 1, 0

    @property
    def complete(self) -> bool:
        return self.index == len(self.runs)


def _algorithm_of(compressed: Path) -> Algorithm:
    if compressed.name.endswith(SUFFIXES["zstd"]):
        return "zstd"
    if compressed.name.endswith(SUFFIXES["lz4"]):
        return "lz4"
    raise ValueError(f"{compressed}: not a {' or '.join(COMPRESSED_SUFFIXES)} file")


def _zstd_chunks(source: IO[bytes]) -> Iterator[memoryview]:
    buffer = memoryview(bytearray(CHUNK_SIZE))
    decompressor = zstandard.ZstdDecompressor(max_window_size=1 << ZSTD_WINDOW_LOG)
    with decompressor.stream_reader(source, closefd=False) as reader:
        while got := reader.readinto(buffer):
            yield buffer[:got]


def _lz4_chunks(source: IO[bytes]) -> Iterator[bytes]:
    # LZ4FrameDecompressor directly: LZ4FrameFile reads its input 8 KiB at a time.
    decompressor = lz4.frame.LZ4FrameDecompressor()
    while not decompressor.eof:
        data = source.read(1 << 20) if decompressor.needs_input else b""
        if decompressor.needs_input and not data:
            raise EOFError("the lz4 frame is truncated")
        chunk = decompressor.decompress(data, max_length=CHUNK_SIZE)
        if chunk:
            yield chunk


def expand_memory(compressed: Path, raw: Path, cancelled: threading.Event) -> str:
    """Recreate the sparse raw memory file from ``compressed`` and its extent map.

    Only the non-zero pages are written; everything else is a hole. The result is checked
    against the digest recorded at compression time (:class:`SavedVMCorrupt` otherwise) and
    renamed from ``<raw>.tmp`` into place. It has the compressed file's mode. Returns the
    digest the expanded content was checked against (a caller need not hash it again).
    """
    algorithm = _algorithm_of(compressed)
    layout = read_page_layout(compressed.with_suffix(EXTENT_MAP_SUFFIX))
    tmp = _tmp(raw)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, layout.size)
        digest = PageDigest()
        writer = _RunWriter(fd, layout.runs, compressed)
        with open(compressed, "rb") as source:
            mode = stat.S_IMODE(os.fstat(source.fileno()).st_mode)
            chunks = _zstd_chunks(source) if algorithm == "zstd" else _lz4_chunks(source)
            try:
                for chunk in chunks:
                    if cancelled.is_set():
                        raise CompressionCancelled(f"expansion of {compressed} was cancelled")
                    digest.update(chunk)
                    writer.write(chunk)
            except (zstandard.ZstdError, RuntimeError, EOFError) as exc:
                raise SavedVMCorrupt(f"{compressed}: cannot decompress: {exc}") from None
        if not writer.complete:
            raise SavedVMCorrupt(f"{compressed} holds less data than its extent map describes")
        actual = digest.finish(layout.runs, layout.size)
        if actual != layout.digest:
            raise SavedVMCorrupt(
                f"{compressed}: expanded content does not match its recorded digest "
                f"({actual}, recorded {layout.digest})"
            )
        os.fchmod(fd, mode)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, raw)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(raw.parent)
    return actual

