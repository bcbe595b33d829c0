"""Snapshot schedules on real VMs through the official SDK in strict mode, on one server whose
shortest interval a test setting lowers to 1 s (see conftest.py): retention keeps the newest
of the schedule's own snapshots and never a client's, the kind follows the instance's state,
the schedule's metadata become the tags, the instance's compression policy holds, bad input is
refused with nothing stored, and a deleted instance's schedule outlives it exactly as long as
its snapshots."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypeman import BadRequestError, Hypeman, NotFoundError

from hypemand.images import demo
from tests.schedules.conftest import SMALL, eventually, run_after, running, scheduled_of
from tests.support.harness import ServerProcess

pytestmark = pytest.mark.vm

ZSTD_1 = {"enabled": True, "algorithm": "zstd", "level": 1}


def expect(error: type[Exception], call: Callable[[], object], *fragments: str) -> dict[str, Any]:
    with pytest.raises(error) as caught:
        call()
    body: dict[str, Any] = caught.value.body  # type: ignore[attr-defined]
    assert set(body) >= {"code", "message"}, body
    for fragment in fragments:
        assert fragment in body["message"], body
    return body


def test_max_count_two_keeps_the_two_newest_of_its_own_and_no_manual_snapshot(sdk: Hypeman) -> None:
    instance = running(sdk, "kept", snapshot_policy={"compression": ZSTD_1})
    manual = sdk.instances.snapshots.create(instance, kind="Standby", name="by-hand", tags={"team": "db"})
    manual_stopped_name = "kept-20000101-000000"  # a client's snapshot named like a scheduled one
    sdk.instances.snapshots.create(instance, kind="Standby", name=manual_stopped_name)
    put = sdk.instances.snapshot_schedule.update(
        instance, interval="2s", retention={"max_count": 2}, name_prefix="kept",
        metadata={"team": "db", "tier": "gold"})
    assert (put.instance_id, put.interval, put.name_prefix) == (instance, "2s", "kept")
    assert put.retention.max_count == 2 and put.retention.max_age is None
    assert put.last_run_at is None and put.last_snapshot_id is None and put.last_error is None
    assert put.next_run_at > put.created_at and put.created_at == put.updated_at

    # Five runs: three of the schedule's snapshots have been deleted by then.
    seen: list[str] = []
    last: datetime | None = None
    while len(seen) < 5:
        schedule = eventually("the schedule's next run", partial(run_after, sdk, instance, last))
        assert schedule.last_error is None, schedule.last_error
        assert schedule.last_snapshot_id is not None
        last = schedule.last_run_at
        if schedule.last_snapshot_id not in seen:
            seen.append(schedule.last_snapshot_id)
    sdk.instances.snapshot_schedule.delete(instance)  # ends the run in flight, then nothing more
    expect(NotFoundError, lambda: sdk.instances.snapshot_schedule.get(instance))

    kept = scheduled_of(sdk, instance, "kept")
    kept = [s for s in kept if s.name != manual_stopped_name]
    assert len(kept) == 2, [(s.name, s.created_at) for s in kept]
    assert seen[-1] in {s.id for s in kept}, "the newest is kept"
    for early in seen[:3]:
        expect(NotFoundError, partial(sdk.snapshots.get, early))
    for snapshot in kept:
        assert snapshot.kind == "Standby"  # the instance was Running
        assert snapshot.tags == {"team": "db", "tier": "gold"}
        assert snapshot.compression is not None and snapshot.compression.enabled  # the policy's
        assert snapshot.compression.algorithm == "zstd" and snapshot.compression.level == 1
    # A client's snapshots are never the schedule's, whatever their tags or names.
    assert sdk.snapshots.get(manual.id).name == "by-hand"
    assert [s.name for s in sdk.snapshots.list(name=manual_stopped_name)] == [manual_stopped_name]
    # The instance ran on through every pause.
    assert sdk.instances.get(instance).state == "Running"
    sdk.instances.delete(instance)
    for snapshot in sdk.snapshots.list(source_instance_id=instance):
        sdk.snapshots.delete(snapshot.id)


def test_a_stopped_instance_gets_stopped_snapshots_and_a_max_age_retention(sdk: Hypeman) -> None:
    instance = running(sdk, "resting")
    sdk.instances.stop(instance)
    sdk.instances.snapshot_schedule.update(instance, interval="1s", retention={"max_age": "1h"},
                                           name_prefix="rest")
    schedule = eventually("a run", lambda: run_after(sdk, instance, None))
    assert schedule.last_error is None and schedule.last_snapshot_id is not None
    snapshot = sdk.snapshots.get(schedule.last_snapshot_id)
    assert snapshot.kind == "Stopped" and snapshot.source_instance_id == instance
    assert snapshot.name is not None and snapshot.name.startswith("rest-")
    assert snapshot.tags is None  # no metadata, no tags
    assert sdk.instances.get(instance).state == "Stopped"  # a snapshot does not start it
    sdk.instances.snapshot_schedule.delete(instance)
    sdk.instances.delete(instance)
    for made in sdk.snapshots.list(source_instance_id=instance):
        sdk.snapshots.delete(made.id)


def test_an_instance_in_standby_gets_standby_snapshots_and_stays_in_standby(sdk: Hypeman) -> None:
    instance = running(sdk, "napping")
    sdk.instances.standby(instance)
    sdk.instances.snapshot_schedule.update(instance, interval="1s", retention={"max_count": 1},
                                           name_prefix="nap")
    schedule = eventually("a run", lambda: run_after(sdk, instance, None))
    assert schedule.last_error is None and schedule.last_snapshot_id is not None
    sdk.instances.snapshot_schedule.delete(instance)
    assert sdk.snapshots.get(schedule.last_snapshot_id).kind == "Standby"
    assert sdk.instances.get(instance).state == "Standby"
    # The instance's own standby is intact: it restores.
    assert sdk.instances.restore(instance).state == "Running"
    sdk.instances.delete(instance)
    for made in sdk.snapshots.list(source_instance_id=instance):
        sdk.snapshots.delete(made.id)


def qemu_of(data: Path, instance: str) -> int:
    """The pid of the QEMU running in the instance's directory."""
    directory = str((data / "guests" / instance).resolve())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv0 = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if b"qemu-system" in argv0 and cwd == directory:
            return int(entry)
    raise AssertionError(f"no QEMU runs for {instance}")


