"""``snapshot-schedules/<instance id>.json``: one file per schedule, written atomically (temp,
fsync, rename). Every function blocks: call them through ``asyncio.to_thread``."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import ValidationError

from hypemand.fsutil import fsync_dir, write_model_atomic
from hypemand.layout import DataLayout
from hypemand.policies.schedule_models import SnapshotSchedule

log = logging.getLogger(__name__)


class ScheduleStore:
    def __init__(self, layout: DataLayout) -> None:
        self.layout = layout

    def load_all(self) -> list[SnapshotSchedule]:
        """Every stored schedule. A file that cannot be read is damage from outside (writes are
        atomic): it is left alone, named in the log."""
        directory = self.layout.snapshot_schedules
        directory.mkdir(parents=True, exist_ok=True)
        found = []
        for path in sorted(directory.glob("*.json")):
            try:
                schedule = SnapshotSchedule.model_validate_json(path.read_bytes())
            except (OSError, ValidationError) as exc:
                log.warning("snapshot schedule %s is unreadable, leaving it alone: %s", path.name, exc)
                continue
            if path != self.layout.snapshot_schedule(schedule.instance_id):
                log.warning("snapshot schedule %s names instance %s, leaving it alone",
                            path.name, schedule.instance_id)
                continue
            found.append(schedule)
        return found

    def save(self, schedule: SnapshotSchedule) -> None:
        write_model_atomic(self.layout.snapshot_schedule(schedule.instance_id), schedule)

    def remove(self, instance_id: str) -> None:
        path: Path = self.layout.snapshot_schedule(instance_id)
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
