"""Session fixtures for the images tests: test images built once, a real registry, polling."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from hypeman import Hypeman
from hypeman.types import Image

from tests.support.oci import Entry, Layout, busybox_entries, push
from tests.support.registry import Registry, TokenService, run_registry, run_token_registry

READY_TIMEOUT = 300.0  # two cores shared with other suites: be generous


@dataclass
class TestImages:
    layout: Layout
    digests: dict[str, str] = field(default_factory=dict)  # layout tag -> manifest digest
    big_file: bytes = b""


def single_layers() -> list[list[Entry]]:
    return [[*busybox_entries(), Entry("etc/motd", data=b"hello from single\n")]]


def layered_layers() -> list[list[Entry]]:
    lower = [
        *busybox_entries(),
        Entry("etc/motd", data=b"layer1\n"),
        Entry("etc/removed.txt", data=b"gone soon\n"),
        Entry("data", "dir"),
        Entry("data/opaque", "dir"),
        Entry("data/opaque/old1", data=b"old\n"),
        Entry("data/keep.txt", data=b"kept\n"),
        Entry("dev/null", "chardev", mode=0o666, device=(1, 3)),
        Entry("bin/suid", data=b"#!/bin/sh\n", mode=0o4755, uid=1234, gid=5678),
        Entry("bin/hl", "hardlink", target="bin/busybox"),
    ]
    middle = [
        Entry("etc/.wh.removed.txt"),
        Entry("data/opaque", "dir"),
        Entry("data/opaque/.wh..wh..opq"),
        Entry("data/opaque/new", data=b"new\n"),
        Entry("etc/added.txt", data=b"added\n"),
    ]
    upper = [
        Entry("etc/motd", data=b"layer3\n"),
        Entry("etc/motd-link", "symlink", target="motd"),
    ]
    return [lower, middle, upper]


@pytest.fixture(scope="session")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> TestImages:
    layout = Layout.create(tmp_path_factory.mktemp("oci") / "layout")
    images = TestImages(layout=layout, big_file=os.urandom(6 << 20))
    images.digests["single"] = layout.new_image(
        "single", single_layers(), entrypoint=["/bin/sh", "-c"], cmd=["cat /etc/motd"],
        env={"FOO": "bar", "PATH": "/bin"}, workdir="/work",
    )
    images.digests["layered"] = layout.new_image("layered", layered_layers(), cmd=["/bin/sh"])
    for arch in ("amd64", "arm64"):
        images.digests[arch] = layout.new_image(
            arch, [[*busybox_entries(), Entry("etc/arch", data=f"{arch}\n".encode())]],
            architecture=arch, cmd=["cat", "/etc/arch"],
        )
    images.digests["multi"] = layout.add_index("multi", {"linux/amd64": "amd64", "linux/arm64": "arm64"})
    big = [Entry("big", "dir"), Entry("big/random.bin", data=images.big_file)]
    for n in range(4):
        images.digests[f"restart{n}"] = layout.new_image(
            f"restart{n}", [busybox_entries(), big], env={"IMAGE_NUMBER": str(n)}, cmd=["/bin/sh"])
    return images


@dataclass
class PushedRegistry:
    registry: Registry
    digests: dict[str, str]  # repository:tag -> pushed manifest digest

    def ref(self, repo_tag: str) -> str:
        return f"{self.registry.host}/{repo_tag}"


@pytest.fixture(scope="session")
def local_registry(
    tmp_path_factory: pytest.TempPathFactory, test_images: TestImages
) -> Iterator[PushedRegistry]:
    with run_registry(tmp_path_factory.mktemp("registry")) as registry:
        layout = test_images.layout
        pushed = PushedRegistry(registry, {})
        plan = {
            "test/single:1": ("single", {}),
            "test/single-docker:1": ("single", {"docker_format": True}),
            "test/layered:1": ("layered", {}),
            "test/multi:1": ("multi", {"all_platforms": True}),
            "join/app:1": ("single", {}),
            "missing-tag/app:1": ("single", {}),
            **{f"restart/img{n}:1": (f"restart{n}", {}) for n in range(4)},
        }
        for repo_tag, (tag, options) in plan.items():
            pushed.digests[repo_tag] = push(layout, tag, f"{registry.host}/{repo_tag}", **options)
        yield pushed


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory,
                   test_images: TestImages) -> Iterator[tuple[Registry, TokenService, str]]:
    with run_token_registry(tmp_path_factory.mktemp("token-registry")) as (registry, tokens):
        digest = push(test_images.layout, "single", f"{registry.host}/private/app:1",
                      creds=f"{registry.username}:{registry.password}")
        yield registry, tokens, digest


def wait_for_status(sdk: Hypeman, name: str, statuses: tuple[str, ...] = ("ready", "failed"),
                    timeout: float = READY_TIMEOUT) -> Image:
    deadline = time.monotonic() + timeout
    while True:
        image = sdk.images.get(name)
        if image.status in statuses:
            return image
        if time.monotonic() > deadline:
            raise AssertionError(f"image {name} still {image.status} after {timeout}s")
        time.sleep(0.2)


def images_dir(data_dir: Path) -> Path:
    return data_dir / "images"


def remove_layer_data(registry: Registry, repository: str, tag: str) -> str:
    """Delete the stored data of the top layer of ``repository:tag`` inside the registry's storage,
    so its manifest still resolves but a pull fails at that layer; return its digest. Layers are
    shared by content across repositories: the top layer must be one no other image has (the
    busybox layer of the test images is everywhere)."""
    manifest = httpx.get(f"{registry.url}/v2/{repository}/manifests/{tag}", timeout=10,
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    digest = str(manifest["layers"][-1]["digest"])
    hex_digest = digest.removeprefix("sha256:")
    blobs = registry.storage / "docker" / "registry" / "v2" / "blobs" / "sha256"
    (blobs / hex_digest[:2] / hex_digest / "data").unlink()
    return digest
