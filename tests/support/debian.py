"""The small Debian image (bash, python3) in a test server, for tests that need a real distribution.

The root is made once per shared system dir by ``hypemand.builds.rootfs`` (``scripts/setup.sh
--test`` does it; otherwise the first use here, about half a minute) and pushed like any client
would push it: ``skopeo copy`` through the server's ``/v2``.
"""

from __future__ import annotations

from typing import Any

from hypemand.builds.rootfs import DEBIAN_TEST, PreparedRootfs, ensure_rootfs
from hypemand.images import demo
from tests.support.harness import SHARED_SYSTEM_DIR, ServerProcess

DEBIAN_IMAGE = f"docker.io/{DEBIAN_TEST.name}"  # docker.io/hypeman/debian:bookworm
READY_TIMEOUT = 600.0


def debian_rootfs() -> PreparedRootfs:
    return ensure_rootfs(DEBIAN_TEST, SHARED_SYSTEM_DIR)


def install_debian(server: ServerProcess) -> dict[str, Any]:
    """Push the Debian test image into ``server`` and wait until it is ready; returns the
    server's image record (its ``digest`` is the layout's manifest digest)."""
    prepared = debian_rootfs()
    demo.push_layout(prepared.layout, server.base_url, server.token,
                     target=DEBIAN_TEST.name, tag=DEBIAN_TEST.tag)
    return demo.wait_until_ready(server.base_url, server.token, DEBIAN_IMAGE, READY_TIMEOUT)
