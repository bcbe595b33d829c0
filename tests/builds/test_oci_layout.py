"""OCI layouts in and out of the image store (``hypemand.builds.oci_layout``), and the Debian test
image in a real server.

The import and export run in this process against an ``ImageService`` on a data directory, as
the build service runs them inside the server. One server serves the module: it is started on a
data directory into which a small layout was imported first, so its ``GET /images`` and ``/v2``
show what the import left; the Debian test image is pushed into it and booted once.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from hypeman.lib.exec import exec as sdk_exec

from hypemand.builds import oci_layout
from hypemand.builds.oci_layout import LayoutInvalid, export_layout, import_layout, read_layout
from hypemand.images import demo
from hypemand.images.errors import ImageNotFound
from hypemand.images.service import ImageService
from hypemand.layout import DataLayout, OciLayoutPaths
from tests.api.conftest import SMALL
from tests.support.debian import DEBIAN_IMAGE, install_debian
from tests.support.harness import Harness, ServerProcess, strict_client

IMPORTED = ("imported/busybox", "v1")  # /v2 repository and tag of the layout imported before start
IMPORTED_NAME = "docker.io/imported/busybox:v1"
WAIT_SECONDS = 300


@pytest.fixture(scope="module")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo image (Debian's busybox-static) as an OCI layout, tagged ``latest``."""
    return demo.build_layout(tmp_path_factory.mktemp("demo"))


def _skopeo_inspect(image: str) -> dict[str, Any]:
    result = subprocess.run(["skopeo", "inspect", image], capture_output=True, text=True, check=True)
    inspected: dict[str, Any] = json.loads(result.stdout)
    return inspected


def _layout_copy(layout: Path, dest: Path) -> OciLayoutPaths:
    shutil.copytree(layout, dest)
    return OciLayoutPaths(dest)


@pytest_asyncio.fixture
async def images(tmp_path: Path) -> AsyncIterator[ImageService]:
    """An image service on a fresh data directory; it pulls from nowhere."""
    service = ImageService(DataLayout(tmp_path / "data"), allowed_registries=frozenset())
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def _import_and_wait(images: ImageService, layout: Path, repository: str, tag: str) -> str:
    digest = await import_layout(images, layout, repository, tag)
    async with asyncio.timeout(WAIT_SECONDS):
        image = await images.wait(f"docker.io/{repository}:{tag}")
    assert image.status == "ready", image.error
    return digest


# ---- the module's server: started after an import into its data directory ------------------------


@pytest.fixture(scope="module")
def server(module_harness: Harness, busybox_layout: Path) -> ServerProcess:
    data_dir = module_harness.root / "data"

    async def import_before_start() -> None:
        service = ImageService(DataLayout(data_dir))
        await service.start()
        try:
            await _import_and_wait(service, busybox_layout, *IMPORTED)
        finally:
            await service.stop()

    asyncio.run(import_before_start())
    started = module_harness.start(data_dir)
    install_debian(started)
    return started


def test_an_imported_layout_is_an_image_the_api_and_v2_serve(server: ServerProcess,
                                                              busybox_layout: Path) -> None:
    expected = read_layout(busybox_layout)
    with strict_client(server) as sdk:
        image = sdk.images.get(IMPORTED_NAME)
    assert image.status == "ready" and image.digest == expected.digest
    repository, tag = IMPORTED
    response = httpx.get(f"{server.base_url}/v2/{repository}/manifests/{tag}", timeout=30,
                         headers={"Authorization": f"Bearer {server.token}",
                                  "Accept": expected.media_type})
    assert response.status_code == 200
    assert response.content == expected.body
    assert response.headers["Docker-Content-Digest"] == expected.digest


@pytest.mark.vm
def test_the_debian_image_runs_bash_and_python(server: ServerProcess) -> None:
    with strict_client(server) as sdk:
        image = sdk.images.get(DEBIAN_IMAGE)
        assert image.cmd == ["bash"]
        created = sdk.instances.create(name="debian", image=DEBIAN_IMAGE, entrypoint=["sleep"],
                                       cmd=["infinity"], **SMALL)  # type: ignore[arg-type]
        try:
            assert sdk.instances.wait(created.id, state="Running", api_timeout="120s").state == "Running"
            shell = sdk_exec(sdk, created.id, ["bash", "-c", 'echo "bash ${BASH_VERSINFO[0]}" $((6 * 7))'])
            assert (shell.exit_code, shell.output) == (0, b"bash 5 42\n")
            script = "import sys, ssl; print(sys.version_info[:2])"
            python = sdk_exec(sdk, created.id, ["python3", "-c", script])
            assert (python.exit_code, python.output) == (0, b"(3, 11)\n")
        finally:
            sdk.instances.delete(created.id)


# ---- in this process ------------------------------------------------------------------------------


