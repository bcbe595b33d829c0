"""The OCI distribution push endpoints under ``/v2`` (HTTP only; logic in ``images/uploads.py``).

This path speaks the registry protocol, not the Hypeman API: errors are
``{"errors": [{"code": "BLOB_UNKNOWN", "message": ..., "detail": ...}]}``, every response carries
``Docker-Distribution-Api-Version: registry/2.0`` and a 401 carries a ``WWW-Authenticate``
challenge. Authentication is the API's JWT, sent as a Bearer token, as the Basic password, or
exchanged at ``/v2/token`` by clients that follow the Bearer challenge (docker, skopeo).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from hypemand.api.auth import bearer_token
from hypemand.auth import InvalidToken, verify_token
from hypemand.errors import DomainError
from hypemand.images.media_types import MAX_MANIFEST_BYTES
from hypemand.images.uploads import (
    Chunk,
    RegistryError,
    RegistryService,
    UploadRangeError,
    UploadSession,
    parse_content_range,
    range_header,
    validate_repository,
)

API_VERSION_HEADER = {"Docker-Distribution-Api-Version": "registry/2.0"}
TOKEN_SERVICE = "hypemand"
TOKEN_LIFETIME_SECONDS = 3600


def _oci_error(status: int, code: str, message: str, detail: Any = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        error["detail"] = detail
    return JSONResponse({"errors": [error]}, status_code=status,
                        headers={**API_VERSION_HEADER, **(headers or {})})


def _challenge(request: Request) -> dict[str, str]:
    realm = f"{str(request.base_url).rstrip('/')}/v2/token"
    return {"WWW-Authenticate": f'Bearer realm="{realm}",service="{TOKEN_SERVICE}"'}


class RegistryRoute(APIRoute):
    """Answers every failure on ``/v2`` in the OCI error shape instead of the API's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def registry_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except UploadRangeError as exc:
                return _oci_error(416, exc.code, str(exc), headers={
                    "Range": range_header(exc.size), "Location": request.url.path})
            except RegistryError as exc:
                headers = _challenge(request) if exc.status == 401 else None
                return _oci_error(exc.status, exc.code, str(exc), exc.detail, headers)
            except DomainError as exc:
                return _oci_error(exc.status, exc.code.upper(), str(exc))
            except ClientDisconnect:
                return Response(status_code=400)
            for key, value in API_VERSION_HEADER.items():
                response.headers.setdefault(key, value)
            return response

        return registry_handler


def registry_service(request: Request) -> RegistryService:
    """The runtime's image store, wrapped once per app in the registry's upload/manifest logic."""
    state = request.app.state
    service: RegistryService | None = getattr(state, "registry", None)
    if service is None:
        runtime = state.runtime
        images = getattr(runtime, "images", None)
        if images is None:
            raise RegistryError(503, "UNAVAILABLE", "the image store is not available")
        service = RegistryService(runtime.settings.data_dir / "images", images.blobs, images)
        state.registry = service
    return service


def _verified_claims(request: Request) -> dict[str, Any]:
    token = bearer_token(request)
    if token is None:
        raise RegistryError(401, "UNAUTHORIZED", "authentication required")
    try:
        return verify_token(request.app.state.jwt_secret, token)
    except InvalidToken as exc:
        raise RegistryError(401, "UNAUTHORIZED", f"invalid token: {exc}") from exc


async def require_registry_access(request: Request) -> dict[str, Any]:
    """API tokens may do anything; registry tokens (``repos`` + ``scope`` claims) are limited
    to their repositories, and only ``scope=push`` may write."""
    claims = _verified_claims(request)
    if "repos" in claims:
        repository = request.path_params.get("name")
        allowed = claims.get("repos") or []
        if repository is not None and repository not in allowed:
            raise RegistryError(403, "DENIED", f"token does not grant access to {repository}")
        if request.method not in ("GET", "HEAD") and claims.get("scope") != "push":
            raise RegistryError(403, "DENIED", "token does not grant push access")
    return claims


router = APIRouter(route_class=RegistryRoute, include_in_schema=False)
protected = APIRouter(route_class=RegistryRoute, include_in_schema=False,
                      dependencies=[Depends(require_registry_access)])


@router.get("/v2/token")
async def token(request: Request) -> Response:
    """Token endpoint of the Bearer challenge: the Basic password (an API token) is the token."""
    presented = bearer_token(request)
    if presented is None:
        return _oci_error(401, "UNAUTHORIZED", "send the API token as the Basic password",
                          headers={"WWW-Authenticate": f'Basic realm="{TOKEN_SERVICE}"'})
    claims = _verified_claims(request)
    now = int(time.time())
    expires_in = int(claims["exp"]) - now if "exp" in claims else TOKEN_LIFETIME_SECONDS
    issued_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    return JSONResponse({"token": presented, "access_token": presented,
                         "expires_in": expires_in, "issued_at": issued_at})


@protected.get("/v2/")
async def version_check() -> Response:
    return JSONResponse({})


# -- blob uploads ----------------------------------------------------------------------------


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    return int(value) if value and value.isdigit() else None


def _chunk(request: Request) -> Chunk:
    content_range = request.headers.get("content-range")
    return Chunk(
        body=request.stream(),
        content_range=parse_content_range(content_range) if content_range else None,
        content_length=_content_length(request),
    )


def _upload_location(session: UploadSession) -> str:
    return f"/v2/{session.repository}/blobs/uploads/{session.id}"


def _upload_accepted(session: UploadSession, size: int, status: int = 202) -> Response:
    return Response(status_code=status, headers={
        "Location": _upload_location(session),
        "Range": range_header(size),
        "Docker-Upload-UUID": session.id,
        "Content-Length": "0",
    })


