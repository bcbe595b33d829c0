"""Pull faults against a misbehaving registry of the test's own on 127.0.0.1.

The fake serves a valid manifest and config, then misbehaves on the layer: the connection
drops mid-blob, the bytes do not match the digest, or the tarball tries to escape.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from hypeman import Hypeman, NotFoundError

from tests.conftest import ServerProcess
from tests.images.conftest import wait_for_status
from tests.support.net import http_server, send_body
from tests.support.oci import Entry, write_tar

ENDLESS_LIMIT = 1 << 30
ESCAPE_TARGET = Path(f"/tmp/hypemand-escape-{uuid.uuid4().hex}")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class FakeImage:
    manifest: bytes
    config: bytes
    layer: bytes
    behaviour: str  # "drop", "corrupt", "endless", "serve"

    @property
    def layer_digest(self) -> str:
        return digest_of(self.layer)


def make_image(tmp: Path, entries: list[Entry], behaviour: str) -> FakeImage:
    layer = gzip.compress(write_tar(tmp / f"{behaviour}.tar", entries).read_bytes())
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest_of(layer),
                    "size": len(layer)}],
    }).encode()
    return FakeImage(manifest, config, layer, behaviour)


FakeRegistry = tuple[str, dict[str, FakeImage], dict[str, int]]  # host, images, bytes sent endlessly


@pytest.fixture(scope="module")
def fake_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeRegistry]:
    tmp = tmp_path_factory.mktemp("fake-registry")
    payload = os.urandom(2 << 20)
    images = {
        "faults/drop": make_image(tmp, [Entry("big.bin", data=payload)], "drop"),
        "faults/corrupt": make_image(tmp, [Entry("small.bin", data=b"x" * 5000)], "corrupt"),
        "faults/endless": make_image(tmp, [Entry("small.bin", data=b"x" * 5000)], "endless"),
        "faults/endless-manifest": make_image(tmp, [Entry("small.bin", data=b"x")], "endless-manifest"),
        "faults/escape": make_image(
            tmp, [Entry("ok", data=b"ok"), Entry("../" * 12 + str(ESCAPE_TARGET).lstrip("/"), data=b"evil")],
            "serve"),
    }

    sent: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/v2/":
                self._send(200, b"{}", "application/json")
                return
            for repo, image in images.items():
                prefix = f"/v2/{repo}/"
                if not self.path.startswith(prefix):
                    continue
                rest = self.path[len(prefix):]
                if rest.startswith("manifests/") and image.behaviour == "endless-manifest":
                    self._endless(repo, b'{"schemaVersion": 2, "layers": [' + b" " * 65536)
                elif rest.startswith("manifests/"):
                    self._send(200, image.manifest, "application/vnd.oci.image.manifest.v1+json")
                elif rest == f"blobs/{digest_of(image.config)}":
                    self._send(200, image.config, "application/octet-stream")
                elif rest == f"blobs/{image.layer_digest}":
                    self._layer(image)
                else:
                    break
                return
            unknown = b'{"errors":[{"code":"NAME_UNKNOWN","message":"no such repo"}]}'
            self._send(404, unknown, "application/json")

        def _layer(self, image: FakeImage) -> None:
            if image.behaviour == "drop":
                self.send_response(200)
                self.send_header("Content-Length", str(len(image.layer)))
                self.end_headers()
                self.wfile.write(image.layer[: len(image.layer) // 2])
                self.wfile.flush()
                self.close_connection = True  # HTTP/1.0: the socket closes short of Content-Length
            elif image.behaviour == "endless":
                self._endless("faults/endless", image.layer)
            elif image.behaviour == "corrupt":
                corrupt = bytes(b ^ 0xFF for b in image.layer)
                self._send(200, corrupt, "application/octet-stream")
            else:
                self._send(200, image.layer, "application/octet-stream")

        def _endless(self, repo: str, start: bytes) -> None:
            """Start like the real thing, then never stop (up to 1 GiB); count what got out."""
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            self.close_connection = True
            filler = b" " * (1 << 20)
            try:
                self.wfile.write(start)
                sent[repo] = len(start)
                while sent[repo] < ENDLESS_LIMIT:
                    self.wfile.write(filler)
                    sent[repo] += len(filler)
            except OSError:
                pass  # the client hung up: what we want

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            send_body(self, status, body, content_type)

    with http_server(Handler) as server:
        yield f"127.0.0.1:{server.server_address[1]}", images, sent


def blob_dir(server: ServerProcess) -> Path:
    return server.data_dir / "images" / "blobs"


def assert_no_partials(server: ServerProcess) -> None:
    assert list((blob_dir(server) / "tmp").iterdir()) == []
    assert not list((server.data_dir / "images" / "content").glob("*/work"))


@pytest.mark.parametrize(("repo", "reason"), [
    ("faults/drop", "broke off"),
    ("faults/corrupt", "digest mismatch"),
])
def test_bad_blob_fails_the_pull_and_leaves_no_blob(
    repo: str, reason: str, sdk: Hypeman, server: ServerProcess,
    fake_registry: FakeRegistry,
) -> None:
    host, images, _ = fake_registry
    ref = f"{host}/{repo}:1"
    created = sdk.images.create(name=ref)
    assert created.digest == digest_of(images[repo].manifest)
    image = wait_for_status(sdk, ref)
    assert image.status == "failed"
    assert image.error and reason in image.error
    layer_hex = images[repo].layer_digest.removeprefix("sha256:")
    assert not (blob_dir(server) / "sha256" / layer_hex).exists()
    # The config blob downloaded fine and is kept: the cache only holds verified blobs.
    assert (blob_dir(server) / "sha256" / digest_of(images[repo].config).removeprefix("sha256:")).exists()
    assert_no_partials(server)


def test_escaping_tarball_fails_and_writes_nothing_outside(
    sdk: Hypeman, server: ServerProcess, fake_registry: FakeRegistry
) -> None:
    host, _, _ = fake_registry
    ref = f"{host}/faults/escape:1"
    sdk.images.create(name=ref)
    image = wait_for_status(sdk, ref)
    assert image.status == "failed"
    assert image.error and "escapes the root" in image.error
    assert not ESCAPE_TARGET.exists()
    content = server.data_dir / "images" / "content" / image.digest.removeprefix("sha256:")
    assert not (content / "rootfs.ext4").exists()
    assert_no_partials(server)


def test_registry_error_reason_is_reported(
    sdk: Hypeman, fake_registry: FakeRegistry
) -> None:
    host, _, _ = fake_registry
    with pytest.raises(NotFoundError) as err:
        sdk.images.create(name=f"{host}/faults/nope:1")
    assert "NAME_UNKNOWN: no such repo" in json.dumps(err.value.body)


def test_unreachable_registry_is_a_server_side_error(sdk: Hypeman) -> None:
    from hypeman import InternalServerError

    with pytest.raises(InternalServerError) as err:
        sdk.images.create(name="127.0.0.1:1/nothing/here:1")
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "registry_error"




def test_oversized_blob_is_cut_off_at_its_declared_size(
    sdk: Hypeman, server: ServerProcess, fake_registry: FakeRegistry
) -> None:
    """A registry that keeps sending after the manifest's size fills neither disk nor time."""
    host, images, sent = fake_registry
    ref = f"{host}/faults/endless:1"
    sdk.images.create(name=ref)
    image = wait_for_status(sdk, ref)
    assert image.status == "failed"
    assert image.error and "larger than" in image.error
    assert 0 < sent["faults/endless"] < 64 << 20  # hung up early (socket buffers aside)
    layer_hex = images["faults/endless"].layer_digest.removeprefix("sha256:")
    assert not (blob_dir(server) / "sha256" / layer_hex).exists()
    assert_no_partials(server)


def test_oversized_manifest_is_refused_without_reading_it_all(
    sdk: Hypeman, fake_registry: FakeRegistry
) -> None:
    from hypeman import InternalServerError

    host, _, sent = fake_registry
    with pytest.raises(InternalServerError) as err:
        sdk.images.create(name=f"{host}/faults/endless-manifest:1")
    assert isinstance(err.value.body, dict) and err.value.body["code"] == "registry_error"
    assert "larger than" in err.value.body["message"]
    assert 0 < sent["faults/endless-manifest"] < 64 << 20
