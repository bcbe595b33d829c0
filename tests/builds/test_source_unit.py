"""A build's source (``hypemand.builds.source``): the upload stored and hashed as it streams, the
limit enforced before the body is stored whole, the tree unpacked with the volumes' refusals,
the Dockerfile found (the form's first) and never read through a link out of the tree."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import os
import tarfile
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from hypemand.builds import source
from hypemand.builds.dockerfile import InvalidDockerfile
from hypemand.builds.source import (
    MAX_DOCKERFILE_BYTES,
    DockerfileMissing,
    InvalidSource,
    SourceTooLarge,
    read_dockerfile,
    receive_source,
    unpack_source,
)
from hypemand.errors import DomainError
from tests.volumes.support import HOSTILE, entry, tar_gz

DOCKERFILE = b"FROM busybox\nRUN echo hi\n"


def app_tarball(*extra: tuple[tarfile.TarInfo, bytes]) -> bytes:
    return tar_gz(
        entry("./", tarfile.DIRTYPE, mode=0o755),
        entry("Dockerfile", data=DOCKERFILE),
        entry("app", tarfile.DIRTYPE, mode=0o750),
        entry("app/run.sh", data=b"#!/bin/sh\necho hi\n", mode=0o755),
        entry("app/link", tarfile.SYMTYPE, linkname="run.sh"),
        entry("app/hard", tarfile.LNKTYPE, linkname="app/run.sh"),
        *extra,
    )


@contextlib.contextmanager
def raises(error: type[DomainError], status: int, code: str, *words: str) -> Iterator[None]:
    """``pytest.raises`` that also checks the status, the code and words of the message."""
    with pytest.raises(error) as caught:
        yield
    assert (caught.value.status, caught.value.code) == (status, code), caught.value
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


async def chunks(data: bytes, size: int, consumed: list[int] | None = None) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        piece = data[offset:offset + size]
        if consumed is not None:
            consumed.append(len(piece))
        yield piece


# ---- receive_source ---------------------------------------------------------------------------

async def test_the_upload_is_stored_whole_and_hashed_as_received(tmp_path: Path) -> None:
    data = os.urandom(3 * source.WRITE_BATCH + 12345)  # several batches and a tail
    dest = tmp_path / "build" / "source.tar.gz"
    digest = await receive_source(chunks(data, 65536), dest, limit=len(data))
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert dest.read_bytes() == data
    assert os.listdir(dest.parent) == ["source.tar.gz"]  # no temporary file left


async def test_over_the_limit_stops_reading_and_leaves_no_file(tmp_path: Path) -> None:
    data = os.urandom(8 << 20)
    consumed: list[int] = []
    dest = tmp_path / "source.tar.gz"
    with raises(SourceTooLarge, 413, "too_large", str(1 << 20)):
        await receive_source(chunks(data, 65536, consumed), dest, limit=1 << 20)
    assert sum(consumed) <= (1 << 20) + 65536 < len(data)
    assert os.listdir(tmp_path) == []


async def test_an_empty_upload_is_refused(tmp_path: Path) -> None:
    with raises(InvalidSource, 400, "invalid_source", "source", "empty"):
        await receive_source(chunks(b"", 1), tmp_path / "source.tar.gz", limit=100)
    assert os.listdir(tmp_path) == []


async def test_a_cancelled_upload_leaves_no_file(tmp_path: Path) -> None:
    first_sent, never = asyncio.Event(), asyncio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        first_sent.set()
        await never.wait()
        yield b"y"

    task = asyncio.create_task(receive_source(stalled(), tmp_path / "source.tar.gz", limit=1 << 20))
    await first_sent.wait()
    assert len(os.listdir(tmp_path)) == 1  # the temporary file, while it streams
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert os.listdir(tmp_path) == []


# ---- unpack_source ----------------------------------------------------------------------------

def unpacked(tmp_path: Path, data: bytes, max_bytes: int = 1 << 30) -> Path:
    tarball = tmp_path / "source.tar.gz"
    tarball.write_bytes(data)
    context = tmp_path / "staging" / "context"
    unpack_source(tarball, context, max_bytes)
    return context


@pytest.mark.parametrize("compressed", [True, False])
def test_a_tarball_unpacks_with_its_modes_and_links(tmp_path: Path, compressed: bool) -> None:
    data = app_tarball()
    context = unpacked(tmp_path, data if compressed else gzip.decompress(data))
    assert (context / "Dockerfile").read_bytes() == DOCKERFILE
    assert (context / "app" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert (context / "app").stat().st_mode & 0o777 == 0o750
    assert os.readlink(context / "app" / "link") == "run.sh"
    assert (context / "app" / "hard").stat().st_ino == (context / "app" / "run.sh").stat().st_ino


def test_an_archive_without_entries_is_an_empty_context(tmp_path: Path) -> None:
    context = unpacked(tmp_path, tar_gz())
    assert os.listdir(context) == []


# The volumes' hostile archives, each refused for a build too, naming the entry; the messages
# speak of the build context.
@pytest.mark.parametrize("name", sorted(set(HOSTILE) - {"not-gzip", "not-tar"}))
def test_hostile_tarballs_are_refused(tmp_path: Path, name: str) -> None:
    archive, words = HOSTILE[name]
    with raises(InvalidSource, 400, "invalid_source", "source: ", words):
        unpacked(tmp_path, archive)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "staging" / "escape.txt").exists()


@pytest.mark.parametrize(("archive", "words"), [
    (tar_gz(entry("evil", tarfile.SYMTYPE, linkname="../../etc")), "points outside the build context"),
    (tar_gz(entry("ok", data=b"x"), entry("../escape.txt", data=b"x")), "'../escape.txt'"),
    (tar_gz(entry("evil", tarfile.LNKTYPE, linkname="../outside")), "'evil'"),
    (tar_gz(entry("dev/null", tarfile.CHRTYPE)), "'dev/null' is a device node"),
    (gzip.decompress(tar_gz(entry("pipe", tarfile.FIFOTYPE))), "'pipe'"),  # plain tar: the same rules
])
def test_refusals_name_the_entry(tmp_path: Path, archive: bytes, words: str) -> None:
    with raises(InvalidSource, 400, "invalid_source", words):
        unpacked(tmp_path, archive)


@pytest.mark.parametrize("data", [
    b"this is not an archive" * 100,
    gzip.compress(b"\x01" * 4096),  # gzip, but not of a tar
    gzip.compress(b"short"),
    b"\x1f\x8b" + os.urandom(2000),  # gzip's magic, then garbage
    b"",
])
def test_what_is_not_a_tar_is_refused_naming_the_source(tmp_path: Path, data: bytes) -> None:
    with raises(InvalidSource, 400, "invalid_source", "source: "):
        unpacked(tmp_path, data)


def test_a_cut_tarball_is_refused(tmp_path: Path) -> None:
    data = app_tarball(entry("big", data=os.urandom(100_000)))
    with raises(InvalidSource, 400, "invalid_source", "source: "):
        unpacked(tmp_path, data[:-5000])


def test_files_over_the_limit_stop_at_the_entry_that_crosses_it(tmp_path: Path) -> None:
    data = tar_gz(entry("a", data=b"x" * 600), entry("b", data=b"y" * 500), entry("c", data=b"z"))
    with raises(SourceTooLarge, 413, "too_large", "source: ", "'b'", "1000 bytes"):
        unpacked(tmp_path, data, max_bytes=1000)
    assert os.listdir(tmp_path / "staging" / "context") == ["a"]  # b was never written


def test_more_entries_than_allowed_is_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source, "MAX_SOURCE_ENTRIES", 3)
    with raises(SourceTooLarge, 413, "too_large", "entries"):
        unpacked(tmp_path, tar_gz(*(entry(f"f{i}") for i in range(4))))


# ---- read_dockerfile --------------------------------------------------------------------------

def test_the_forms_dockerfile_wins(tmp_path: Path) -> None:
    context = unpacked(tmp_path, app_tarball())
    assert read_dockerfile(context, "FROM alpine\n") == "FROM alpine\n"
    assert read_dockerfile(context, None) == DOCKERFILE.decode()


def test_a_source_without_a_dockerfile_and_no_form_is_refused(tmp_path: Path) -> None:
    context = unpacked(tmp_path, tar_gz(entry("main.py", data=b"print(1)\n")))
    with raises(DockerfileMissing, 400, "dockerfile_missing", "'Dockerfile'", "'dockerfile' field"):
        read_dockerfile(context, None)
    assert read_dockerfile(context, "FROM busybox\n") == "FROM busybox\n"  # the form suffices


def test_a_dockerfile_linked_within_the_tree_is_read(tmp_path: Path) -> None:
    context = unpacked(tmp_path, tar_gz(entry("docker", tarfile.DIRTYPE, mode=0o755),
                                        entry("docker/Dockerfile", data=DOCKERFILE),
                                        entry("Dockerfile", tarfile.SYMTYPE, linkname="docker/Dockerfile")))
    assert read_dockerfile(context, None) == DOCKERFILE.decode()
    assert read_dockerfile(context, None, "docker/Dockerfile") == DOCKERFILE.decode()


def test_a_dockerfile_linked_out_of_the_tree_is_never_read(tmp_path: Path) -> None:
    # Each link stays inside when read as text, so the unpacking lets them through; followed on
    # the host, "up" is the root and "up/.." its parent, where the secret is.
    (tmp_path / "staging" / "secret").parent.mkdir()
    (tmp_path / "staging" / "secret").write_text("FROM host-secret\n")
    context = unpacked(tmp_path, tar_gz(entry("d", tarfile.DIRTYPE, mode=0o755),
                                        entry("d/up", tarfile.SYMTYPE, linkname=".."),
                                        entry("Dockerfile", tarfile.SYMTYPE, linkname="d/up/../secret")))
    with raises(InvalidSource, 400, "invalid_source", "'Dockerfile'", "out of the source"):
        read_dockerfile(context, None)


def test_a_dockerfile_linked_to_an_absolute_path_is_never_read(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    (tmp_path / "outside").write_text("FROM host-secret\n")
    (context / "Dockerfile").symlink_to(tmp_path / "outside")
    with raises(InvalidSource, 400, "invalid_source", "out of the source"):
        read_dockerfile(context, None)


@pytest.mark.parametrize(("path", "words"), [("../Dockerfile", "inside the source"),
                                             ("/etc/passwd", "inside the source"),
                                             ("app", "not a regular file")])
def test_a_dockerfile_path_must_name_a_file_inside(tmp_path: Path, path: str, words: str) -> None:
    context = unpacked(tmp_path, app_tarball())
    with raises(InvalidSource, 400, "invalid_source", words):
        read_dockerfile(context, None, path)


def test_a_dockerfile_over_one_mib_or_not_utf8_is_refused(tmp_path: Path) -> None:
    big = b"#" * MAX_DOCKERFILE_BYTES + b"\nFROM busybox\n"
    latin = entry("Latin", data=b"FROM caf\xe9\n")
    context = unpacked(tmp_path, tar_gz(entry("Dockerfile", data=big), latin))
    with raises(InvalidDockerfile, 400, "invalid_dockerfile", "'Dockerfile'", str(MAX_DOCKERFILE_BYTES)):
        read_dockerfile(context, None)
    with raises(InvalidDockerfile, 400, "invalid_dockerfile", "dockerfile", str(MAX_DOCKERFILE_BYTES)):
        read_dockerfile(context, big.decode())
    with raises(InvalidDockerfile, 400, "invalid_dockerfile", "UTF-8"):
        read_dockerfile(context, None, "Latin")



# ---- lockfile hashes ---------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_lockfile_hashes_are_of_the_regular_lockfiles_at_the_root(tmp_path: Path) -> None:
    context = tmp_path / "context"
    (context / "sub").mkdir(parents=True)
    (context / "package-lock.json").write_bytes(b'{"lockfileVersion": 3}\n')
    (context / "go.sum").write_bytes(b"")
    (context / "requirements.txt").write_bytes(b"flask==3.0.0\n")
    (context / "sub" / "yarn.lock").write_bytes(b"not at the root\n")  # ignored
    (context / "README.md").write_bytes(b"not a lockfile\n")
    (tmp_path / "outside").write_bytes(b"secret\n")
    (context / "poetry.lock").symlink_to(tmp_path / "outside")  # never followed
    (context / "Cargo.lock").symlink_to("requirements.txt")  # not even within the tree
    (context / "uv.lock").mkdir()
    os.mkfifo(context / "Gemfile.lock")  # would block an open without O_NONBLOCK
    assert source.lockfile_hashes(context) == {
        "package-lock.json": _sha256(b'{"lockfileVersion": 3}\n'),
        "go.sum": _sha256(b""),
        "requirements.txt": _sha256(b"flask==3.0.0\n"),
    }
    assert source.lockfile_hashes(tmp_path / "missing") == {}


def test_a_large_lockfile_is_hashed_a_buffer_at_a_time(tmp_path: Path) -> None:
    data = os.urandom(1 << 20) * 32
    (tmp_path / "yarn.lock").write_bytes(data)
    tracemalloc.start()
    try:
        hashes = source.lockfile_hashes(tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert hashes == {"yarn.lock": _sha256(data)}
    assert peak < 4 << 20  # never the file's 32 MiB at once