def _blob_created(repository: str, digest: str) -> Response:
    return Response(status_code=201, headers={
        "Location": f"/v2/{repository}/blobs/{digest}",
        "Docker-Content-Digest": digest,
        "Content-Length": "0",
    })


async def _drain(body: AsyncIterator[bytes]) -> None:
    async for _ in body:
        pass


@protected.post("/v2/{name:path}/blobs/uploads/")
@protected.post("/v2/{name:path}/blobs/uploads", include_in_schema=False)
async def start_upload(name: str, request: Request, digest: str | None = None, mount: str | None = None,
                       registry: RegistryService = Depends(registry_service)) -> Response:
    """Start an upload; ``?digest=`` makes it monolithic, ``?mount=`` asks for a cross-repo mount."""
    validate_repository(name)
    if mount is not None:
        await _drain(request.stream())
        mounted_or_new = await registry.mount_or_start(name, mount)
        if mounted_or_new is None:
            return _blob_created(name, mount)
        return _upload_accepted(mounted_or_new, 0)
    session = registry.start_upload(name)
    if digest is not None:
        await registry.complete_upload(session, digest, _chunk(request))
        return _blob_created(name, digest)
    return _upload_accepted(session, 0)


@protected.patch("/v2/{name:path}/blobs/uploads/{upload_id}")
async def upload_chunk(name: str, upload_id: str, request: Request,
                       registry: RegistryService = Depends(registry_service)) -> Response:
    session = registry.get_upload(name, upload_id)
    size = await registry.append_chunk(session, _chunk(request))
    return _upload_accepted(session, size)


@protected.put("/v2/{name:path}/blobs/uploads/{upload_id}")
async def finish_upload(name: str, upload_id: str, request: Request, digest: str | None = None,
                        registry: RegistryService = Depends(registry_service)) -> Response:
    session = registry.get_upload(name, upload_id)
    if digest is None:
        raise RegistryError(400, "DIGEST_INVALID", "the closing PUT needs ?digest=")
    await registry.complete_upload(session, digest, _chunk(request))
    return _blob_created(name, digest)


@protected.get("/v2/{name:path}/blobs/uploads/{upload_id}")
async def upload_status(name: str, upload_id: str,
                        registry: RegistryService = Depends(registry_service)) -> Response:
    session = registry.get_upload(name, upload_id)
    return _upload_accepted(session, await registry.upload_status(session), status=204)


@protected.delete("/v2/{name:path}/blobs/uploads/{upload_id}")
async def cancel_upload(name: str, upload_id: str,
                        registry: RegistryService = Depends(registry_service)) -> Response:
    session = registry.get_upload(name, upload_id)
    await registry.cancel_upload(session)
    return Response(status_code=204)


# -- blobs -----------------------------------------------------------------------------------


@protected.api_route("/v2/{name:path}/blobs/{digest}", methods=["GET", "HEAD"])
async def get_blob(name: str, digest: str, request: Request,
                   registry: RegistryService = Depends(registry_service)) -> Response:
    validate_repository(name)
    path = registry.blob_path(digest)
    headers = {"Docker-Content-Digest": digest}
    if request.method == "HEAD":
        size = path.stat().st_size
        return Response(status_code=200, media_type="application/octet-stream",
                        headers={**headers, "Content-Length": str(size)})
    return FileResponse(path, media_type="application/octet-stream", headers=headers)


# -- manifests -------------------------------------------------------------------------------


async def _read_limited(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise RegistryError(413, "SIZE_INVALID", f"manifest larger than {limit} bytes")
    return bytes(body)


@protected.put("/v2/{name:path}/manifests/{reference}")
async def put_manifest(name: str, reference: str, request: Request,
                       registry: RegistryService = Depends(registry_service)) -> Response:
    body = await _read_limited(request, MAX_MANIFEST_BYTES)
    revision = await registry.put_manifest(name, reference, body, request.headers.get("content-type"))
    return Response(status_code=201, headers={
        "Location": f"/v2/{name}/manifests/{revision.digest}",
        "Docker-Content-Digest": revision.digest,
        "Content-Length": "0",
    })


@protected.api_route("/v2/{name:path}/manifests/{reference}", methods=["GET", "HEAD"])
async def get_manifest(name: str, reference: str, request: Request,
                       registry: RegistryService = Depends(registry_service)) -> Response:
    revision, path = registry.get_manifest(name, reference)
    headers = {"Docker-Content-Digest": revision.digest}
    if request.method == "HEAD":
        return Response(status_code=200, media_type=revision.media_type,
                        headers={**headers, "Content-Length": str(revision.size)})
    return FileResponse(path, media_type=revision.media_type, headers=headers)


@protected.get("/v2/{name:path}/tags/list")
async def list_tags(name: str, n: int | None = None, last: str | None = None,
                    registry: RegistryService = Depends(registry_service)) -> Response:
    tags = [t for t in registry.tags(name) if last is None or t > last]
    headers: dict[str, str] = {}
    if n is not None and len(tags) > n:
        tags = tags[:n]
        headers["Link"] = f'</v2/{name}/tags/list?n={n}&last={tags[-1]}>; rel="next"'
    return JSONResponse({"name": name, "tags": tags}, headers=headers)


@protected.api_route("/v2/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
async def unsupported(rest: str, request: Request) -> Response:
    """Anything else under /v2 (deletes, catalog, unknown paths) in the registry's error shape."""
    if request.method in ("GET", "HEAD"):
        return _oci_error(404, "NAME_UNKNOWN", f"no registry endpoint at /v2/{rest}")
    return _oci_error(405, "UNSUPPORTED", f"{request.method} /v2/{rest} is not supported")


routers = [router, protected]
