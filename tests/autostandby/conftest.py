"""Fixtures of the auto-standby tests: one server per module whose network namespace (the
harness's) is joined by the lab's "internet" namespace (tests/network/lab.py), with the busybox
demo image, and strict SDK clients. Each test's instances are deleted when it ends."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypeman import Hypeman

from hypemand.images import demo
from hypemand.network.namespace import run_in_namespace
from tests.network.lab import Lab, netns_supported
from tests.support.harness import Harness, ServerProcess, strict_client

SMALL = {"size": "256MB", "overlay_size": "64MB", "vcpus": 1}
ECHO_PORT = 7000
# busybox httpd on 80 in the background, a line echo server on ECHO_PORT in the foreground.
SERVES = {"entrypoint": ["/bin/sh", "-c"],
          "cmd": [f"httpd -p 80 -h /www; exec nc -ll -p {ECHO_PORT} -e cat"]}
NEVER = "1h"  # an idle timeout no test waits for
SHORT = "2s"


@dataclass
class World:
    lab: Lab
    server: ServerProcess
    namespace: str  # the server's VM network

    def connect(self, ip: str, port: int = ECHO_PORT) -> socket.socket:
        """A connection to the VM from inside the server's namespace (where the ingress proxy
        lives: its source is the bridge's gateway address)."""
        return run_in_namespace(self.namespace, partial(connect_when_listening, ip, port))


def connect_when_listening(ip: str, port: int) -> socket.socket:
    """Running says the program started, not that its server (second in its script) listens."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return socket.create_connection((ip, port), timeout=20)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)  # a poll for the guest's listener, not a wait for a timing


@pytest.fixture(scope="module")
def world(module_harness: Harness) -> Iterator[World]:
    if (why := netns_supported()) is not None:
        pytest.skip(why)
    lab = Lab()
    try:
        data = module_harness.root / "data"
        namespace = module_harness.namespace_of(data)
        assert namespace is not None
        lab.connect_internet(namespace)
        server = module_harness.start(data)
        demo.install(server.base_url, server.token, wait_seconds=300)
        yield World(lab, server, namespace)
    finally:
        assert not lab.close()


@pytest.fixture
def sdk(world: World) -> Iterator[Hypeman]:
    with strict_client(world.server) as client:
        yield client


@pytest.fixture(autouse=True)
def one_test_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test's VMs go when it ends: two cores hold few small vCPUs."""
    yield
    if "world" not in request.fixturenames:
        return
    server = request.getfixturevalue("world").server
    with strict_client(server) as client:
        for instance in client.instances.list():
            client.instances.delete(instance.id)


def running(sdk: Hypeman, name: str, idle_timeout: str = NEVER, **policy: Any) -> tuple[str, str]:
    """A Running VM serving its page and the echo port, with auto-standby enabled: (id, ip)."""
    auto_standby = {"enabled": True, "idle_timeout": idle_timeout, **policy}
    created = sdk.instances.create(name=name, image=demo.DEMO_NAME, auto_standby=auto_standby,  # type: ignore[arg-type]
                                   **{**SMALL, **SERVES})  # type: ignore[arg-type]
    assert sdk.instances.wait(created.id, state="Running", api_timeout="120s").state == "Running"
    instance = sdk.instances.get(created.id)
    assert instance.network is not None and instance.network.ip is not None
    return created.id, instance.network.ip


def qemu_of(data_dir: Path, instance_id: str) -> list[int]:
    """PIDs of QEMUs running in the instance's directory."""
    directory = str((data_dir / "guests" / instance_id).resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")[0]
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if b"qemu" in command and cwd == directory:
            found.append(int(entry.name))
    return found
