"""A soak: 50 standby/restore cycles of one VM with a live workload, through the official SDK in
strict mode. After every cycle the guest's counter has gone on (never back), its uptime has
not restarted, and the data it keeps in RAM (tmpfs) and on its disk hash the same."""

from __future__ import annotations

import pytest
from hypeman import Hypeman
from hypeman.lib.exec import exec as sdk_exec

from hypemand.images import demo
from tests.api.conftest import SMALL

pytestmark = [pytest.mark.vm, pytest.mark.soak]

CYCLES = 50
WORKLOAD = {
    "entrypoint": ["/bin/sh", "-c"],
    "cmd": ["i=0; while true; do i=$((i+1)); echo $i >/tmp/c.new; mv /tmp/c.new /tmp/count; "
            "sleep 0.05; done"],
}
PREPARE = """set -e
head -c 8388608 /dev/urandom > /dev/shm/data
mkdir -p /data && cp /dev/shm/data /data/copy && sync
"""
FACTS = "cat /tmp/count; cut -d' ' -f1 /proc/uptime; md5sum /dev/shm/data /data/copy | cut -c1-32"


def facts(sdk: Hypeman, instance: str) -> tuple[int, float, list[str]]:
    result = sdk_exec(sdk, instance, ["/bin/sh", "-c", FACTS])
    assert result.exit_code == 0, result
    count, uptime, *hashes = result.output.decode().split()
    return int(count), float(uptime), hashes


def test_fifty_standby_restore_cycles_keep_processes_memory_and_disk(sdk: Hypeman) -> None:
    demo_ready = sdk.images.get(demo.DEMO_NAME)
    assert demo_ready.status == "ready"
    created = sdk.instances.create(name="soak", image=demo.DEMO_NAME, **{**SMALL, **WORKLOAD})  # type: ignore[arg-type]
    assert sdk.instances.wait(created.id, state="Running", api_timeout="120s").state == "Running"
    assert sdk_exec(sdk, created.id, ["/bin/sh", "-c", PREPARE]).exit_code == 0
    count, uptime, hashes = facts(sdk, created.id)
    assert len(set(hashes)) == 1, hashes
    for cycle in range(CYCLES):
        assert sdk.instances.standby(created.id).state == "Standby", cycle
        assert sdk.instances.restore(created.id).state == "Running", cycle
        now_count, now_uptime, now_hashes = facts(sdk, created.id)
        assert now_count >= count, (cycle, count, now_count)
        assert now_uptime >= uptime, (cycle, uptime, now_uptime)  # the same boot, not a new one
        assert now_hashes == hashes, (cycle, hashes, now_hashes)
        count, uptime = now_count, now_uptime
    # The program kept counting across all of it.
    assert count > 0
    sdk.instances.delete(created.id)
