"""``/instances/{id}/snapshot-schedule``. Thin: parse, call the scheduler, shape."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from hypemand.policies.schedule_models import SetSnapshotScheduleRequest, SnapshotSchedule
from hypemand.policies.schedules import SnapshotScheduler

router = APIRouter()


def _scheduler(request: Request) -> SnapshotScheduler:
    scheduler: SnapshotScheduler = request.app.state.runtime.schedules
    return scheduler


@router.get("/instances/{instance_id}/snapshot-schedule", response_model=SnapshotSchedule)
async def get_snapshot_schedule(instance_id: str, request: Request) -> SnapshotSchedule:
    return _scheduler(request).get(instance_id)


@router.put("/instances/{instance_id}/snapshot-schedule", response_model=SnapshotSchedule)
async def set_snapshot_schedule(
    instance_id: str, body: SetSnapshotScheduleRequest, request: Request
) -> SnapshotSchedule:
    return await _scheduler(request).set(instance_id, body)


@router.delete("/instances/{instance_id}/snapshot-schedule", status_code=204)
async def delete_snapshot_schedule(instance_id: str, request: Request) -> Response:
    await _scheduler(request).delete(instance_id)
    return Response(status_code=204)
