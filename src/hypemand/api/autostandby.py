"""``/instances/{id}/auto-standby/*``: the auto-standby controller's view of an instance, and a
hold. Thin: the controller (``hypemand.policies.autostandby``) answers."""

from __future__ import annotations

from fastapi import APIRouter, Request

from hypemand.policies.autostandby import AutoStandbyController
from hypemand.policies.models import AutoStandbyStatus

router = APIRouter()


def _controller(request: Request) -> AutoStandbyController:
    controller: AutoStandbyController = request.app.state.runtime.auto_standby
    return controller


@router.get("/instances/{instance_id}/auto-standby/status", response_model=AutoStandbyStatus)
async def auto_standby_status(instance_id: str, request: Request) -> AutoStandbyStatus:
    return await _controller(request).status(instance_id)


@router.post("/instances/{instance_id}/auto-standby/hold", response_model=AutoStandbyStatus)
async def auto_standby_hold(instance_id: str, request: Request) -> AutoStandbyStatus:
    # Body-less: the hold lasts the policy's idle_timeout (policies/README.md).
    return await _controller(request).hold(instance_id)