def test_a_run_in_a_state_without_a_snapshot_records_last_error_and_a_later_success_clears_it(
        sdk: Hypeman, api: ServerProcess) -> None:
    """A VMM that does not answer (its QEMU stopped with SIGSTOP, then continued) makes the
    instance Unknown: the run records why, takes nothing; once it answers again, a run succeeds."""
    instance = running(sdk, "frozen")
    qemu = qemu_of(api.data_dir, instance)
    os.kill(qemu, signal.SIGSTOP)
    try:
        eventually("the instance to be Unknown",
                   lambda: True if sdk.instances.get(instance).state == "Unknown" else None)
        sdk.instances.snapshot_schedule.update(instance, interval="1s", retention={"max_count": 1},
                                               name_prefix="frozen")
        failed = eventually("a run", lambda: run_after(sdk, instance, None))
        assert failed.last_error is not None and "invalid state transition" in failed.last_error, failed
        assert "Unknown" in failed.last_error and failed.last_snapshot_id is None
        assert scheduled_of(sdk, instance, "frozen") == []
    finally:
        os.kill(qemu, signal.SIGCONT)
    since = failed.last_run_at

    def succeeded() -> bool | None:
        schedule = run_after(sdk, instance, since)
        return True if schedule is not None and schedule.last_snapshot_id is not None else None

    eventually("a run once the VMM answers", succeeded)
    sdk.instances.snapshot_schedule.delete(instance)
    schedule_file = api.data_dir / "snapshot-schedules" / f"{instance}.json"
    assert not schedule_file.exists()
    made = scheduled_of(sdk, instance, "frozen")
    assert len(made) == 1 and made[0].kind == "Standby"
    sdk.instances.delete(instance)
    sdk.snapshots.delete(made[0].id)


def test_updating_retention_metadata_or_prefix_keeps_the_next_run_a_new_interval_resets_it(
        sdk: Hypeman) -> None:
    instance = running(sdk, "cadence")
    sdk.instances.stop(instance)  # no run happens in this test: its intervals are hours
    first = sdk.instances.snapshot_schedule.update(instance, interval="1h", retention={"max_count": 3})
    same = sdk.instances.snapshot_schedule.update(
        instance, interval="60m", retention={"max_age": "24h"}, name_prefix="night", metadata={"k": "v"})
    assert same.next_run_at == first.next_run_at and same.created_at == first.created_at
    assert same.updated_at > first.updated_at
    assert (same.name_prefix, same.metadata, same.retention.max_age) == ("night", {"k": "v"}, "24h")
    assert same.retention.max_count is None
    got = sdk.instances.snapshot_schedule.get(instance)
    assert got == same
    # By name too, as every instance route.
    assert sdk.instances.snapshot_schedule.get("cadence") == same
    longer = sdk.instances.snapshot_schedule.update(instance, interval="2h", retention={"max_count": 3})
    assert (longer.next_run_at - longer.updated_at).total_seconds() == pytest.approx(7200, abs=1)
    assert longer.next_run_at != first.next_run_at and longer.name_prefix is None and longer.metadata is None
    sdk.instances.delete(instance)


