"""``/snapshots`` and the instance routes that make or use them. Thin: parse, call, shape."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from hypemand.api.query import tag_filter
from hypemand.instances.models import Instance
from hypemand.snapshots.models import (
    CreateSnapshotRequest,
    ForkInstanceRequest,
    ForkSnapshotRequest,
    RestoreSnapshotRequest,
    Snapshot,
    SnapshotKind,
)
from hypemand.snapshots.service import SnapshotService

router = APIRouter()


def _service(request: Request) -> SnapshotService:
    service: SnapshotService = request.app.state.runtime.snapshots
    return service


@router.post("/instances/{instance_id}/snapshots", status_code=201, response_model=Snapshot)
async def create_snapshot(instance_id: str, body: CreateSnapshotRequest, request: Request) -> Snapshot:
    return await _service(request).create(instance_id, body)


@router.post("/instances/{instance_id}/snapshots/{snapshot_id}/restore", response_model=Instance)
async def restore_snapshot(
    instance_id: str, snapshot_id: str, body: RestoreSnapshotRequest, request: Request
) -> Instance:
    return await _service(request).restore(instance_id, snapshot_id, body)


@router.post("/instances/{instance_id}/fork", status_code=201, response_model=Instance)
async def fork_instance(instance_id: str, body: ForkInstanceRequest, request: Request) -> Instance:
    return await _service(request).fork_instance(instance_id, body)


@router.get("/snapshots", response_model=list[Snapshot])
async def list_snapshots(
    request: Request,
    kind: SnapshotKind | None = None,
    name: str | None = None,
    source_instance_id: str | None = None,
) -> list[Snapshot]:
    return _service(request).list(
        kind=kind, name=name, source_instance_id=source_instance_id, tags=tag_filter(request)
    )


@router.get("/snapshots/{snapshot_id}", response_model=Snapshot)
async def get_snapshot(snapshot_id: str, request: Request) -> Snapshot:
    return _service(request).get(snapshot_id)


@router.delete("/snapshots/{snapshot_id}", status_code=204)
async def delete_snapshot(snapshot_id: str, request: Request) -> Response:
    await _service(request).delete(snapshot_id)
    return Response(status_code=204)


@router.post("/snapshots/{snapshot_id}/fork", status_code=201, response_model=Instance)
async def fork_snapshot(snapshot_id: str, body: ForkSnapshotRequest, request: Request) -> Instance:
    return await _service(request).fork(snapshot_id, body)