async def test_import_then_export_round_trips_through_the_store(
        images: ImageService, busybox_layout: Path, tmp_path: Path) -> None:
    digest = await _import_and_wait(images, busybox_layout, "demo/busybox", "latest")
    assert digest == read_layout(busybox_layout).digest
    revision, manifest_blob = images.push_registry.get_manifest("demo/busybox", "latest")
    assert revision.digest == digest

    dest = tmp_path / "bases"
    exported = await export_layout(images, ["demo/busybox", f"docker.io/demo/busybox@{digest}"], dest)
    assert [(e.layout_name, e.digest, e.image_name) for e in exported] == [
        ("base0", digest, "docker.io/demo/busybox:latest"),
        ("base1", digest, f"docker.io/demo/busybox@{digest}")]
    assert exported[0].media_type == revision.media_type and exported[0].layout_digest == digest
    for name in ("base0", "base1"):
        assert (await asyncio.to_thread(_skopeo_inspect, f"oci:{dest}:{name}"))["Digest"] == digest
    # Blobs are hard links into the store (same filesystem), not copies.
    paths = OciLayoutPaths(dest)
    assert os.stat(paths.blob(digest)).st_ino == os.stat(manifest_blob).st_ino
    index = json.loads(paths.index.read_bytes())
    names = [m["annotations"][oci_layout.REF_NAME_ANNOTATION] for m in index["manifests"]]
    assert names == ["base0", "base1"]


async def test_a_docker_schema_2_image_is_exported_as_oci(
        images: ImageService, busybox_layout: Path, tmp_path: Path) -> None:
    """Debian's buildah and skopeo find no image in a layout whose index names a Docker manifest:
    the export describes it in OCI terms, with the same config and layers."""
    docker_layout = tmp_path / "docker-layout"
    await asyncio.to_thread(subprocess.run, ["skopeo", "copy", "--quiet", "--format", "v2s2",
                                             f"oci:{busybox_layout}:latest", f"oci:{docker_layout}:latest"],
                            check=True, capture_output=True)
    source = read_layout(docker_layout)
    assert source.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    digest = await _import_and_wait(images, docker_layout, "docker/busybox", "v2")
    assert digest == source.digest

    dest = tmp_path / "bases"
    (exported,) = await export_layout(images, ["docker/busybox:v2"], dest)
    assert (exported.digest, exported.media_type) == (digest, source.media_type)
    assert exported.layout_digest != digest
    inspected = await asyncio.to_thread(_skopeo_inspect, f"oci:{dest}:base0")
    assert inspected["Digest"] == exported.layout_digest
    assert inspected["Layers"] == [d.digest for d in source.blobs[1:]]
    rewritten = read_layout_entry(dest)
    assert rewritten["config"]["digest"] == source.blobs[0].digest
    assert rewritten["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    layer_types = {layer["mediaType"] for layer in rewritten["layers"]}
    assert layer_types == {"application/vnd.oci.image.layer.v1.tar+gzip"}


def read_layout_entry(layout: Path) -> dict[str, Any]:
    image = read_layout(layout)
    document: dict[str, Any] = json.loads(image.body)
    return document


async def test_export_of_an_image_the_server_cannot_get_is_not_found(images: ImageService,
                                                                     tmp_path: Path) -> None:
    with pytest.raises(ImageNotFound, match="not on this server"):
        await export_layout(images, ["docker.io/library/nothere:1"], tmp_path / "bases", timeout=30)
    assert not (tmp_path / "bases").exists()


def _corrupt_layer(paths: OciLayoutPaths) -> None:
    layer = paths.blob(read_layout(paths.directory).blobs[1].digest)
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.unlink()  # the copy may share its inode with the fixture's layout
    layer.write_bytes(bytes(data))


def _two_images(paths: OciLayoutPaths) -> None:
    index = json.loads(paths.index.read_bytes())
    again = dict(index["manifests"][0], annotations={oci_layout.REF_NAME_ANNOTATION: "again"})
    index["manifests"].append(again)
    paths.index.write_text(json.dumps(index))


def _symlinked_config(paths: OciLayoutPaths) -> None:
    config = paths.blob(read_layout(paths.directory).blobs[0].digest)
    target = paths.directory / "config-elsewhere"
    config.rename(target)
    config.symlink_to(target)


def _missing_layer(paths: OciLayoutPaths) -> None:
    paths.blob(read_layout(paths.directory).blobs[1].digest).unlink()


@pytest.mark.parametrize(("spoil", "message"), [
    (_corrupt_layer, "does not match its digest"),
    (_two_images, "exactly one image; its index has 2 entries"),
    (_symlinked_config, "is not a regular file"),
    (_missing_layer, "the layout has no blob"),
])
async def test_a_bad_layout_is_refused_and_leaves_no_image(
        images: ImageService, busybox_layout: Path, tmp_path: Path, spoil: Any, message: str) -> None:
    paths = _layout_copy(busybox_layout, tmp_path / "layout")
    spoil(paths)
    with pytest.raises(LayoutInvalid, match=message):
        await import_layout(images, paths.directory, "bad/layout", "v1")
    assert await images.list_images() == []
    assert not images.store.paths.repository("bad/layout").tags.exists()
    assert not list(images.blobs.paths.partials.iterdir())


async def test_ensure_system_image_imports_once(images: ImageService, busybox_layout: Path) -> None:
    imports: list[str] = []
    put_manifest = images.push_registry.put_manifest

    async def counted(*args: Any) -> Any:
        imports.append(args[0])
        return await put_manifest(*args)

    images.push_registry.put_manifest = counted  # type: ignore[method-assign,assignment]
    first, second = await asyncio.gather(
        oci_layout.ensure_system_image(images, busybox_layout, "hypeman/system:1"),
        oci_layout.ensure_system_image(images, busybox_layout, "docker.io/hypeman/system:1"))
    again = await oci_layout.ensure_system_image(images, busybox_layout, "hypeman/system:1")
    assert imports == ["hypeman/system"]
    assert first == second == again
    assert first.name == "docker.io/hypeman/system:1" and first.digest == read_layout(busybox_layout).digest
    assert first.disk_path.is_file()
