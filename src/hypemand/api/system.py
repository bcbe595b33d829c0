"""``/capabilities``, ``/resources`` (and its memory reclaim), and the official routes this server
does not offer yet.

Every route of the official clients that no part of this server implements answers 501
``not_implemented`` in the error shape, so a client learns "not here yet" instead of a 404 that
looks like a wrong URL. Routes move out of :data:`UNBUILT_ROUTES` as they are built.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from hypemand.api.errors import ApiError
from hypemand.instances.manager import InstanceManager
from hypemand.instances.resources import Capabilities, Resources, capabilities, resource_inputs, resources
from hypemand.policies.reclaim import MemoryReclaimer
from hypemand.policies.reclaim_plan import MemoryReclaimRequest, MemoryReclaimResponse

router = APIRouter()
unbuilt_router = APIRouter()


def _manager(request: Request) -> InstanceManager:
    manager: InstanceManager = request.app.state.runtime.instances
    return manager


@router.get("/capabilities", response_model=Capabilities)
async def get_capabilities(request: Request) -> Capabilities:
    return capabilities(_manager(request))


@router.get("/resources", response_model=Resources)
async def get_resources(request: Request) -> Resources:
    # The manager's live instances change on the event loop: copy what is needed here, on the
    # loop, and leave only the file system work (sizes, statvfs) to the worker thread.
    return await asyncio.to_thread(resources, resource_inputs(_manager(request)))


@router.post("/resources/memory/reclaim", response_model=MemoryReclaimResponse)
async def reclaim_memory(body: MemoryReclaimRequest, request: Request) -> MemoryReclaimResponse:
    reclaimer: MemoryReclaimer = request.app.state.runtime.memory_reclaim
    return await reclaimer.reclaim(body)


# (method, path) of the official API (hypeman SDK 0.28.0) that nothing here serves yet.
UNBUILT_ROUTES: list[tuple[str, str]] = [
    ("GET", "/devices"),
    ("POST", "/devices"),
    ("GET", "/devices/available"),
    ("GET", "/devices/{id}"),
    ("DELETE", "/devices/{id}"),
    ("GET", "/pushes"),
    ("POST", "/pushes"),
    ("GET", "/pushes/{id}"),
]


async def _not_implemented(request: Request) -> None:
    raise ApiError(
        501, "not_implemented", f"{request.method} {request.url.path} is not implemented by this server yet"
    )


for _method, _path in UNBUILT_ROUTES:
    unbuilt_router.add_api_route(
        _path,
        _not_implemented,
        methods=[_method],
        include_in_schema=False,
        name=f"unbuilt {_method} {_path}",
    )
