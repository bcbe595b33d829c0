"""A memory reclaim outlives its server: the server SIGKILLed while a balloon is being walked
down (2 MiB per step, each waited for: the walk takes seconds by construction) leaves the VM
part-way; the next server, finding the hold in ``memory-reclaim-hold.json``, finishes the walk,
keeps the hold, and a reclaim of 0 gives everything back. Real VMs, the SDK in strict mode; QEMU's
balloon read over QMP while no server holds its socket."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypemand.hypervisor.qemu_qmp import QmpChannel
from hypemand.images import demo
from tests.api.conftest import SMALL
from tests.api.test_crash_faults import Rig
from tests.api.test_memory_reclaim import ASSIGNED, MIB, action_of, balloon_bytes, guest_sh, until
from tests.support.harness import Harness

pytestmark = pytest.mark.vm

IDLE = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["while true; do sleep 1; done"]}
RECLAIM = 128 * MIB  # everything above the 128 MiB floor: 64 steps


@pytest.fixture(scope="module")
def rig(module_harness: Harness) -> Iterator[Rig]:
    server = module_harness.start()
    demo.install(server.base_url, server.token, wait_seconds=300)
    yield Rig(module_harness, server.data_dir, server)


def qemu_guest_memory(data_dir: Path, instance_id: str) -> int:
    """QMP ``query-balloon`` straight from QEMU (only while no server holds its socket)."""

    async def ask() -> int:
        channel = QmpChannel(data_dir / "guests" / instance_id / "qemu.sock", name="test-balloon")
        try:
            return int((await channel.execute("query-balloon"))["actual"])
        finally:
            await channel.close()

    return asyncio.run(ask())


def test_a_restarted_server_finishes_the_walk_and_keeps_the_hold(rig: Rig) -> None:
    with rig.client() as sdk:
        created = sdk.instances.create(name="walked", image=demo.DEMO_NAME, **{**SMALL, **IDLE})  # type: ignore[arg-type]
        instance = created.id
        assert sdk.instances.wait(instance, state="Running", api_timeout="120s").state == "Running"
        guest_sh(sdk, instance, "true")
        applied = sdk.resources.reclaim_memory(reclaim_bytes=RECLAIM, hold_for="10m", reason="test: restart")
        assert action_of(applied, instance).target_guest_memory_bytes == ASSIGNED - RECLAIM
        hold_until = applied.hold_until
    rig.kill_server()
    # Part-way: QEMU was told only the first step (the guest may not even have taken it yet).
    assert qemu_guest_memory(rig.server.data_dir, instance) > ASSIGNED - RECLAIM
    rig.restart()
    with rig.client() as sdk:
        until("the new server finished the walk", lambda: balloon_bytes(sdk, instance) == RECLAIM)
        held = sdk.resources.reclaim_memory(reclaim_bytes=RECLAIM, dry_run=True)
        assert held.hold_until == hold_until
        assert action_of(held, instance).previous_target_guest_memory_bytes == ASSIGNED - RECLAIM
        released = sdk.resources.reclaim_memory(reclaim_bytes=0)
        assert released.hold_until is None and action_of(released, instance).status == "applied"
        until("the balloon deflated", lambda: balloon_bytes(sdk, instance) == 0)
        sdk.instances.delete(instance)
