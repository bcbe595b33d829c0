"""``/volumes`` through the official SDK in strict mode against real servers: create, list, get,
delete, from-archive (read back from the ext4 the server built), every refusal with nothing left
behind, a server SIGKILLed while an archive streams in, volumes kept across a restart."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from hypeman import APIStatusError, BadRequestError, ConflictError, Hypeman, NotFoundError

from hypemand.layout import DataLayout
from tests.support.harness import Harness, ServerProcess, strict_client
from tests.volumes.support import HOSTILE, dataset, entry, ext4_cat, ext4_inode, ext4_stat, tar_gz

GIB = 1 << 30


@pytest.fixture(scope="module")
def api(module_harness: Harness) -> ServerProcess:
    return module_harness.start()


@pytest.fixture
def sdk(api: ServerProcess) -> Iterator[Hypeman]:
    with strict_client(api) as client:
        yield client
        for volume in client.volumes.list():
            client.volumes.delete(volume.id)


def on_disk(server: ServerProcess) -> list[str]:
    """Every entry of volumes/ (volumes, staging directories, anything else)."""
    root = DataLayout(server.data_dir).volumes
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def expect(call: Callable[[], object], error: type[APIStatusError], status: int, code: str,
           *mentions: str) -> str:
    with pytest.raises(error) as info:
        call()
    body = info.value.body
    assert info.value.status_code == status and isinstance(body, dict), body
    assert body["code"] == code and set(body) == {"code", "message"}, body
    for mention in mentions:
        assert mention in body["message"], (mention, body)
    return str(body["message"])


def test_create_list_get_delete(api: ServerProcess, sdk: Hypeman) -> None:
    data = sdk.volumes.create(name="data", size_gb=10, tags={"team": "a"})
    assert len(data.id) == 24 and data.size_gb == 10 and data.tags == {"team": "a"} and data.attachments == []
    mine = sdk.volumes.create(name="mine", size_gb=1, id="my-volume.1")
    assert mine.id == "my-volume.1" and mine.tags == {}
    disk = DataLayout(api.data_dir).volume(data.id).disk
    assert disk.stat().st_size == 10 * GIB and disk.stat().st_blocks * 512 < 32 << 20  # sparse
    assert ext4_stat(disk, "/lost+found").kind == "directory"  # formatted
    assert [v.name for v in sdk.volumes.list()] == ["data", "mine"]
    assert [v.name for v in sdk.volumes.list(tags={"team": "a"})] == ["data"]
    assert sdk.volumes.list(tags={"team": "b"}) == []
    for ref in (data.id, "data", data.id[:10]):
        assert sdk.volumes.get(ref) == data
    sdk.volumes.delete("data")
    sdk.volumes.delete(mine.id)
    expect(lambda: sdk.volumes.get("data"), NotFoundError, 404, "not_found", "data")
    expect(lambda: sdk.volumes.delete("data"), NotFoundError, 404, "not_found")
    assert sdk.volumes.list() == [] and on_disk(api) == []


def test_refusals_leave_nothing(api: ServerProcess, sdk: Hypeman) -> None:
    taken = sdk.volumes.create(name="taken", size_gb=1, id="amb-1")
    sdk.volumes.create(name="other", size_gb=1, id="amb-2")
    before = on_disk(api)
    expect(lambda: sdk.volumes.create(name="taken", size_gb=1), ConflictError, 409, "name_conflict", "taken")
    expect(lambda: sdk.volumes.create(name="fresh", size_gb=1, id="amb-1"), ConflictError, 409,
           "already_exists", "amb-1")
    expect(lambda: sdk.volumes.get("amb-"), ConflictError, 409, "ambiguous")
    for bad in ({"name": "Not_A_Name", "size_gb": 1}, {"name": "ok", "size_gb": 0},
                {"name": "ok", "size_gb": 4097}, {"name": "ok", "size_gb": 1, "id": "../escape"},
                {"name": "ok", "size_gb": 1, "id": ".staging-x"},
                {"name": "ok", "size_gb": 1, "tags": {"bad key!": "v"}}):
        expect(lambda bad=bad: sdk.volumes.create(**bad), BadRequestError, 400, "invalid_request")  # type: ignore[arg-type]
    expect(lambda: sdk.post("/volumes", body={"name": "ok", "size_gb": "1"}, cast_to=httpx.Response),
           BadRequestError, 400, "invalid_request", "size_gb")
    expect(lambda: sdk.volumes.create_from_archive(dataset(), name="taken", size_gb=1), ConflictError, 409,
           "name_conflict")
    expect(lambda: sdk.volumes.create_from_archive(dataset(), name="BAD", size_gb=1), BadRequestError, 400,
           "invalid_request", "name")
    assert on_disk(api) == before and sdk.volumes.get("taken") == taken


def test_from_archive_keeps_modes_owners_links_and_content(api: ServerProcess, sdk: Hypeman) -> None:
    big = os.urandom(9 << 20)  # a body over the JSON API's 8 MiB limit: this route streams
    archive = tar_gz(*[e for e in _entries(dataset())], entry("big.bin", data=big, mode=0o600, uid=7, gid=8))
    assert len(archive) > 8 << 20
    volume = sdk.volumes.create_from_archive(archive, name="dataset", size_gb=1, tags={"kind": "dataset"})
    assert volume.name == "dataset" and volume.size_gb == 1 and volume.tags == {"kind": "dataset"}
    assert sdk.volumes.list(tags={"kind": "dataset"}) == [volume]
    disk = DataLayout(api.data_dir).volume(volume.id).disk
    assert disk.stat().st_size == GIB
    assert ext4_stat(disk, "/").mode == 0o751
    readme = ext4_stat(disk, "/data/readme.txt")
    assert (readme.kind, readme.mode, readme.uid, readme.gid) == ("regular", 0o640, 1000, 1001)
    assert ext4_cat(disk, "/data/readme.txt") == b"hello volume\n"
    assert ext4_stat(disk, "/data/run.sh").mode == 0o4755 and ext4_stat(disk, "/empty").mode == 0o1777
    assert ext4_inode(disk, "/data/hard") == ext4_inode(disk, "/data/readme.txt")
    assert ext4_stat(disk, "/data/up").kind == "symlink"
    got = ext4_stat(disk, "/big.bin")
    assert (got.mode, got.uid, got.gid, got.size) == (0o600, 7, 8, len(big))
    assert hashlib.sha256(ext4_cat(disk, "/big.bin")).digest() == hashlib.sha256(big).digest()
    assert on_disk(api) == [volume.id]  # no staging left


def _entries(archive: bytes) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as opened:
        for member in opened.getmembers():
            source = opened.extractfile(member) if member.isreg() else None
            yield member, source.read() if source else b""


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_leave_nothing(api: ServerProcess, sdk: Hypeman, name: str) -> None:
    archive, words = HOSTILE[name]
    expect(lambda: sdk.volumes.create_from_archive(archive, name="hostile", size_gb=1), BadRequestError, 400,
           "bad_request", words)
    assert sdk.volumes.list() == [] and on_disk(api) == []


class Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


@pytest.fixture(scope="module")
def oversized() -> bytes:
    """Small files, then one whose header says more than 1 GiB (zeros: ~1 MB compressed)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as archive:
        for index in range(3):
            info, data = entry(f"small-{index}", data=b"x" * 1000)
            archive.addfile(info, io.BytesIO(data))
        info, _ = entry("huge.bin")
        info.size = GIB + 1
        archive.addfile(info, io.BufferedReader(Zeros(info.size), 1 << 20))
    return buffer.getvalue()


