"""Guest memory compression: round trips, standard frames, sparse output, cancellation, settings."""

from __future__ import annotations

import filecmp
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from hypemand.errors import BadRequest
from hypemand.savedvm.codec import (
    Compression,
    CompressionCancelled,
    compress_memory,
    compressed_files,
    expand_memory,
    normalize,
    read_page_layout,
)
from hypemand.savedvm.digest import file_digest
from hypemand.savedvm.errors import SavedVMCorrupt
from hypemand.savedvm.models import SnapshotCompressionConfig
from hypemand.savedvm.sparse import PAGE_SIZE, allocated_bytes, data_extents
from tests.savedvm.conftest import MIB, write_guest_memory

SETTINGS = [
    Compression(algorithm="zstd", level=1),
    Compression(algorithm="zstd", level=19),
    Compression(algorithm="lz4", level=0),
    Compression(algorithm="lz4", level=9),
]


class CancelAfter(threading.Event):
    """An event that reports itself set from its ``calls``-th check on: a cancel mid-stream."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.remaining = calls

    def is_set(self) -> bool:
        self.remaining -= 1
        return self.remaining < 0


def nonzero_runs_data(path: Path) -> bytes:
    content = path.read_bytes()
    return b"".join(
        content[offset : offset + PAGE_SIZE]
        for offset in range(0, len(content), PAGE_SIZE)
        if any(content[offset : offset + PAGE_SIZE])
    )


@pytest.mark.parametrize("compression", SETTINGS, ids=lambda c: f"{c.algorithm}-{c.level}")
def test_round_trip_is_exact_and_sparse(tmp_path: Path, compression: Compression) -> None:
    # zstd 19 runs at a few MB/s: give it a small file.
    size = 4 * MIB if compression.level > 3 else 32 * MIB
    raw = write_guest_memory(tmp_path / "memory.ram", size=size)
    raw.chmod(0o640)
    digest = file_digest(raw)
    result = compress_memory(raw, compression, threading.Event())

    suffix = ".zst" if compression.algorithm == "zstd" else ".lz4"
    assert result.path == tmp_path / f"memory.ram{suffix}"
    assert result.extent_map == tmp_path / "memory.ram.extents"
    assert raw.exists()  # the caller decides
    assert result.uncompressed_size == size
    assert result.compressed_size == result.path.stat().st_size + result.extent_map.stat().st_size
    assert result.compressed_size < result.data_size < allocated_bytes(raw)
    assert result.content_digest == digest
    assert sorted(compressed_files(raw)) == sorted([result.path, result.extent_map])

    expanded = tmp_path / "expanded.ram"
    expand_memory(result.path, expanded, threading.Event())
    assert filecmp.cmp(raw, expanded, shallow=False)
    assert stat.S_IMODE(expanded.stat().st_mode) == 0o640
    assert file_digest(expanded) == digest
    # Sparse: only the non-zero pages are allocated, so no more than the original's data.
    assert allocated_bytes(expanded) <= result.data_size + 16 * PAGE_SIZE
    layout = read_page_layout(result.extent_map)
    assert [(o, n) for o, n in data_extents(expanded)] == layout.runs
    assert not (tmp_path / "expanded.ram.tmp").exists()


@pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd CLI is missing")
def test_zstd_cli_decompresses_to_the_nonzero_pages(guest_memory: Path) -> None:
    result = compress_memory(guest_memory, Compression(algorithm="zstd", level=1), threading.Event())
    out = subprocess.run(["zstd", "-q", "-d", "-c", str(result.path)], check=True, capture_output=True).stdout
    assert out == nonzero_runs_data(guest_memory)


@pytest.mark.skipif(shutil.which("lz4") is None, reason="the lz4 CLI is missing")
def test_lz4_cli_decompresses_to_the_nonzero_pages(guest_memory: Path) -> None:
    result = compress_memory(guest_memory, Compression(algorithm="lz4", level=0), threading.Event())
    out = subprocess.run(["lz4", "-q", "-d", "-c", str(result.path)], check=True, capture_output=True).stdout
    assert out == nonzero_runs_data(guest_memory)


def test_a_file_of_holes_only(tmp_path: Path) -> None:
    raw = tmp_path / "memory.ram"
    with raw.open("wb") as handle:
        handle.truncate(16 * MIB)
    result = compress_memory(raw, Compression(), threading.Event())
    assert result.data_size == 0
    expand_memory(result.path, tmp_path / "out.ram", threading.Event())
    assert (tmp_path / "out.ram").stat().st_size == 16 * MIB
    assert allocated_bytes(tmp_path / "out.ram") == 0


@pytest.mark.parametrize("checks", [0, 1, 2])
def test_cancelled_compression_leaves_nothing(guest_memory: Path, checks: int) -> None:
    before = guest_memory.read_bytes()
    with pytest.raises(CompressionCancelled):
        compress_memory(guest_memory, Compression(), CancelAfter(checks))
    assert compressed_files(guest_memory) == []
    assert sorted(p.name for p in guest_memory.parent.iterdir()) == ["memory.ram"]
    assert guest_memory.read_bytes() == before


def test_cancelled_expansion_leaves_nothing(tmp_path: Path) -> None:
    raw = write_guest_memory(tmp_path / "memory.ram", size=48 * MIB)
    result = compress_memory(raw, Compression(algorithm="lz4"), threading.Event())
    with pytest.raises(CompressionCancelled):
        expand_memory(result.path, tmp_path / "out.ram", CancelAfter(1))
    assert not (tmp_path / "out.ram").exists()
    assert not (tmp_path / "out.ram.tmp").exists()
    assert result.path.exists()


def test_compressing_again_replaces_stale_siblings(guest_memory: Path) -> None:
    first = compress_memory(guest_memory, Compression(algorithm="lz4"), threading.Event())
    leftover = guest_memory.with_name("memory.ram.zst.tmp")
    leftover.write_bytes(b"a crash left this")
    second = compress_memory(guest_memory, Compression(algorithm="zstd"), threading.Event())
    assert not first.path.exists()
    assert not leftover.exists()
    assert sorted(compressed_files(guest_memory)) == sorted([second.path, second.extent_map])


def test_corrupt_compressed_data_is_refused(guest_memory: Path, tmp_path: Path) -> None:
    result = compress_memory(guest_memory, Compression(), threading.Event())
    blob = bytearray(result.path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    result.path.write_bytes(bytes(blob))
    with pytest.raises(SavedVMCorrupt):
        expand_memory(result.path, tmp_path / "out.ram", threading.Event())
    assert not (tmp_path / "out.ram").exists()
    assert not (tmp_path / "out.ram.tmp").exists()


def test_a_changed_extent_map_is_refused(guest_memory: Path, tmp_path: Path) -> None:
    result = compress_memory(guest_memory, Compression(algorithm="lz4"), threading.Event())
    layout = read_page_layout(result.extent_map)
    # Shift one run by a page: the data would land in the wrong place.
    runs = list(layout.runs)
    offset, length = runs[-1]
    runs[-1] = (offset + PAGE_SIZE, length)
    result.extent_map.write_bytes(type(layout)(size=layout.size, runs=runs, digest=layout.digest).encode())
    with pytest.raises(SavedVMCorrupt, match="does not match its recorded digest"):
        expand_memory(result.path, tmp_path / "out.ram", threading.Event())
    result.extent_map.write_bytes(b"garbage")
    with pytest.raises(SavedVMCorrupt, match="extent map is unusable"):
        expand_memory(result.path, tmp_path / "out.ram", threading.Event())
    result.extent_map.unlink()
    with pytest.raises(SavedVMCorrupt, match="missing"):
        expand_memory(result.path, tmp_path / "out.ram", threading.Event())


def test_truncated_compressed_file_is_refused(guest_memory: Path, tmp_path: Path) -> None:
    for algorithm in ("zstd", "lz4"):
        result = compress_memory(guest_memory, Compression(algorithm=algorithm), threading.Event())
        os.truncate(result.path, result.path.stat().st_size // 2)
        with pytest.raises(SavedVMCorrupt):
            expand_memory(result.path, tmp_path / "out.ram", threading.Event())
        assert not (tmp_path / "out.ram.tmp").exists()


# ---- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"enabled": True, "algorithm": "gzip"},
        {"enabled": True, "algorithm": "zstd", "level": 0},
        {"enabled": True, "algorithm": "zstd", "level": 20},
        {"enabled": True, "algorithm": "lz4", "level": 10},
        {"enabled": True, "algorithm": "lz4", "level": -1},
        {"enabled": True, "level": "3"},
        {"enabled": "yes"},
        {"algorithm": "zstd"},
    ],
)
def test_invalid_settings_are_bad_requests(config: dict[str, object]) -> None:
    with pytest.raises(BadRequest) as caught:
        normalize(config)
    assert caught.value.status == 400


def test_settings_defaults_and_case() -> None:
    assert normalize(None) is None
    assert normalize({"enabled": False, "algorithm": "gzip", "level": 99}) is None
    assert normalize({"enabled": True}) == Compression(algorithm="zstd", level=1)
    upper = normalize({"enabled": True, "algorithm": "ZSTD", "level": 19})
    assert upper == Compression(algorithm="zstd", level=19)
    assert normalize({"enabled": True, "algorithm": "Lz4"}) == Compression(algorithm="lz4", level=0)
    api = SnapshotCompressionConfig(enabled=True, algorithm="lz4", level=9)
    assert normalize(api) == Compression(algorithm="lz4", level=9)
    assert normalize(SnapshotCompressionConfig(enabled=False, algorithm="zstd", level=3)) is None


def test_compression_model_validates_itself() -> None:
    assert Compression.model_validate({"algorithm": "lz4"}).level == 0
    assert Compression.model_validate({"algorithm": "zstd"}).level == 1
    invalid = ({"algorithm": "lz4", "level": 10}, {"algorithm": "zstd", "level": 0}, {"algorithm": "brotli"})
    for bad in invalid:
        with pytest.raises(ValidationError):
            Compression.model_validate(bad)
    restored = Compression.model_validate_json(Compression(algorithm="lz4", level=5).model_dump_json())
    assert restored == Compression(algorithm="lz4", level=5)
