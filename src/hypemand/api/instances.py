"""``/instances`` routes. Thin: parse, call the InstanceManager, shape the answer."""

from __future__ import annotations

from typing import TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel

from hypemand.api.auth import authorize
from hypemand.api.query import tag_filter
from hypemand.errors import BadRequest
from hypemand.instances.manager import InstanceManager
from hypemand.instances.models import (
    AttachVolumeRequest,
    CreateInstanceRequest,
    Instance,
    InstanceState,
    InstanceStats,
    StandbyInstanceRequest,
    StartInstanceRequest,
    UpdateInstanceRequest,
    WaitForStateResponse,
)
from hypemand.units import UnitError, parse_duration

router = APIRouter()
ModelT = TypeVar("ModelT", bound=BaseModel)


def _manager(request: Request) -> InstanceManager:
    manager: InstanceManager = request.app.state.runtime.instances
    return manager


async def _optional_body(request: Request, model: type[ModelT]) -> ModelT:
    """Body-less POSTs (stop, start without overrides) arrive with ``Content-Type: application/json``
    and an empty body; an empty body means "no options"."""
    raw = await request.body()
    if not raw.strip():
        return model()
    try:
        return model.model_validate_json(raw)
    except ValueError as exc:
        raise BadRequest(f"invalid request body: {exc}", code="invalid_request") from None


@router.post("/instances", status_code=201, response_model=Instance)
async def create_instance(body: CreateInstanceRequest, request: Request) -> Instance:
    return await _manager(request).create(body)


@router.get("/instances", response_model=list[Instance])
async def list_instances(request: Request, state: InstanceState | None = None) -> list[Instance]:
    return await _manager(request).list_instances(state=state, tags=tag_filter(request))


@router.get("/instances/{instance_id}", response_model=Instance)
async def get_instance(instance_id: str, request: Request) -> Instance:
    return await _manager(request).get(instance_id)


@router.patch("/instances/{instance_id}", response_model=Instance)
async def update_instance(instance_id: str, body: UpdateInstanceRequest, request: Request) -> Instance:
    return await _manager(request).update(instance_id, body)


@router.delete("/instances/{instance_id}", status_code=204)
async def delete_instance(instance_id: str, request: Request, graceful_shutdown: bool = False) -> Response:
    await _manager(request).delete(instance_id, graceful=graceful_shutdown)
    return Response(status_code=204)


@router.post("/instances/{instance_id}/stop", response_model=Instance)
async def stop_instance(instance_id: str, request: Request) -> Instance:
    return await _manager(request).stop(instance_id)


@router.post("/instances/{instance_id}/start", response_model=Instance)
async def start_instance(instance_id: str, request: Request) -> Instance:
    body = await _optional_body(request, StartInstanceRequest)
    return await _manager(request).start(instance_id, body)


@router.get("/instances/{instance_id}/wait", response_model=WaitForStateResponse)
async def wait_for_state(
    instance_id: str,
    request: Request,
    state: InstanceState,
    timeout: str = Query("60s", description="Go duration, at most 5m"),  # noqa: ASYNC109 - the API's name
) -> WaitForStateResponse:
    try:
        seconds = parse_duration(timeout)
    except UnitError as exc:
        raise BadRequest(f"timeout: {exc}", code="invalid_request") from None
    return await _manager(request).wait(instance_id, state, seconds)


@router.get("/instances/{instance_id}/stats", response_model=InstanceStats)
async def instance_stats(instance_id: str, request: Request) -> InstanceStats:
    return await _manager(request).stats(instance_id)


@router.post("/instances/{instance_id}/standby", response_model=Instance)
async def standby_instance(instance_id: str, request: Request) -> Instance:
    body = await _optional_body(request, StandbyInstanceRequest)
    return await _manager(request).standby(instance_id, body)


@router.post("/instances/{instance_id}/restore", response_model=Instance)
async def restore_instance(instance_id: str, request: Request) -> Instance:
    return await _manager(request).restore(instance_id)


async def _volume_write(request: Request) -> None:
    """Attaching or detaching a volume also needs ``volume:write`` (as in Hypeman)."""
    authorize(request, "volume:write")


@router.post(
    "/instances/{instance_id}/volumes/{volume_id}",
    response_model=Instance,
    dependencies=[Depends(_volume_write)],
)
async def attach_volume(
    instance_id: str, volume_id: str, body: AttachVolumeRequest, request: Request
) -> Instance:
    return await _manager(request).attach_volume(instance_id, volume_id, body)


@router.delete(
    "/instances/{instance_id}/volumes/{volume_id}",
    response_model=Instance,
    dependencies=[Depends(_volume_write)],
)
async def detach_volume(instance_id: str, volume_id: str, request: Request) -> Instance:
    return await _manager(request).detach_volume(instance_id, volume_id)
