"""``/ingresses``. Thin: parse, call the IngressService, shape the answer."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from hypemand.api.query import tag_filter
from hypemand.ingress.models import CreateIngressRequest, Ingress
from hypemand.ingress.service import IngressService

router = APIRouter()


def _service(request: Request) -> IngressService:
    service: IngressService = request.app.state.runtime.ingresses
    return service


@router.post("/ingresses", status_code=201, response_model=Ingress)
async def create_ingress(body: CreateIngressRequest, request: Request) -> Ingress:
    return await _service(request).create(body)


@router.get("/ingresses", response_model=list[Ingress])
async def list_ingresses(request: Request) -> list[Ingress]:
    return _service(request).list(tags=tag_filter(request))


@router.get("/ingresses/{ingress_id}", response_model=Ingress)
async def get_ingress(ingress_id: str, request: Request) -> Ingress:
    return _service(request).get(ingress_id)


@router.delete("/ingresses/{ingress_id}", status_code=204)
async def delete_ingress(ingress_id: str, request: Request) -> Response:
    await _service(request).delete(ingress_id)
    return Response(status_code=204)
