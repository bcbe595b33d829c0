"""The OCI distribution push endpoints under ``/v2`` (HTTP only; logic in ``images/uploads.py``).

This path speaks the registry protocol, not the Hypeman API: errors are
``{"errors": [{"code": "BLOB_UNKNOWN", "message": ..., "detail": ...}]}``, every response carries
``Docker-Distribution-Api-Version: registry/2.0`` and a 401 carries a ``WWW-Authenticate``
challenge. Authentication is the API's JWT, sent as a Bearer token, as the Basic password, or
exchanged at ``/v2/token`` by clients that follow the Bearer challenge (docker, skopeo).

Authorization: every route is a *pull* (GET/HEAD of blobs and manifests, the tag list) or a
*push* (anything that writes: uploads, manifest PUT, cross-repository mount). An API token
needs ``image:read`` to pull and ``image:write`` to push, exactly like ``/images`` (a token
without a ``permissions`` claim may do everything); a registry token (claims ``repos``, a list
of exact repository names, and ``scope`` ``pull`` or ``push``) reaches only its repositories,
and only ``scope=push`` writes. Refusals are 403 ``DENIED`` in the registry's error shape.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Literal
from urllib.parse import urlencode

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
    DistributionError,
    RegistryService,
    UploadRangeError,
    UploadSession,
    parse_content_range,
    range_header,
)

API_VERSION_HEADER = {"Docker-Distribution-Api-Version": "registry/2.0"}
TOKEN_SERVICE = "hypemand"
TOKEN_LIFETIME_SECONDS = 3600


def oci_error(status: int, code: str, message: str, detail: Any = None,
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
                return oci_error(416, exc.code, str(exc), headers={
                    "Range": range_header(exc.size), "Location": request.url.path})
            except DistributionError as exc:
                headers = _challenge(request) if exc.status == 401 else None
                return oci_error(exc.status, exc.code, str(exc), exc.detail, headers)
            except DomainError as exc:
                return oci_error(exc.status, exc.code.upper(), str(exc))
            except ClientDisconnect:
                return Response(status_code=400)
            for key, value in API_VERSION_HEADER.items():
                response.headers.setdefault(key, value)
            return response

        return registry_handler


def registry_service(request: Request) -> RegistryService:
    """The image service's registry side (it is started and stopped with the image service)."""
    images = getattr(request.app.state.runtime, "images", None)
    service: RegistryService | None = getattr(images, "push_registry", None)
    if service is None:
        raise DistributionError(503, "UNAVAILABLE", "the image store is not available")
    return service


def _verified_claims(request: Request) -> dict[str, Any]:
    token = bearer_token(request)
    if token is None:
        raise DistributionError(401, "UNAUTHORIZED", "authentication required")
    try:
        return verify_token(request.app.state.jwt_secret, token)
    except InvalidToken as exc:
        raise DistributionError(401, "UNAUTHORIZED", f"invalid token: {exc}") from exc


Action = Literal["pull", "push"]
# The API scope each registry action needs, as on /images (GET needs read, writes need write).
_API_SCOPES: dict[Action, str] = {"pull": "image:read", "push": "image:write"}
# What a registry token's ``scope`` claim allows: a pusher must also read (clients HEAD a blob
# before uploading it).
_REGISTRY_TOKEN_ACTIONS: dict[str, frozenset[Action]] = {
    "pull": frozenset({"pull"}),
    "push": frozenset({"pull", "push"}),
}


def _denied(message: str) -> DistributionError:
    return DistributionError(403, "DENIED", message)


def _check_registry_token(claims: dict[str, Any], repository: str | None, action: Action | None) -> None:
    """``repos`` must be a list of repository names, matched exactly (a string would be
    substring-matched by ``in``: ``"probe/app-long"`` would grant ``probe/app``)."""
    repos = claims.get("repos")
    if not isinstance(repos, list) or not all(isinstance(r, str) for r in repos):
        raise _denied("registry token has a malformed repos claim (expected a list of repository names)")
    if action is None:
        return
    scope = claims.get("scope")
    allowed = _REGISTRY_TOKEN_ACTIONS.get(scope) if isinstance(scope, str) else None
    if allowed is None or action not in allowed:
        raise _denied(f"token does not grant {action} access")
    if repository is None or repository not in repos:
        raise _denied(f"token does not grant access to {repository}")