def test_bad_schedules_are_refused_naming_the_field_and_nothing_is_stored(
        sdk: Hypeman, api: ServerProcess) -> None:
    instance = running(sdk, "picky")
    sdk.instances.stop(instance)
    update = sdk.instances.snapshot_schedule.update
    bad: list[tuple[dict[str, Any], str]] = [
        ({"interval": "500ms", "retention": {"max_count": 1}}, "interval"),  # under this server's 1s
        ({"interval": "often", "retention": {"max_count": 1}}, "interval"),
        ({"interval": "0s", "retention": {"max_count": 1}}, "interval"),
        ({"interval": "1h", "retention": {}}, "retention"),
        ({"interval": "1h", "retention": {"max_count": -1}}, "max_count"),
        ({"interval": "1h", "retention": {"max_age": "forever"}}, "max_age"),
        ({"interval": "1h", "retention": {"max_count": 1}, "name_prefix": "Has Spaces"}, "name_prefix"),
        ({"interval": "1h", "retention": {"max_count": 1}, "name_prefix": "p" * 48}, "name_prefix"),
        ({"interval": "1h", "retention": {"max_count": 1}, "metadata": {"k!": "v"}}, "metadata"),
    ]
    for body, field in bad:
        error = expect(BadRequestError, partial(update, instance, **body), field)
        assert error["code"] in ("invalid_request", "bad_request"), error
    # Without retention at all: a raw PUT (the SDK's types will not send one).
    expect(BadRequestError, lambda: sdk.put(f"/instances/{instance}/snapshot-schedule", cast_to=object,
                                            body={"interval": "1h"}), "retention")
    expect(NotFoundError, lambda: sdk.instances.snapshot_schedule.get(instance))
    assert not (api.data_dir / "snapshot-schedules" / f"{instance}.json").exists()
    sdk.instances.delete(instance)


def test_unknown_instances_and_missing_schedules_are_404(sdk: Hypeman, api: ServerProcess) -> None:
    schedules = sdk.instances.snapshot_schedule
    for call in (lambda: schedules.get("nope"),
                 lambda: schedules.update("nope", interval="1h", retention={"max_count": 1}),
                 lambda: schedules.delete("nope")):
        assert expect(NotFoundError, call)["code"] == "not_found"
    instance = sdk.instances.create(name="plain", image=demo.DEMO_NAME, **SMALL)
    expect(NotFoundError, lambda: schedules.get(instance.id), "no snapshot schedule")
    expect(NotFoundError, lambda: schedules.delete(instance.id), "no snapshot schedule")
    # A schedule that made no snapshot goes with its instance.
    schedules.update(instance.id, interval="1h", retention={"max_count": 1})
    file = api.data_dir / "snapshot-schedules" / f"{instance.id}.json"
    assert file.exists()
    sdk.instances.delete(instance.id)
    eventually("the schedule of the deleted instance to go", lambda: True if not file.exists() else None)
    expect(NotFoundError, lambda: schedules.get(instance.id))


def test_a_deleted_instance_s_schedule_stays_until_its_snapshots_are_gone(
        sdk: Hypeman, api: ServerProcess) -> None:
    instance = running(sdk, "doomed")
    manual = sdk.instances.snapshots.create(instance, kind="Standby", name="keepsake")
    sdk.instances.snapshot_schedule.update(instance, interval="1s", retention={"max_count": 5},
                                           name_prefix="doomed")
    eventually("two scheduled snapshots", lambda: scheduled_of(sdk, instance, "doomed")[1:] or None)
    sdk.instances.delete(instance)
    deleted_at = datetime.now(UTC)
    file = api.data_dir / "snapshot-schedules" / f"{instance}.json"

    def stored_run_after_deletion() -> dict[str, Any] | None:
        stored: dict[str, Any] = json.loads(file.read_text())
        last = stored.get("last_run_at")
        return stored if last and datetime.fromisoformat(last) > deleted_at else None

    # It keeps running (its retention only: nothing is snapshotted) while its snapshots exist.
    stored = eventually("a run of the orphaned schedule", stored_run_after_deletion)
    assert "was deleted" in stored["last_error"], stored
    expect(NotFoundError, lambda: sdk.instances.snapshot_schedule.get(instance))
    made = scheduled_of(sdk, instance, "doomed")
    assert len(made) >= 2
    for snapshot in made:
        sdk.snapshots.delete(snapshot.id)
    eventually("the schedule to remove itself", lambda: True if not file.exists() else None)
    # A client's snapshot never held it, and is still there.
    assert sdk.snapshots.get(manual.id).name == "keepsake"
    sdk.snapshots.delete(manual.id)
