"""``/images`` routes. Thin: parse, call ImageService, shape the answer.

Image names arrive percent-encoded in one path segment (``docker.io%2Flibrary%2Fnginx:latest``);
the app's EncodedSlashRouting keeps ``%2F`` intact for routing and the handlers unquote it.
The ``:path`` converter also accepts names sent with literal slashes.
"""

from __future__ import annotations

from urllib.parse import unquote

from fastapi import APIRouter, Request, Response

from hypemand.api.query import tag_filter
from hypemand.images.models import CreateImageRequest, Image, TagImageRequest
from hypemand.images.service import ImageService

router = APIRouter()


def _service(request: Request) -> ImageService:
    service: ImageService = request.app.state.runtime.images
    return service


@router.post("/images", status_code=202, response_model=Image)
async def create_image(body: CreateImageRequest, request: Request) -> Image:
    return await _service(request).create(body)


@router.get("/images", response_model=list[Image])
async def list_images(request: Request) -> list[Image]:
    return await _service(request).list_images(tag_filter(request))


@router.post("/images/{name:path}/tag", response_model=Image)
async def tag_image(name: str, body: TagImageRequest, request: Request) -> Image:
    return await _service(request).tag(unquote(name), body.target)


@router.get("/images/{name:path}", response_model=Image)
async def get_image(name: str, request: Request) -> Image:
    return await _service(request).get(unquote(name))


@router.delete("/images/{name:path}", status_code=204)
async def delete_image(name: str, request: Request) -> Response:
    await _service(request).delete(unquote(name))
    return Response(status_code=204)
