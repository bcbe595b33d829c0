"""The pure and blocking parts of the volume domain, without a server: the archive rules, the
limits checked while reading, the disk mke2fs builds, the request model, the start's cleanup."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from hypemand.layout import DataLayout
from hypemand.volumes.archive import (
    MAX_HEADER_BYTES,
    BodyReader,
    GunzipReader,
    Unpacker,
    UnsafeArchive,
    symlink_stays_inside,
)
from hypemand.volumes.disk import make_disk
from hypemand.volumes.models import MAX_SIZE_GB, ArchiveTooLarge, CreateVolumeRequest, VolumeRecord
from hypemand.volumes.service import VolumeService
from tests.volumes.support import HOSTILE, dataset, entry, ext4_cat, ext4_inode, ext4_stat, tar_gz


def reader(data: bytes, limit: int = 1 << 30, chunk: int = 1000) -> BodyReader:
    stream = io.BytesIO(data)
    return BodyReader(lambda: stream.read(chunk), limit)


def unpack(root: Path, data: bytes, max_bytes: int = 1 << 30, max_entries: int = 1000) -> Unpacker:
    root.mkdir()
    unpacker = Unpacker(root, max_bytes, max_entries)
    unpacker.unpack(reader(data))
    return unpacker


def test_body_reader_gives_every_byte_and_refuses_past_its_limit() -> None:
    data = os.urandom(10_000)
    got = reader(data, chunk=777)
    assert got.read(1) + got.read(5000) + got.read() == data and got.read(10) == b""
    over = reader(data, limit=9_999, chunk=4096)
    with pytest.raises(ArchiveTooLarge):
        over.read()


@pytest.mark.parametrize(("parent", "target", "inside"), [
    ([], "a", True), ([], "./a/../b", True), (["d"], "../x", True), (["d"], "../../x", False),
    ([], "..", False), ([], "/etc", False), ([], "", False), (["a", "b"], "../../c/../d", True),
])
def test_symlink_targets(parent: list[str], target: str, inside: bool) -> None:
    assert symlink_stays_inside(parent, target) is inside


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_archives_are_refused(tmp_path: Path, name: str) -> None:
    archive, words = HOSTILE[name]
    with pytest.raises(UnsafeArchive, match=words.replace("(", r"\(")):
        unpack(tmp_path / "root", archive)
    assert not (tmp_path / "escape.txt").exists()


def test_a_huge_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    info, _ = entry("a")
    info.pax_headers = {"comment": "x" * (MAX_HEADER_BYTES + 1)}
    with pytest.raises(UnsafeArchive, match="extended header"):
        unpack(tmp_path / "root", tar_gz((info, b"")))


def test_content_larger_than_the_volume_stops_at_the_entry_that_crosses(tmp_path: Path) -> None:
    archive = tar_gz(entry("a", data=b"x" * 600), entry("b", data=b"y" * 500), entry("c", data=b"z"))
    with pytest.raises(ArchiveTooLarge, match="'b'"):
        unpack(tmp_path / "root", archive, max_bytes=1000)
    assert sorted(os.listdir(tmp_path / "root")) == ["a"]  # b was never written


def test_more_entries_than_inodes_is_too_large(tmp_path: Path) -> None:
    archive = tar_gz(*(entry(f"f{i}") for i in range(6)))
    with pytest.raises(ArchiveTooLarge, match="entries"):
        unpack(tmp_path / "root", archive, max_entries=5)


def test_later_entries_replace_files_but_not_directories(tmp_path: Path) -> None:
    unpacker = unpack(tmp_path / "root", tar_gz(entry("f", data=b"old"), entry("f", data=b"new")))
    assert (tmp_path / "root" / "f").read_bytes() == b"new" and unpacker.result.entries == 2
    with pytest.raises(UnsafeArchive, match="replaces a directory"):
        unpack(tmp_path / "other", tar_gz(entry("d", tarfile.DIRTYPE), entry("d", data=b"x")))


def test_the_disk_keeps_modes_owners_links_and_content(tmp_path: Path) -> None:
    unpacker = unpack(tmp_path / "root", dataset())
    disk = tmp_path / "data.raw"
    make_disk(disk, 1 << 30, tmp_path / "root", unpacker.result)
    assert disk.stat().st_size == 1 << 30 and disk.stat().st_blocks * 512 < 64 << 20  # sparse
    assert ext4_stat(disk, "/").mode == 0o751
    readme = ext4_stat(disk, "/data/readme.txt")
    assert (readme.kind, readme.mode, readme.uid, readme.gid) == ("regular", 0o640, 1000, 1001)
    assert readme.size == 13
    assert ext4_stat(disk, "/data/run.sh").mode == 0o4755
    assert ext4_stat(disk, "/data").mode == 0o750 and ext4_stat(disk, "/empty").mode == 0o1777
    assert ext4_cat(disk, "/data/hard") == b"hello volume\n"
    assert ext4_inode(disk, "/data/hard") == ext4_inode(disk, "/data/readme.txt")
    assert ext4_stat(disk, "/data/link").kind == "symlink"


def test_content_that_does_not_fit_with_the_file_system_is_too_large(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "big").write_bytes(os.urandom(20 << 20))
    with pytest.raises(ArchiveTooLarge, match="do not fit"):
        make_disk(tmp_path / "data.raw", 16 << 20, root)


def test_an_empty_disk_is_sparse_ext4(tmp_path: Path) -> None:
    disk = tmp_path / "data.raw"
    make_disk(disk, 10 << 30)
    assert disk.stat().st_size == 10 << 30 and disk.stat().st_blocks * 512 < 16 << 20
    assert ext4_stat(disk, "/lost+found").kind == "directory"


@pytest.mark.parametrize("body", [
    {"name": "Upper", "size_gb": 1}, {"name": "a", "size_gb": 0}, {"name": "a", "size_gb": MAX_SIZE_GB + 1},
    {"name": "a", "size_gb": "1"}, {"name": "a", "size_gb": 1.5}, {"name": "a", "size_gb": True},
    {"name": "a", "size_gb": 1, "id": "../x"}, {"name": "a", "size_gb": 1, "id": ".staging-x"},
    {"name": "a", "size_gb": 1, "id": "a/b"}, {"name": "a", "size_gb": 1, "tags": {"bad key!": "v"}},
    {"name": "a", "size_gb": 1, "extra": 1}, {"name": "a\n", "size_gb": 1},
])
def test_create_requests_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CreateVolumeRequest.model_validate(body)


async def test_start_removes_staging_and_half_made_volumes(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    staging = layout.volume_staging("dead")
    staging.mkdir(parents=True)
    (staging / "file").write_bytes(b"x")
    half = layout.volume("half")
    half.directory.mkdir()
    half.disk.write_bytes(b"")
    whole = layout.volume("whole")
    whole.directory.mkdir()
    whole.disk.write_bytes(b"")
    record = VolumeRecord(id="whole", name="whole", size_gb=1, created_at="2024-01-01T00:00:00Z")
    whole.record.write_text(record.model_dump_json())
    service = VolumeService(layout)
    await service.start()
    assert sorted(p.name for p in layout.volumes.iterdir()) == ["whole"]
    assert [v.id for v in await service.list()] == ["whole"]
    assert (await service.get("whole")).attachments == []


def test_gunzip_gives_at_most_what_is_asked_and_reads_every_member(tmp_path: Path) -> None:
    """Zeros compress ~1000:1: one compressed chunk must not become hundreds of MB in memory."""
    zeros = gzip.compress(bytes(64 << 20), compresslevel=1)
    unzipped = GunzipReader(reader(zeros + gzip.compress(b"tail"), chunk=1 << 20))
    sizes = []
    while piece := unzipped.read(1 << 20):
        sizes.append(len(piece))
    assert max(sizes) <= 1 << 20 and sum(sizes) == (64 << 20) + 4
    archive = tar_gz(entry("a", data=b"x" * 100))
    split = gzip.compress(gzip.decompress(archive)[:512]) + gzip.compress(gzip.decompress(archive)[512:])
    unpack(tmp_path / "root", split)
    assert (tmp_path / "root" / "a").read_bytes() == b"x" * 100


@pytest.mark.parametrize(("body", "words"), [
    (b"", "empty"), (tar_gz(entry("a", data=os.urandom(100_000)))[:-5000], "ends in the middle"),
])
def test_empty_and_cut_bodies_are_refused(tmp_path: Path, body: bytes, words: str) -> None:
    with pytest.raises(UnsafeArchive, match=words):
        unpack(tmp_path / "root", body)
