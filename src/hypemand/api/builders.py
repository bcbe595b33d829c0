"""``/builders``: persistent build caches. Thin: parse, call the builder service, shape the
answer. ``POST /builders/{id}/prune`` takes no body; the SDK sends ``Content-Type:
application/json`` with an empty one, which is never read."""

from __future__ import annotations

from typing import Protocol

from fastapi import APIRouter, Request, Response

from hypemand.api.query import tag_filter
from hypemand.builds.models import Builder, CreateBuilderRequest

router = APIRouter()


class BuildersApi(Protocol):
    """What these routes use of ``hypemand.builds.builders.BuilderService``."""

    async def create(self, request: CreateBuilderRequest) -> Builder: ...

    async def list_builders(self, tags: dict[str, str] | None = None) -> list[Builder]: ...

    async def get(self, builder_id: str) -> Builder: ...

    async def delete(self, builder_id: str) -> None: ...

    async def prune(self, builder_id: str) -> Builder: ...


def _service(request: Request) -> BuildersApi:
    service: BuildersApi = request.app.state.runtime.builders
    return service


@router.post("/builders", status_code=201, response_model=Builder)
async def create_builder(body: CreateBuilderRequest, request: Request) -> Builder:
    return await _service(request).create(body)


@router.get("/builders", response_model=list[Builder])
async def list_builders(request: Request) -> list[Builder]:
    return await _service(request).list_builders(tags=tag_filter(request) or None)


@router.get("/builders/{builder_id}", response_model=Builder)
async def get_builder(builder_id: str, request: Request) -> Builder:
    return await _service(request).get(builder_id)


@router.delete("/builders/{builder_id}", status_code=204)
async def delete_builder(builder_id: str, request: Request) -> Response:
    await _service(request).delete(builder_id)
    return Response(status_code=204)


@router.post("/builders/{builder_id}/prune", status_code=202, response_model=Builder)
async def prune_builder(builder_id: str, request: Request) -> Builder:
    return await _service(request).prune(builder_id)
