"""The Debian roots of ``hypemand.builds.rootfs``: spec hashing, mmdebstrap's arguments, the dpkg
status, the OCI layout written from a tarball, the cache in the system dir, and the real builder
root (made with mmdebstrap once per shared system dir; ``scripts/setup.sh`` makes it)."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from hypemand.builds import rootfs
from hypemand.builds.oci_layout import read_layout
from hypemand.builds.rootfs import BUILDER, DEBIAN_TEST, RootfsFailed, RootfsSpec
from hypemand.errors import DependencyMissing
from hypemand.layout import OciLayoutPaths, RootfsPaths, SystemPaths
from tests.support.harness import SHARED_SYSTEM_DIR
from tests.support.oci import Entry, write_tar

SMALL_SPEC = RootfsSpec(repository="test/small", tag="v1", packages=("bash",), cmd=("bash",))


def test_the_spec_hash_is_stable_and_covers_every_field() -> None:
    same = RootfsSpec(repository="test/small", tag="v1", packages=("bash",), cmd=("bash",))
    assert same.spec_hash() == SMALL_SPEC.spec_hash()
    assert len(SMALL_SPEC.spec_hash()) == 16
    variants = [
        SMALL_SPEC.model_copy(update={"packages": ("bash", "python3")}),
        SMALL_SPEC.model_copy(update={"cmd": ("sh",)}),
        SMALL_SPEC.model_copy(update={"env": (("PATH", "/bin"),)}),
        SMALL_SPEC.model_copy(update={"working_dir": "/root"}),
        SMALL_SPEC.model_copy(update={"files": (("/etc/motd", "hi\n"),)}),
        SMALL_SPEC.model_copy(update={"tag": "v2"}),
    ]
    hashes = {v.spec_hash() for v in variants} | {SMALL_SPEC.spec_hash()}
    assert len(hashes) == len(variants) + 1
    assert SMALL_SPEC.key() == f"test-small-v1-{SMALL_SPEC.spec_hash()}"
    assert BUILDER.name == "hypeman/builder:latest" and DEBIAN_TEST.name == "hypeman/debian:bookworm"


def test_mmdebstrap_arguments(tmp_path: Path) -> None:
    spec = SMALL_SPEC.model_copy(update={"files": (("/etc/odd name.conf", "x"),)})
    paths = RootfsPaths(tmp_path / "staging")
    args = rootfs.mmdebstrap_args(spec, paths)
    assert "--variant=minbase" in args and "--include=bash" in args and "--format=tar" in args
    assert '--aptopt=Apt::Install-Recommends "false"' in args
    suite = args.index(rootfs.SUITE)
    assert args[suite + 1] == str(paths.tarball)
    assert args[suite + 2:] == list(rootfs.DEBIAN_SOURCES)
    hooks = [a.removeprefix("--customize-hook=") for a in args if a.startswith("--customize-hook=")]
    assert hooks[0] == 'rm -f "$1/etc/resolv.conf" "$1/etc/hostname"'
    # The extra file's path is quoted for the hook's shell; the status file is copied out last.
    assert hooks[1] == (f"mkdir -p \"$1$(dirname '/etc/odd name.conf')\" && "
                        f"cp {paths.extra_file(0)} \"$1\"'/etc/odd name.conf'")
    assert hooks[-1] == f'cp "$1/var/lib/dpkg/status" {paths.dpkg_status}'


DPKG_STATUS = """\
Package: bash
Status: install ok installed
Version: 5.2.15-2+b13
Description: shell
 a continuation line: Version: 0

Package: python3
Status: deinstall ok config-files
Version: 3.11.2-1

