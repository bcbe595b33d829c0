"""Helpers of the build tests: source tarballs made in memory, and waiting for a build to end."""

from __future__ import annotations

import io
import tarfile
import time

from hypeman import Hypeman
from hypeman.types import Build

BUSYBOX = "docker.io/demo/busybox:latest"
# A hang guard, not a measure: a build here takes well under a minute.
BUILD_DEADLINE = 600.0
# The builder VMs of the tests: small, one vCPU (TCG on 2 shared cores).
SMALL_BUILDER = {"memory_mb": 768, "cpus": 1}


def source_tarball(files: dict[str, str | bytes], mode: int = 0o644) -> bytes:
    """A tar.gz of ``files`` (name -> content), as a client would send its build context."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = mode
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def wait_finished(sdk: Hypeman, build_id: str) -> Build:
    """Poll ``builds.get`` until the build has ended (as Harbor does)."""
    deadline = time.monotonic() + BUILD_DEADLINE
    while True:
        build = sdk.builds.get(build_id)
        if build.status in ("ready", "failed", "cancelled"):
            return build
        assert time.monotonic() < deadline, f"build {build_id} still {build.status}"
        time.sleep(0.5)


def wait_status(sdk: Hypeman, build_id: str, wanted: str, *, with_vm: bool = False) -> Build:
    """Poll until the build is ``wanted`` (and, with ``with_vm``, its builder VM is known)."""
    deadline = time.monotonic() + BUILD_DEADLINE
    while True:
        build = sdk.builds.get(build_id)
        if build.status == wanted and (not with_vm or build.builder_instance_id):
            return build
        assert build.status not in ("ready", "failed", "cancelled"), f"build ended: {build}"
        assert time.monotonic() < deadline, f"build {build_id} still {build.status}"
        time.sleep(0.2)
