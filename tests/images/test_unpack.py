"""Layer application: whiteouts, metadata, and crafted tarballs that try to escape the root."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import pytest
import zstandard

from hypemand.images.errors import UnsafeLayer
from hypemand.images.unpack import apply_layers
from tests.support.oci import Entry, write_tar


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``directory`` with its mode and size, without following links."""
    result = {}
    for path in directory.rglob("*"):
        st = os.lstat(path)
        result[str(path.relative_to(directory))] = (st.st_mode, st.st_size)
    return result


@pytest.fixture
def box(tmp_path: Path) -> tuple[Path, Path]:
    """(root to unpack into, a sibling directory with a sentinel that must stay untouched)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_text("untouched")
    return tmp_path / "image" / "root", outside


def layer(tmp_path: Path, name: str, entries: list[Entry]) -> Path:
    return write_tar(tmp_path / f"{name}.tar", entries)


ESCAPES = {
    "dotdot": [Entry("../outside/evil", data=b"x")],
    "dotdot-nested": [Entry("etc/../../outside/evil", data=b"x")],
    "absolute": [Entry("/tmp/evil-absolute", data=b"x")],
    "symlink-parent-out": [Entry("link", "symlink", target="../../outside"), Entry("link/evil", data=b"x")],
    "symlink-parent-deep": [Entry("a", "dir"), Entry("a/up", "symlink", target="../../.."),
                            Entry("a/up/outside/evil", data=b"x")],
    "hardlink-out": [Entry("hl", "hardlink", target="../outside/sentinel")],
    "hardlink-via-symlink": [Entry("link", "symlink", target="../../outside"),
                             Entry("hl", "hardlink", target="link/sentinel")],
    "whiteout-out": [Entry("link", "symlink", target="../../outside"), Entry("link/.wh.sentinel")],
    "whiteout-dotdot": [Entry(".wh..."), ],
}


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_escapes_fail_and_write_nothing_outside(case: str, tmp_path: Path, box: tuple[Path, Path]) -> None:
    root, outside = box
    before = snapshot(tmp_path.parent)
    before_outside = snapshot(outside)
    with pytest.raises(UnsafeLayer):
        apply_layers(root, [layer(tmp_path, case, ESCAPES[case])])
    assert snapshot(outside) == before_outside
    assert (outside / "sentinel").read_text() == "untouched"
    assert not Path("/tmp/evil-absolute").exists()
    # Nothing appeared anywhere outside the image root (the layer tar itself excepted).
    new = set(snapshot(tmp_path.parent)) - set(before)
    allowed_prefix = str((tmp_path / "image").relative_to(tmp_path.parent))
    assert all(p.startswith(allowed_prefix) or p.endswith(".tar") for p in new), new


def test_absolute_symlink_targets_resolve_inside_root(tmp_path: Path, box: tuple[Path, Path]) -> None:
    root, outside = box
    entries = [
        Entry("etc", "dir"),
        Entry("rootlink", "symlink", target="/"),
        Entry("rootlink/etc/via-link", data=b"inside\n"),
        Entry("abs-out", "symlink", target=str(outside)),  # only meaningful inside the guest
        Entry("abs-out/evil", data=b"stays inside\n"),
    ]
    apply_layers(root, [layer(tmp_path, "abs", entries)])
    assert (root / "etc/via-link").read_text() == "inside\n"
    assert (root / str(outside).lstrip("/") / "evil").read_text() == "stays inside\n"
    assert sorted(os.listdir(outside)) == ["sentinel"]


def test_existing_symlink_is_replaced_not_written_through(tmp_path: Path, box: tuple[Path, Path]) -> None:
    root, outside = box
    lower = [Entry("etc", "dir"), Entry("etc/passwd", "symlink", target=str(outside / "sentinel"))]
    upper = [Entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n")]
    apply_layers(root, [layer(tmp_path, "lower", lower), layer(tmp_path, "upper", upper)])
    assert (outside / "sentinel").read_text() == "untouched"
    assert not (root / "etc/passwd").is_symlink()
    assert (root / "etc/passwd").read_text().startswith("root:")


def test_whiteouts_and_opaque_directories(tmp_path: Path, box: tuple[Path, Path]) -> None:
    root, _ = box
    lower = [
        Entry("etc", "dir"), Entry("etc/gone", data=b"1"), Entry("etc/stays", data=b"2"),
        Entry("var", "dir"), Entry("var/cache", "dir"), Entry("var/cache/a", data=b"a"),
        Entry("var/cache/sub", "dir"), Entry("var/cache/sub/b", data=b"b"),
        Entry("olddir", "dir"), Entry("olddir/x", data=b"x"),
    ]
    upper = [
        Entry("etc/.wh.gone"),
        Entry("var/cache/kept-same-layer", data=b"k"),  # before the marker, same layer: kept
        Entry("var/cache/.wh..wh..opq"),
        Entry("var/cache/fresh", data=b"f"),
        Entry(".wh.olddir"),
        Entry("etc/.wh.never-existed"),
        Entry("nowhere/.wh.x"),  # whiteout under a missing dir: nothing to do, nothing created
    ]
    apply_layers(root, [layer(tmp_path, "lower", lower), layer(tmp_path, "upper", upper)])
    assert sorted(os.listdir(root / "etc")) == ["stays"]
    assert sorted(os.listdir(root / "var/cache")) == ["fresh", "kept-same-layer"]
    assert not (root / "olddir").exists()
    assert not (root / "nowhere").exists()
    assert not list(root.rglob(".wh.*"))


def test_metadata_devices_links_and_replacement(tmp_path: Path, box: tuple[Path, Path]) -> None:
    root, _ = box
    lower = [
        Entry("bin", "dir"),
        Entry("bin/tool", data=b"#!/bin/sh\n", mode=0o4755, uid=1234, gid=5678),
        Entry("bin/hard", "hardlink", target="bin/tool"),
        Entry("dev", "dir"),
        Entry("dev/null", "chardev", mode=0o666, device=(1, 3)),
        Entry("dev/fifo", "fifo", mode=0o600),
        Entry("private", "dir", mode=0o700, uid=99, gid=99),
        Entry("thing", "dir"),
        Entry("thing/inner", data=b"i"),
    ]
    upper = [Entry("thing", data=b"now a file\n"), Entry("bin/tool-link", "symlink", target="tool")]
    apply_layers(root, [layer(tmp_path, "lower", lower), layer(tmp_path, "upper", upper)])
    tool = os.lstat(root / "bin/tool")
    assert (tool.st_uid, tool.st_gid, stat.S_IMODE(tool.st_mode)) == (1234, 5678, 0o4755)
    assert os.lstat(root / "bin/hard").st_ino == tool.st_ino
    null = os.lstat(root / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    assert stat.S_ISFIFO(os.lstat(root / "dev/fifo").st_mode)
    private = os.lstat(root / "private")
    assert (private.st_uid, stat.S_IMODE(private.st_mode)) == (99, 0o700)
    assert (root / "thing").read_text() == "now a file\n"
    assert os.readlink(root / "bin/tool-link") == "tool"


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_layers(compression: str, tmp_path: Path, box: tuple[Path, Path]) -> None:
    root, _ = box
    raw = layer(tmp_path, "plain", [Entry("hello", data=b"compressed\n")]).read_bytes()
    packed = gzip.compress(raw) if compression == "gzip" else zstandard.ZstdCompressor().compress(raw)
    blob = tmp_path / f"layer.{compression}"
    blob.write_bytes(packed)
    apply_layers(root, [blob])
    assert (root / "hello").read_text() == "compressed\n"


def test_garbage_layer_fails(tmp_path: Path, box: tuple[Path, Path]) -> None:
    root, _ = box
    blob = tmp_path / "garbage"
    blob.write_bytes(gzip.compress(b"this is not a tar archive" * 100))
    with pytest.raises(UnsafeLayer):
        apply_layers(root, [blob])
