"""Real clients push real images into the server's /v2; the image becomes ready without a pull."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from hypeman import Hypeman

from hypemand.images import demo
from tests.registry.conftest import wait_ready
from tests.support import oci
from tests.support.harness import ServerProcess

TS_DIR = Path(__file__).resolve().parent.parent / "ts"


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def host(server: ServerProcess) -> str:
    return f"127.0.0.1:{server.port}"


def test_skopeo_push_with_credentials(server: ServerProcess, sdk: Hypeman, busybox_layout: Path,
                                      tmp_path: Path) -> None:
    """skopeo follows the Bearer challenge: Basic credentials at /v2/token, then Bearer."""
    auth = base64.b64encode(f"someone:{server.token}".encode()).decode()
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {host(server): {"auth": auth}}}))
    skopeo("copy", "--dest-tls-verify=false", "--dest-authfile", str(authfile),
           f"oci:{busybox_layout}:latest", f"docker://{host(server)}/demo/busybox:latest")
    assert "GET /v2/token" in server.log()

    expected = demo.layout_manifest_digest(busybox_layout)
    image = wait_ready(sdk, "demo/busybox:latest")
    assert image.name.endswith("demo/busybox:latest")
    assert image.digest == expected
    assert image.cmd == demo.DEMO_CMD


def test_skopeo_push_docker_v2_format_and_read_back(server: ServerProcess, sdk: Hypeman,
                                                    busybox_layout: Path, tmp_path: Path) -> None:
    """skopeo with a bearer token and Docker schema 2 manifests; then the GET side of /v2."""
    target = f"docker://{host(server)}/demo/busybox-v2s2:1.0"
    skopeo("copy", "--format", "v2s2", "--dest-tls-verify=false", "--dest-registry-token", server.token,
           f"oci:{busybox_layout}:latest", target)

    inspected = json.loads(skopeo("inspect", "--tls-verify=false", "--registry-token", server.token,
                                  "--raw", target).stdout)
    assert inspected["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    digest = json.loads(skopeo("inspect", "--tls-verify=false", "--registry-token", server.token,
                               target).stdout)["Digest"]

    headers = {"Authorization": f"Bearer {server.token}"}
    for reference in ("1.0", digest):
        url = f"{server.base_url}/v2/demo/busybox-v2s2/manifests/{reference}"
        head = httpx.head(url, headers=headers)
        assert head.status_code == 200
        assert head.headers["Docker-Content-Digest"] == digest
        assert head.headers["Content-Type"] == "application/vnd.docker.distribution.manifest.v2+json"
        assert httpx.get(url, headers=headers).json() == inspected
    tags = httpx.get(f"{server.base_url}/v2/demo/busybox-v2s2/tags/list", headers=headers).json()
    assert tags == {"name": "demo/busybox-v2s2", "tags": ["1.0"]}

    copy_back = tmp_path / "copy-back"
    skopeo("copy", "--src-tls-verify=false", "--src-registry-token", server.token, target,
           f"oci:{copy_back}:x")

    image = wait_ready(sdk, "demo/busybox-v2s2:1.0")
    assert image.digest
    assert image.cmd == demo.DEMO_CMD


def test_demo_image_command(server: ServerProcess, sdk: Hypeman) -> None:
    """`hypemand demo-image` builds busybox-static into an image and pushes it; twice is harmless."""
    command = [sys.executable, "-m", "hypemand.cli.main", "demo-image", "--url", server.base_url,
               "--data-dir", str(server.data_dir)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().endswith("ready")
    image = wait_ready(sdk, demo.DEMO_NAME)

    again = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert wait_ready(sdk, demo.DEMO_NAME).digest == image.digest


def test_demo_image_command_without_a_server(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hypemand.cli.main", "demo-image", "--url", "http://127.0.0.1:9",
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "hypemand serve" in result.stderr


@pytest.fixture(scope="session")
def ts_sdk() -> Path:
    """The official TypeScript SDK (@onkernel/hypeman 0.28.0) installed from npm into tests/ts."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed for the TypeScript SDK test")
    if not (TS_DIR / "node_modules" / "@onkernel" / "hypeman" / "lib" / "push.js").exists():
        subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=TS_DIR,
                       check=True, capture_output=True, timeout=600)
    return TS_DIR


def test_typescript_sdk_push(server: ServerProcess, sdk: Hypeman, busybox_layout: Path, ts_sdk: Path) -> None:
    """lib/push: HEAD blob, POST upload, PUT ?digest= with the body, PUT a Docker v2 manifest."""
    result = subprocess.run(
        ["node", "push-layout.mjs", server.base_url, server.token, str(busybox_layout), "latest",
         "ts/busybox:v1"],
        cwd=ts_sdk, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    log = server.log()
    assert "POST /v2/ts/busybox/blobs/uploads/" in log
    assert "PUT /v2/ts/busybox/manifests/v1" in log

    image = wait_ready(sdk, "ts/busybox:v1")
    assert image.cmd == demo.DEMO_CMD


def test_multi_platform_index_push(server: ServerProcess, sdk: Hypeman, tmp_path: Path) -> None:
    """skopeo --all pushes each platform's manifest by digest, then the index by tag; the image
    is the host platform's (amd64) manifest. An index naming manifests never pushed is refused."""
    layout = oci.Layout.create(tmp_path / "layout")
    root = oci.busybox_entries()
    amd64 = layout.new_image("amd64", [root], architecture="amd64", cmd=["/bin/sh", "-c", "echo amd64"])
    layout.new_image("arm64", [root], architecture="arm64", cmd=["/bin/sh", "-c", "echo arm64"])
    index_digest = layout.add_index("multi", {"linux/amd64": "amd64", "linux/arm64": "arm64"})

    pushed = oci.push(layout, "multi", f"{host(server)}/multi/app:latest",
                      creds=f"me:{server.token}", all_platforms=True)
    assert pushed == index_digest
    image = wait_ready(sdk, "multi/app:latest")
    assert image.digest == amd64
    assert image.cmd == ["/bin/sh", "-c", "echo amd64"]

    headers = {"Authorization": f"Bearer {server.token}"}
    served = httpx.get(f"{server.base_url}/v2/multi/app/manifests/latest", headers=headers)
    assert served.headers["Docker-Content-Digest"] == index_digest
    assert served.headers["Content-Type"] == "application/vnd.oci.image.index.v1+json"

    dangling = json.loads(served.content)
    dangling["manifests"][0]["digest"] = "sha256:" + "ab" * 32
    refused = httpx.put(f"{server.base_url}/v2/multi/app/manifests/dangling", headers={
        **headers, "Content-Type": "application/vnd.oci.image.index.v1+json"}, content=json.dumps(dangling))
    assert refused.status_code == 400
    assert refused.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