def test_content_larger_than_size_gb_is_refused_while_reading(api: ServerProcess, sdk: Hypeman,
                                                              oversized: bytes) -> None:
    started = time.monotonic()
    expect(lambda: sdk.volumes.create_from_archive(oversized, name="too-big", size_gb=1), BadRequestError,
           400, "archive_too_large", "huge.bin")
    assert time.monotonic() - started < 30
    assert sdk.volumes.list() == [] and on_disk(api) == []


def test_a_killed_server_leaves_no_half_volume(harness: Harness) -> None:
    server = harness.start()
    volumes = DataLayout(server.data_dir).volumes
    with strict_client(server) as sdk:
        kept = sdk.volumes.create(name="kept", size_gb=2, tags={"a": "b"})
    sent = threading.Event()
    stop = threading.Event()

    def slow_body() -> Iterator[bytes]:
        compressed = tar_gz(entry("part", data=os.urandom(1 << 20)))
        for offset in range(0, len(compressed) - 1024, 4096):
            yield compressed[offset:offset + 4096]
            sent.set()
            if stop.wait(0.05):
                return
        stop.wait(60)

    def upload() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server is killed under it
            httpx.post(f"{server.base_url}/volumes/from-archive", params={"name": "half", "size_gb": 1},
                       content=slow_body(), headers={"Authorization": f"Bearer {server.token}"}, timeout=60)

    uploader = threading.Thread(target=upload)
    uploader.start()
    try:
        assert sent.wait(30)
        deadline = time.monotonic() + 30
        while not any(p.name.startswith(".staging-") for p in volumes.iterdir()):
            assert time.monotonic() < deadline, "no staging directory appeared"
            time.sleep(0.05)
        server.process.kill()
        server.process.wait(10)
    finally:
        stop.set()
        uploader.join(30)
    half = DataLayout(server.data_dir).volume("half-made")
    half.directory.mkdir()  # as a kill between the disk and the record would leave it
    half.disk.write_bytes(b"")
    again = harness.start(server.data_dir)
    with strict_client(again) as sdk:
        assert sdk.volumes.list() == [kept]
        assert sorted(p.name for p in volumes.iterdir()) == [kept.id]
        sdk.volumes.delete(kept.id)


def test_from_archive_reads_the_body_as_it_arrives(api: ServerProcess) -> None:
    """A gzip stream sent chunked (no Content-Length) in small pieces is unpacked whole."""
    content = os.urandom(3 << 20)
    archive = tar_gz(entry("f", data=content))

    def pieces() -> Iterator[bytes]:
        for offset in range(0, len(archive), 1000):
            yield archive[offset:offset + 1000]

    reply = httpx.post(f"{api.base_url}/volumes/from-archive", params={"name": "chunked", "size_gb": 1},
                       content=pieces(), headers={"Authorization": f"Bearer {api.token}"}, timeout=60)
    assert reply.status_code == 201, reply.text
    volume_id = reply.json()["id"]
    try:
        assert ext4_cat(DataLayout(api.data_dir).volume(volume_id).disk, "/f") == content
    finally:
        httpx.delete(f"{api.base_url}/volumes/{volume_id}", headers={"Authorization": f"Bearer {api.token}"})