def _check_api_token(claims: dict[str, Any], action: Action) -> None:
    """No ``permissions`` claim: full access (as on /images). Otherwise it must be a list naming
    the scope or ``*``; anything else grants nothing."""
    needed = _API_SCOPES[action]
    granted = claims.get("permissions")
    if granted is None:
        return
    if not isinstance(granted, list) or not ("*" in granted or needed in granted):
        raise _denied(f"missing required scope: {needed}")


def registry_access(action: Action | None) -> Callable[[Request], Awaitable[dict[str, Any]]]:
    """A dependency: a valid token allowed to ``action`` (``None``: any valid token, for the
    version check and the paths that only answer 404/405) on the route's repository."""

    async def check(request: Request) -> dict[str, Any]:
        claims = _verified_claims(request)
        if "repos" in claims:
            _check_registry_token(claims, request.path_params.get("name"), action)
        elif action is not None:
            _check_api_token(claims, action)
        return claims

    return check


PULL = [Depends(registry_access("pull"))]
PUSH = [Depends(registry_access("push"))]
ANY_TOKEN = [Depends(registry_access(None))]

router = APIRouter(route_class=RegistryRoute, include_in_schema=False)


@router.get("/v2/token")
async def token(request: Request) -> Response:
    """Token endpoint of the Bearer challenge: the Basic password (an API token) is the token."""
    presented = bearer_token(request)
    if presented is None:
        return oci_error(401, "UNAUTHORIZED", "send the API token as the Basic password",
                          headers={"WWW-Authenticate": f'Basic realm="{TOKEN_SERVICE}"'})
    claims = _verified_claims(request)
    now = int(time.time())
    expires_in = int(claims["exp"]) - now if "exp" in claims else TOKEN_LIFETIME_SECONDS
    issued_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    return JSONResponse({"token": presented, "access_token": presented,
                         "expires_in": expires_in, "issued_at": issued_at})


@router.get("/v2/", dependencies=ANY_TOKEN)
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


@router.post("/v2/{name:path}/blobs/uploads/", dependencies=PUSH)
@router.post("/v2/{name:path}/blobs/uploads", dependencies=PUSH)
async def start_upload(name: str, request: Request, digest: str | None = None, mount: str | None = None,
                       registry: RegistryService = Depends(registry_service)) -> Response:
    """Start an upload; ``?digest=`` makes it monolithic, ``?mount=`` asks for a cross-repo mount.

    Names and digests are checked by the service before any upload directory is created.
    """
    if mount is not None:
        await _drain(request.stream())
        mounted_or_new = await registry.mount_or_start(name, mount)
        if mounted_or_new is None:
            return _blob_created(name, mount)
        return _upload_accepted(mounted_or_new, 0)
    if digest is not None:
        await registry.upload_whole_blob(name, digest, _chunk(request))
        return _blob_created(name, digest)
    return _upload_accepted(await registry.start_upload(name), 0)


@router.patch("/v2/{name:path}/blobs/uploads/{upload_id}", dependencies=PUSH)
async def upload_chunk(name: str, upload_id: str, request: Request,
                       registry: RegistryService = Depends(registry_service)) -> Response:
    session = registry.get_upload(name, upload_id)
    size = await registry.append_chunk(session, _chunk(request))
    return _upload_accepted(session, size)


@router.put("/v2/{name:path}/blobs/uploads/{upload_id}", dependencies=PUSH)
async def finish_upload(name: str, upload_id: str, request: Request, digest: str | None = None,
                        registry: RegistryService = Depends(registry_service)) -> Response:
    session = registry.get_upload(name, upload_id)
    if digest is None:
        raise DistributionError(400, "DIGEST_INVALID", "the closing PUT needs ?digest=")
    await registry.complete_upload(session, digest, _chunk(request))
    return _blob_created(name, digest)


