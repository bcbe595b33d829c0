"""``/volumes``. Thin: parse, call the VolumeService, shape the answer.

``POST /volumes/from-archive`` takes its parameters in the query (``name``, ``size_gb``, ``id``,
``tags[k]=v``, as the SDK sends them) and the tar.gz as the raw body, handed to the service as
the request's stream: it is unpacked as it arrives, never held (``body_limit.py`` leaves this
route to the service, which bounds the body by the volume's size).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from hypemand.api.limits import MAX_JSON_BODY_BYTES
from hypemand.api.query import tag_filter
from hypemand.volumes.models import CreateVolumeRequest, Volume
from hypemand.volumes.service import VolumeService, drain

router = APIRouter()

ARCHIVE_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/gzip": {"schema": {"type": "string", "format": "binary"}}}}}


def _service(request: Request) -> VolumeService:
    service: VolumeService = request.app.state.runtime.volumes
    return service


@router.post("/volumes", status_code=201, response_model=Volume)
async def create_volume(body: CreateVolumeRequest, request: Request) -> Volume:
    return await _service(request).create(body)


@router.get("/volumes", response_model=list[Volume])
async def list_volumes(request: Request) -> list[Volume]:
    return await _service(request).list(tags=tag_filter(request))


@router.post("/volumes/from-archive", status_code=201, response_model=Volume, openapi_extra=ARCHIVE_BODY)
async def create_volume_from_archive(request: Request, name: str, size_gb: int,
                                     id: str | None = None) -> Volume:
    try:
        params = CreateVolumeRequest(name=name, size_gb=size_gb, id=id, tags=tag_filter(request) or None)
    except ValidationError as exc:
        await drain(request.stream(), MAX_JSON_BODY_BYTES)  # so that the client hears why
        raise RequestValidationError(exc.errors()) from None
    return await _service(request).create_from_archive(params, request.stream())


@router.get("/volumes/{volume_id}", response_model=Volume)
async def get_volume(volume_id: str, request: Request) -> Volume:
    return await _service(request).get(volume_id)


@router.delete("/volumes/{volume_id}", status_code=204)
async def delete_volume(volume_id: str, request: Request) -> Response:
    await _service(request).delete(volume_id)
    return Response(status_code=204)
