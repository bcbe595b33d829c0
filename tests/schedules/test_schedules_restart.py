"""Snapshot schedules across server restarts, on real VMs through the strict SDK: a restart keeps
the schedule and its next run; runs missed while the server was down run once at start, not
once per missed interval; a server SIGKILLed while a scheduled snapshot is being taken leaves
no half snapshot, the instance runs on and the schedule goes on.

Each test has its own server (and data directory), started again on the same directory; the
shortest interval is lowered to 1 s by the test-only setting (conftest.py)."""

from __future__ import annotations

import json
import signal
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
from hypeman import Hypeman
from hypeman.lib.exec import exec as sdk_exec

from hypemand.images import demo
from tests.schedules.conftest import PATIENCE, eventually, run_after, running, scheduled_of, start_server
from tests.support.harness import Harness, ServerProcess, strict_client

pytestmark = pytest.mark.vm


def installed(harness: Harness) -> ServerProcess:
    server = start_server(harness)
    demo.install(server.base_url, server.token, wait_seconds=300)
    return server


def schedule_file(server: ServerProcess, instance: str) -> Path:
    return server.data_dir / "snapshot-schedules" / f"{instance}.json"


def test_a_restart_keeps_the_schedule_and_its_next_run(harness: Harness) -> None:
    server = installed(harness)
    with strict_client(server) as sdk:
        instance = running(sdk, "steady")
        sdk.instances.stop(instance)
        before = sdk.instances.snapshot_schedule.update(
            instance, interval="1h", retention={"max_count": 2, "max_age": "72h"}, name_prefix="steady",
            metadata={"env": "test"})
    server.stop()
    server = start_server(harness, server.data_dir)
    with strict_client(server) as sdk:
        assert sdk.instances.snapshot_schedule.get(instance) == before
        assert sdk.snapshots.list(source_instance_id=instance) == []  # nothing was due


def test_runs_missed_while_the_server_was_down_run_once_at_start(harness: Harness) -> None:
    server = installed(harness)
    with strict_client(server) as sdk:
        instance = running(sdk, "sleepy")
        sdk.instances.stop(instance)
        sdk.instances.snapshot_schedule.update(instance, interval="10m", retention={"max_count": 10},
                                               name_prefix="sleepy")
    server.stop()
    # The server was down for six intervals: the schedule was due an hour ago.
    file = schedule_file(server, instance)
    stored = json.loads(file.read_text())
    stored["next_run_at"] = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    file.write_text(json.dumps(stored))
    started = datetime.now(UTC)
    server = start_server(harness, server.data_dir)
    with strict_client(server) as sdk:
        schedule = eventually("the missed run", lambda: run_after(sdk, instance, None))
        assert schedule.last_error is None and schedule.last_run_at is not None
        assert schedule.last_run_at >= started - timedelta(seconds=1)
        # One run, and the next one a whole interval after it: none for the other missed slots.
        assert schedule.next_run_at > datetime.now(UTC)
        assert schedule.next_run_at >= schedule.last_run_at + timedelta(minutes=10)
        made = scheduled_of(sdk, instance, "sleepy")
        assert [s.id for s in made] == [schedule.last_snapshot_id]
        assert made[0].kind == "Stopped"
        # Kept on disk as the API shows it.
        assert json.loads(file.read_text())["last_snapshot_id"] == schedule.last_snapshot_id
    server.stop()

    # As if the server had been killed after that run's snapshot was made, before the run was
    # recorded: the next server records the run from the snapshot instead of running again.
    stored["last_run_at"] = stored["last_snapshot_id"] = stored["last_error"] = None
    file.write_text(json.dumps(stored))
    server = start_server(harness, server.data_dir)
    with strict_client(server) as sdk:
        recovered = sdk.instances.snapshot_schedule.get(instance)
        assert recovered.last_snapshot_id == made[0].id and recovered.last_run_at == made[0].created_at
        assert recovered.next_run_at == made[0].created_at + timedelta(minutes=10)
        assert [s.id for s in scheduled_of(sdk, instance, "sleepy")] == [made[0].id]


