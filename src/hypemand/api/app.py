"""The FastAPI application: routing, auth, error shape. Handlers stay thin."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import unquote

from fastapi import APIRouter, Depends, FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from hypemand.api import cp, health, logs, registry
from hypemand.api import exec as exec_routes  # the module's name would hide the builtin
from hypemand.api.auth import require_scope, require_token
from hypemand.api.body_limit import BodyLimit
from hypemand.api.errors import install_error_handlers
from hypemand.api.openapi import install_openapi
from hypemand.config import Settings
from hypemand.runtime import Runtime


class EncodedSlashRouting:
    """Route on the raw path, keeping ``%2F`` inside a segment.

    The SDKs send image names as one percent-encoded segment
    (``/images/docker.io%2Flibrary%2Fnginx:latest``). Starlette decodes ``scope["path"]``
    before routing, which would split that segment; here every escape except ``%2F`` is
    decoded, so the handler receives ``docker.io%2Flibrary%2Fnginx:latest`` and unquotes it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            raw = scope.get("raw_path")
            if raw:
                raw_path = raw.decode("latin-1").split("?", 1)[0]
                pieces = [unquote(p) for p in raw_path.replace("%2f", "%2F").split("%2F")]
                scope = dict(scope, path="%2F".join(pieces))
        await self.app(scope, receive, send)


def create_app(settings: Settings, runtime: Runtime | None = None) -> FastAPI:
    runtime = runtime or Runtime(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    # Response models omit unset optional fields (hypemand.wire); their documented schema is the
    # model itself, so input and output schemas are one.
    app = FastAPI(
        title="hypemand", version="0.1.0", lifespan=lifespan, separate_input_output_schemas=False
    )
    app.state.runtime = runtime
    app.state.jwt_secret = runtime.jwt_secret
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(health.router)
    # /v2 answers in the registry protocol's shape with its own auth (401 needs a challenge).
    for registry_router in registry.routers:
        app.include_router(registry_router)
    for router, resource in _domain_routers():
        check = require_scope(resource) if resource else require_token
        app.include_router(router, dependencies=[Depends(check)])
    # Streams check their own scopes: a router dependency taking a Request breaks WebSockets.
    for stream_router in (logs.router, exec_routes.router, cp.router):
        app.include_router(stream_router)
    app.add_middleware(EncodedSlashRouting)
    # Outermost: a body over its limit is refused before any other layer reads it.
    app.add_middleware(BodyLimit, max_build_source_bytes=settings.max_build_source_bytes)
    return app


def _domain_routers() -> list[tuple[APIRouter, str | None]]:
    """Routers that need a bearer token, with the scope resource each one's routes require
    (``image`` -> ``image:read`` for GET, ``image:delete`` for DELETE, ``image:write`` else)."""
    from hypemand.api import (
        autostandby,
        builders,
        builds,
        images,
        ingresses,
        instances,
        schedules,
        snapshots,
        system,
        volumes,
    )

    return [
        (images.router, "image"),
        (instances.router, "instance"),
        (autostandby.router, "instance"),  # status: read, hold: write
        (snapshots.router, "snapshot"),
        (schedules.router, "snapshot"),  # set: write, get: read, delete: delete
        (ingresses.router, "ingress"),
        (volumes.router, "volume"),
        (builds.router, "build"),  # an admin build also needs build:admin (api/builds.py)
        (builders.router, "build"),
        (system.router, "resource"),
        (system.unbuilt_router, None),  # 501 for any valid token
    ]
