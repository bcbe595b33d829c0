"""The demo image: Debian's busybox-static as a tiny OCI image, pushed into a running server.

This lets a fresh machine with no internet access run a VM: ``hypemand demo-image`` builds the
image with umoci from the host's ``/bin/busybox`` (package ``busybox-static``; fetched with
``apt-get download`` when not installed) and pushes it with skopeo through the server's own
``/v2`` registry, exactly as any other client would. The server then converts it; no pull.

The build is reproducible (fixed timestamps, fixed history), so running the command again
produces the same manifest digest and the push is a no-op for the image store.

The image runs ``httpd`` on port 80 serving ``/www`` and prints one line on start, so both the
logs and a port forward have something to show.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from hypemand.errors import DependencyMissing

DEMO_NAME = "demo/busybox:latest"
LAYOUT_TAG = "latest"
# Every timestamp in the image, so that rebuilding gives the same digest.
FIXED_TIME = "2024-01-01T00:00:00Z"
FIXED_EPOCH = 1704067200
DEMO_CMD = [
    "/bin/sh", "-c",
    "echo 'hypeman demo: busybox httpd listening on port 80'; exec httpd -f -v -p 80 -h /www",
]
INDEX_HTML = """<!doctype html>
<title>hypeman demo</title>
<h1>Hello from a hypeman VM</h1>
<p>Served by busybox httpd inside a QEMU virtual machine.</p>
"""
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def _require(tool: str, package: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise DependencyMissing(f"{tool} not found; install the Debian package {package}")
    return found


def _run(args: Sequence[str], cwd: Path | None = None) -> str:
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def find_busybox(download_dir: Path) -> Path:
    """The statically linked busybox of Debian's ``busybox-static`` package.

    The installed one when the package is installed, otherwise the package is downloaded with
    apt (Debian's mirror is reachable where the general internet is not) and unpacked.
    """
    installed = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "busybox-static"],
                               capture_output=True, text=True)
    if installed.returncode == 0 and "install ok installed" in installed.stdout:
        return Path("/bin/busybox")
    _require("apt-get", "apt")
    download_dir.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", "busybox-static"], cwd=download_dir)
    debs = sorted(download_dir.glob("busybox-static_*.deb"))
    if not debs:
        raise DependencyMissing("apt-get download busybox-static produced no package")
    unpacked = download_dir / "unpacked"
    _run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)])
    return unpacked / "bin" / "busybox"


def _make_rootfs(rootfs: Path, busybox: Path) -> None:
    (rootfs / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, rootfs / "bin" / "busybox")
    os.chmod(rootfs / "bin" / "busybox", 0o755)
    applets = _run([str(busybox), "--list-full"]).split()
    for applet in applets:
        link = rootfs / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    for directory in ("dev", "proc", "sys", "run", "root", "tmp", "www", "etc"):
        (rootfs / directory).mkdir(exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    (rootfs / "www" / "index.html").write_text(INDEX_HTML)
    for path in [rootfs, *rootfs.rglob("*")]:
        os.utime(path, (FIXED_EPOCH, FIXED_EPOCH), follow_symlinks=False)


def build_layout(workdir: Path, busybox: Path | None = None) -> Path:
    """Build the demo image as an OCI layout under ``workdir``; returns the layout directory.

    The image is tagged :data:`LAYOUT_TAG` inside the layout. The layer is made with
    ``umoci unpack`` + ``repack`` rather than ``umoci insert``: the ``insert`` of Debian's
    umoci 0.4.7 writes a tar stream without its end (the last file's padding and the
    end-of-archive blocks are missing), which strict unpackers rightly refuse.
    """
    umoci = _require("umoci", "umoci")
    busybox = busybox or find_busybox(workdir / "deb")
    bundle = workdir / "bundle"
    layout = workdir / "layout"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.rmtree(layout, ignore_errors=True)
    image = f"{layout}:{LAYOUT_TAG}"
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    arch = _GOARCH.get(platform.machine(), platform.machine())
    _run([umoci, "init", "--layout", str(layout)])
    _run([umoci, "new", "--image", image])
    _run([umoci, "unpack", *rootless, "--image", image, str(bundle)])
    _make_rootfs(bundle / "rootfs", busybox)
    _run([umoci, "repack", "--image", image, "--history.created", FIXED_TIME,
          "--history.created_by", "hypemand demo-image: Debian busybox-static", str(bundle)])
    config = [umoci, "config", "--image", image, "--no-history", "--created", FIXED_TIME,
              "--os", "linux", "--architecture", arch,
              "--config.env", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
              "--config.workingdir", "/", "--config.exposedports", "80/tcp"]
    for arg in DEMO_CMD:
        config.append(f"--config.cmd={arg}")
    _run(config)
    _run([umoci, "gc", "--layout", str(layout)])
    shutil.rmtree(bundle, ignore_errors=True)
    return layout


def layout_manifest_digest(layout: Path, tag: str = LAYOUT_TAG) -> str:
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return str(entry["digest"])
    raise KeyError(tag)


def push_layout(layout: Path, base_url: str, token: str, target: str = DEMO_NAME,
                tag: str = LAYOUT_TAG) -> None:
    """Push ``layout:tag`` to the server's ``/v2`` as ``target`` with skopeo.

    The token travels in a private auth file (Basic, token as password), not on the command
    line; skopeo exchanges it at ``/v2/token`` after the server's Bearer challenge.
    """
    skopeo = _require("skopeo", "skopeo")
    host = urlsplit(base_url).netloc
    if not host:
        raise ValueError(f"not a URL: {base_url!r}")
    auth = base64.b64encode(f"hypemand:{token}".encode()).decode()
    with tempfile.TemporaryDirectory(prefix="hypemand-push-") as private:
        authfile = Path(private) / "auth.json"
        authfile.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
        authfile.chmod(0o600)
        tls = ["--dest-tls-verify=false"] if urlsplit(base_url).scheme == "http" else []
        _run([skopeo, "copy", "--quiet", *tls, "--dest-authfile", str(authfile),
              f"oci:{layout}:{tag}", f"docker://{host}/{target}"])


def install(base_url: str, token: str, target: str = DEMO_NAME, wait_seconds: float = 600) -> dict[str, Any]:
    """Build the demo image, push it into the server at ``base_url`` and (if ``wait_seconds``)
    wait until the server reports it ``ready``. Returns the server's image record (or ``{}``).

    The server has to be running: the push goes through its ``/v2`` endpoint.
    """
    try:
        httpx.get(f"{base_url}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        raise ServerUnreachable(
            f"no hypemand answering at {base_url} ({exc}); start it with `hypemand serve`") from exc
    with tempfile.TemporaryDirectory(prefix="hypemand-demo-") as work:
        layout = build_layout(Path(work))
        push_layout(layout, base_url, token, target)
    if not wait_seconds:
        return {}
    return wait_until_ready(base_url, token, target, wait_seconds)


def wait_until_ready(base_url: str, token: str, name: str, timeout: float) -> dict[str, Any]:
    url = f"{base_url}/images/{quote(name, safe='')}"
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(url, headers=headers, timeout=30)
        if response.status_code == 200:
            image: dict[str, Any] = response.json()
            if image.get("status") == "ready":
                return image
            if image.get("status") == "failed":
                raise RuntimeError(f"the server failed to convert {name}: {image.get('error')}")
        elif response.status_code != 404:
            response.raise_for_status()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} not ready after {timeout:.0f} s")
        time.sleep(0.5)


class ServerUnreachable(Exception):
    pass