Package: buildah
Status: install ok installed
Architecture: amd64
Version: 1.28.2+ds1-3+deb12u1+b3
"""


def test_installed_versions_come_from_the_dpkg_status() -> None:
    assert rootfs.installed_versions(DPKG_STATUS, ("buildah", "bash")) == {
        "buildah": "1.28.2+ds1-3+deb12u1+b3", "bash": "5.2.15-2+b13"}
    with pytest.raises(RootfsFailed, match="python3"):
        rootfs.installed_versions(DPKG_STATUS, ("bash", "python3"))


def _small_tarball(path: Path) -> Path:
    return write_tar(path, [Entry("bin", "dir"), Entry("bin/hello", data=b"#!/bin/sh\necho hi\n", mode=0o755),
                            Entry("etc", "dir"), Entry("etc/motd", data=b"hello\n")])


def test_write_layout_makes_a_one_layer_image_that_skopeo_reads(tmp_path: Path) -> None:
    tarball = _small_tarball(tmp_path / "root.tar")
    config = rootfs.image_config(SMALL_SPEC)
    layout = OciLayoutPaths(tmp_path / "layout")
    digest, layer_bytes = rootfs.write_layout(tarball, config, layout, "v1")

    image = read_layout(layout.directory)  # verifies the manifest against the index
    assert image.digest == digest
    config_blob, layer = image.blobs
    assert layer.media_type == rootfs.OCI_LAYER_GZIP and layer.size == layer_bytes
    unpacked = gzip.decompress(layout.blob(layer.digest).read_bytes())
    assert unpacked == tarball.read_bytes()
    written = json.loads(layout.blob(config_blob.digest).read_bytes())
    diff_id = "sha256:" + hashlib.sha256(unpacked).hexdigest()
    assert written["rootfs"] == {"type": "layers", "diff_ids": [diff_id]}
    assert written["config"] == {"Env": [f"PATH={rootfs.DEFAULT_PATH}"], "Cmd": ["bash"], "WorkingDir": "/"}
    index = json.loads(layout.index.read_bytes())
    assert index["manifests"][0]["annotations"] == {rootfs.REF_NAME_ANNOTATION: "v1"}
    assert not list(layout.blobs.glob(".*"))  # no partial left

    inspected = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{layout.directory}:v1"],
                                          capture_output=True, text=True, check=True).stdout)
    assert inspected["Digest"] == digest and inspected["Layers"] == [layer.digest]

    # The same tarball gives the same image (fixed gzip header, sorted JSON).
    again, _ = rootfs.write_layout(tarball, config, OciLayoutPaths(tmp_path / "again"), "v1")
    assert again == digest


def test_a_missing_mmdebstrap_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DependencyMissing, match="Debian package mmdebstrap"):
        rootfs.make_debian_layout(SMALL_SPEC, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_the_cache_makes_a_root_once_per_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache's own logic, with the mmdebstrap step replaced by a small tarball (the real step
    is exercised by the builder test below and by every test that boots the Debian image)."""
    made: list[str] = []

    def fake_make(spec: RootfsSpec, dest: Path) -> Path:
        made.append(spec.spec_hash())
        paths = RootfsPaths(dest)
        dest.mkdir(parents=True)
        digest, size = rootfs.write_layout(_small_tarball(tmp_path / f"{len(made)}.tar"),
                                           rootfs.image_config(spec), OciLayoutPaths(paths.layout), spec.tag)
        info = rootfs.RootfsInfo(name=spec.name, spec_hash=spec.spec_hash(), manifest_digest=digest,
                                 packages={"bash": "5"}, tar_bytes=0, layer_bytes=size, seconds=0)
        paths.info.write_text(info.model_dump_json())
        return paths.layout

    monkeypatch.setattr(rootfs, "make_debian_layout", fake_make)
    system = SystemPaths(tmp_path / "system")
    first = rootfs.ensure_rootfs(SMALL_SPEC, system.root)
    assert first.layout == system.rootfs(SMALL_SPEC.key()).layout
    assert rootfs.ensure_rootfs(SMALL_SPEC, system.root) == first
    assert made == [SMALL_SPEC.spec_hash()]

    changed = SMALL_SPEC.model_copy(update={"packages": ("bash", "python3")})
    second = rootfs.ensure_rootfs(changed, system.root)
    assert made == [SMALL_SPEC.spec_hash(), changed.spec_hash()]
    # The older spec's root is gone, no staging directory is left; another name is untouched.
    other = rootfs.ensure_rootfs(SMALL_SPEC.model_copy(update={"repository": "test/other"}), system.root)
    assert sorted(p.name for p in system.rootfs_root.iterdir()) == sorted(
        [".lock", second.layout.parent.name, other.layout.parent.name])


def test_the_builder_root_holds_buildah_and_its_configuration() -> None:
    prepared = rootfs.ensure_rootfs(BUILDER, SHARED_SYSTEM_DIR)
    version = rootfs.builder_version(SHARED_SYSTEM_DIR)
    assert version == prepared.info.packages["buildah"] and version.startswith("1.")
    image = read_layout(prepared.layout)
    assert image.digest == prepared.info.manifest_digest
    layer = OciLayoutPaths(prepared.layout).blob(image.blobs[1].digest)
    wanted = {"./etc/containers/registries.conf", "./etc/containers/storage.conf"}
    found: dict[str, bytes] = {}
    names: list[str] = []
    with tarfile.open(layer, mode="r|gz") as tar:
        for member in tar:
            names.append(member.name)
            if member.name in wanted:
                extracted = tar.extractfile(member)
                assert extracted is not None
                found[member.name] = extracted.read()
    assert found["./etc/containers/registries.conf"].decode() == rootfs.BUILDER_REGISTRIES_CONF
    assert found["./etc/containers/storage.conf"].decode() == rootfs.BUILDER_STORAGE_CONF
    assert "./usr/bin/buildah" in names
    assert "./etc/resolv.conf" not in names and "./etc/hostname" not in names
    assert not [n for n in names if n.startswith("./var/lib/apt/lists/") and n.endswith("_Packages")]
    assert not [n for n in names if n.startswith("./var/cache/apt/") and n.endswith((".deb", ".bin"))]
    assert not [n for n in names if n.startswith("./usr/share/man/") and not n.endswith("/")]
