"""A full data disk is a state the API tells, and one a VM comes back from, through a real
`hypemand serve` on a small loop-mounted ext4 and the official SDK in strict mode.

When the host file system fills while a guest writes, QEMU pauses the guest (its run state
``io-error``). The instance then reads ``Paused`` with ``state_error`` saying the disk is full
(before: ``Running``, while exec hung); exec and standby answer at once instead of hanging or
answering 500; and once space is freed the guest continues by itself, the write it was in the
middle of completing.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypeman import APIStatusError, Hypeman
from hypeman.lib.exec import ExecResult
from hypeman.lib.exec import exec as sdk_exec
from hypeman.types import Instance

from hypemand.images import demo
from tests.support.harness import ServerProcess, shared_harness, strict_client
from tests.support.smallfs import fill, mounted_ext4

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a loop file system needs root"),
]

WRITE_MB = 48


@dataclass
class SmallDisk:
    server: ServerProcess
    mountpoint: Path
    instance: str

    def fill(self, leave: int) -> Path:
        """Take all free space but about ``leave`` bytes (delete the file to give it back)."""
        return fill(self.mountpoint, leave)


@pytest.fixture(scope="module")
def small_disk(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SmallDisk]:
    root = tmp_path_factory.mktemp("small-disk")
    # The harness (deletes, stops, checks) finishes before the file system is unmounted.
    with mounted_ext4(root / "fs", 768) as mountpoint, shared_harness(root / "harness", request.node) as hm:
        server = hm.start(mountpoint / "data")
        demo.install(server.base_url, server.token, wait_seconds=300)
        with strict_client(server) as sdk:
            created = sdk.instances.create(
                name="writer", image=demo.DEMO_NAME, size="128MB", overlay_size="256MB", vcpus=1,
                entrypoint=["/bin/sh", "-c"], cmd=["while true; do sleep 3600; done"],
            )
            assert sdk.instances.wait(created.id, state="Running", api_timeout="120s").state == "Running"
        yield SmallDisk(server, mountpoint, created.id)


def test_a_guest_on_a_full_disk_is_paused_says_why_and_continues_once_there_is_room(
    small_disk: SmallDisk,
) -> None:
    server, instance = small_disk.server, small_disk.instance
    results: list[ExecResult] = []

    def write() -> None:
        with strict_client(server) as sdk:
            script = f"dd if=/dev/urandom of=/big bs=1M count={WRITE_MB} 2>/dev/null && sync && wc -c </big"
            results.append(sdk_exec(sdk, instance, ["/bin/sh", "-c", script]))

    filler = small_disk.fill(leave=4 << 20)
    writer = threading.Thread(target=write, daemon=True)
    try:
        writer.start()
        with strict_client(server) as sdk:
            paused = _wait_for(sdk, instance, lambda i: i.state == "Paused", 120)
            assert paused.state_error is not None and "disk full" in paused.state_error, paused
            # What needs a running guest answers at once instead of hanging.
            with pytest.raises(APIStatusError) as refused:
                sdk.instances.standby(instance)
            assert refused.value.status_code == 409, refused.value
            assert writer.is_alive(), "the write finished on a full disk"
    finally:
        filler.unlink()
    writer.join(120)
    assert not writer.is_alive(), "the guest did not continue once there was room"
    (result,) = results
    assert result.exit_code == 0, result
    assert result.output.decode().strip() == str(WRITE_MB << 20), result
    with strict_client(server) as sdk:
        back = sdk.instances.get(instance)
        assert back.state == "Running" and back.state_error is None, back
        assert "resuming the guest" in "\n".join(sdk.instances.logs(instance, source="hypeman", tail=50))
        sdk_exec(sdk, instance, ["/bin/rm", "/big"])


def test_standby_on_a_full_disk_is_507_and_the_guest_runs_on(small_disk: SmallDisk) -> None:
    server, instance = small_disk.server, small_disk.instance
    with strict_client(server) as sdk:
        filler = small_disk.fill(leave=0)
        try:
            with pytest.raises(APIStatusError) as full:
                sdk.instances.standby(instance)
        finally:
            filler.unlink()
        assert full.value.status_code == 507, full.value
        assert sdk.instances.get(instance).state == "Running"
        assert sdk_exec(sdk, instance, ["/bin/true"]).exit_code == 0
        # With room again, standby and restore work.
        assert sdk.instances.standby(instance).state == "Standby"
        assert sdk.instances.restore(instance).state == "Running"


def _wait_for(sdk: Hypeman, instance: str, done: Callable[[Instance], bool], seconds: float) -> Instance:
    deadline = time.monotonic() + seconds
    while True:
        seen = sdk.instances.get(instance)
        if done(seen):
            return seen
        assert time.monotonic() < deadline, f"still {seen.state} ({seen.state_error})"
        time.sleep(0.1)  # a poll: the guest fills the disk in its own time


def test_resources_tells_the_disk_this_server_can_really_use(small_disk: SmallDisk) -> None:
    """The disk's capacity is what the server can fill (free space plus its own files), not the
    size of a file system others use too (before: the file system's size); its allocation counts
    the running instance's promises (overlay up to its size, RAM backed in full)."""
    with strict_client(small_disk.server) as sdk:
        filler = small_disk.fill(leave=64 << 20)
        try:
            disk = sdk.resources.get().disk
            taken_by_others = filler.stat().st_blocks * 512
            total = os.statvfs(small_disk.mountpoint)
            assert disk.capacity <= total.f_blocks * total.f_frsize - taken_by_others, disk
            assert disk.allocated >= (256 + 128) << 20, disk  # the writer's overlay and RAM
            assert disk.available <= 64 << 20, disk
        finally:
            filler.unlink()