# The guest's memory holds this much data (tmpfs): a Standby snapshot's copy takes a moment, so
# that the server can be killed in the middle of one.
FILL_MB = 96
FILL = f"""set -e
head -c 1048576 /dev/urandom > /tmp/seed
i=0; while [ $i -lt {FILL_MB} ]; do cat /tmp/seed; i=$((i+1)); done > /dev/shm/fill
md5sum /dev/shm/fill | cut -c1-32
"""


def unfinished_snapshot(data: Path, inside: str | None = None) -> Path | None:
    """A snapshot directory whose record is not written yet (a snapshot being taken), holding
    ``inside`` (a file of its payload) when given."""
    root = data / "snapshots"
    for directory in root.iterdir() if root.exists() else ():
        if directory.name.startswith(".") or (directory / "snapshot.json").exists():
            continue
        if inside is None or (directory / "guest" / inside).exists():
            return directory
    return None


# Where the kill lands: as the snapshot's directory is made (before the guest pauses), and once
# the guest's device state is saved (paused, its RAM being copied, or just resumed).
PHASES = {"made": None, "state-saved": "vm.state"}


def test_a_server_killed_during_a_scheduled_snapshot_leaves_no_half_snapshot(harness: Harness) -> None:
    server = installed(harness)
    data = server.data_dir
    with strict_client(server) as sdk:
        instance = running(sdk, "busy", size="512MB")
        result = sdk_exec(sdk, instance, ["/bin/sh", "-c", FILL])
        assert result.exit_code == 0, result
        digest = result.output.decode().strip()
        sdk.instances.snapshot_schedule.update(instance, interval="1s", retention={"max_count": 2},
                                               name_prefix="busy")
    for phase, inside in PHASES.items():
        # Poll the data directory for a snapshot being taken, then kill the server at once.
        deadline = time.monotonic() + PATIENCE
        half = None
        while half is None:
            assert time.monotonic() < deadline, f"{phase}: no scheduled snapshot seen in the making"
            half = unfinished_snapshot(data, inside)
            if half is None:
                time.sleep(0.002)  # a poll interval: the kill must land inside a snapshot
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        if (half / "snapshot.json").exists():
            pytest.fail(f"{phase}: the snapshot was finished before the kill landed")
        killed_at = datetime.now(UTC)

        server = start_server(harness, data)
        with strict_client(server) as sdk:
            # The half snapshot is gone, never listed; the instance Running with its memory.
            assert not half.exists(), f"{phase}: {half.name} is still there after the restart"
            assert half.name not in {s.id for s in sdk.snapshots.list()}
            assert sdk.instances.wait(instance, state="Running", api_timeout="60s").state == "Running"
            check = sdk_exec(sdk, instance, ["/bin/sh", "-c", "md5sum /dev/shm/fill | cut -c1-32"])
            assert check.output.decode().strip() == digest, phase
            # The schedule goes on: a whole snapshot after the restart.
            eventually(f"{phase}: a successful run after the restart",
                       partial(_succeeded, sdk, instance, killed_at))

    with strict_client(server) as sdk:
        sdk.instances.snapshot_schedule.delete(instance)  # no run in flight after this
        listed = {s.id for s in sdk.snapshots.list()}
        assert {p.name for p in (data / "snapshots").iterdir()} == listed
        made = scheduled_of(sdk, instance, "busy")
        assert 1 <= len(made) <= 2, made
        # The newest is whole: a fork of it checks every file against its digest and runs.
        fork = sdk.snapshots.fork(made[-1].id, name="busy-copy")
        assert fork.state == "Running", (fork.state, fork.state_error)
        copy = sdk_exec(sdk, fork.id, ["/bin/sh", "-c", "md5sum /dev/shm/fill | cut -c1-32"])
        assert copy.output.decode().strip() == digest


def _succeeded(sdk: Hypeman, instance: str, since: datetime) -> bool | None:
    schedule = run_after(sdk, instance, since)
    if schedule is None or schedule.last_error is not None:
        return None
    return True