@router.get("/v2/{name:path}/blobs/uploads/{upload_id}", dependencies=PUSH)
async def upload_status(name: str, upload_id: str,
                        registry: RegistryService = Depends(registry_service)) -> Response:
    session = registry.get_upload(name, upload_id)
    return _upload_accepted(session, await registry.upload_status(session), status=204)


@router.delete("/v2/{name:path}/blobs/uploads/{upload_id}", dependencies=PUSH)
async def cancel_upload(name: str, upload_id: str,
                        registry: RegistryService = Depends(registry_service)) -> Response:
    session = registry.get_upload(name, upload_id)
    await registry.cancel_upload(session)
    return Response(status_code=204)


# -- blobs -----------------------------------------------------------------------------------


@router.api_route("/v2/{name:path}/blobs/{digest}", methods=["GET", "HEAD"], dependencies=PULL)
async def get_blob(name: str, digest: str, request: Request,
                   registry: RegistryService = Depends(registry_service)) -> Response:
    path = registry.blob_path(name, digest)
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
            raise DistributionError(413, "SIZE_INVALID", f"manifest larger than {limit} bytes")
    return bytes(body)


@router.put("/v2/{name:path}/manifests/{reference}", dependencies=PUSH)
async def put_manifest(name: str, reference: str, request: Request,
                       registry: RegistryService = Depends(registry_service)) -> Response:
    body = await _read_limited(request, MAX_MANIFEST_BYTES)
    revision = await registry.put_manifest(name, reference, body, request.headers.get("content-type"))
    return Response(status_code=201, headers={
        "Location": f"/v2/{name}/manifests/{revision.digest}",
        "Docker-Content-Digest": revision.digest,
        "Content-Length": "0",
    })


@router.api_route("/v2/{name:path}/manifests/{reference}", methods=["GET", "HEAD"], dependencies=PULL)
async def get_manifest(name: str, reference: str, request: Request,
                       registry: RegistryService = Depends(registry_service)) -> Response:
    revision, path = registry.get_manifest(name, reference)
    headers = {"Docker-Content-Digest": revision.digest}
    if request.method == "HEAD":
        return Response(status_code=200, media_type=revision.media_type,
                        headers={**headers, "Content-Length": str(revision.size)})
    return FileResponse(path, media_type=revision.media_type, headers=headers)


def _page_size(n: str | None) -> int | None:
    """``?n=``: a non-negative integer (taken as text: FastAPI would answer a bad one in the API's
    error shape, not the registry's)."""
    if n is None:
        return None
    if not n.isascii() or not n.isdigit():
        raise DistributionError(400, "PAGINATION_NUMBER_INVALID",
                            f"n must be a non-negative integer, not {n!r}", {"n": n})
    return int(n)


@router.get("/v2/{name:path}/tags/list", dependencies=PULL)
async def list_tags(name: str, request: Request, n: str | None = None, last: str | None = None,
                    registry: RegistryService = Depends(registry_service)) -> Response:
    """The OCI distribution spec's paging: tags in lexical order, only those after ``last``, at
    most ``n`` of them (``n=0``: none), and a ``Link`` to the next page when some were left out."""
    page_size = _page_size(n)
    tags = [t for t in registry.tags(name) if last is None or t > last]
    headers: dict[str, str] = {}
    if page_size is not None and len(tags) > page_size:
        tags = tags[:page_size]
        if tags:
            next_page = request.url.path + "?" + urlencode({"n": page_size, "last": tags[-1]})
            headers["Link"] = f'<{next_page}>; rel="next"'
    return JSONResponse({"name": name, "tags": tags}, headers=headers)


@router.api_route("/v2/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
                  dependencies=ANY_TOKEN)
async def unsupported(rest: str, request: Request) -> Response:
    """Anything else under /v2 (deletes, catalog, unknown paths) in the registry's error shape."""
    if request.method in ("GET", "HEAD"):
        return oci_error(404, "NAME_UNKNOWN", f"no registry endpoint at /v2/{rest}")
    return oci_error(405, "UNSUPPORTED", f"{request.method} /v2/{rest} is not supported")


routers = [router]
