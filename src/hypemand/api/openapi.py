"""The served OpenAPI document (``/openapi.json``), corrected to say what the server answers.

FastAPI documents a 422 ``HTTPValidationError`` on every operation that takes input, but
``errors.py`` answers a request that fails validation with 400 ``{"code": "invalid_request", ...}``,
and it documents none of the other errors the server sends. :func:`install_openapi` post-processes
FastAPI's document, for every operation, the ones added later included:

- every 422 is removed (the server never sends one) and so are the validation schemas;
- 400, 401 and 403 (401/403 only where a token is needed: everywhere but ``/health`` and the
  docs), 404 (operations with path parameters), 409 (operations that change something: not
  GET), 413 (operations with a request body: ``body_limit.py``), 500, and 502 where the
  operation reaches an upstream service, all with the ``Error`` schema, the one error shape of
  ``errors.py``;
- what a route declares itself through FastAPI's ``responses=`` is kept (a declared response
  without a body gets the ``Error`` body, since every error has that shape); a route declares
  an upstream failure with ``responses={502: {"description": ...}}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

ERROR_SCHEMA_NAME = "Error"
ERROR_REF = {"$ref": f"#/components/schemas/{ERROR_SCHEMA_NAME}"}
SECURITY_SCHEME_NAME = "bearerAuth"

# errors.py's shape: {code, message}, with the optional extras Hypeman's own Error carries.
ERROR_SCHEMA: dict[str, Any] = {
    "title": ERROR_SCHEMA_NAME,
    "type": "object",
    "required": ["code", "message"],
    "properties": {
        "code": {"type": "string", "description": "Machine-readable error code"},
        "message": {"type": "string", "description": "What went wrong, for a person"},
        "details": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            },
        },
        "inner_error": {
            "type": "object",
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}

# Operations that reach an upstream service but do not declare it themselves (their route module
# has no ``responses=`` for it). ``POST /images`` resolves the image at its registry before
# answering: an image, tag or platform the registry does not have is a 404, its rate limit a 429,
# an unreachable or failing registry a 502.
UPSTREAM_OPERATIONS: dict[tuple[str, str], dict[str, str]] = {
    ("post", "/images"): {
        "404": "The registry has no such image, tag or platform",
        "429": "The upstream registry's rate limit was exceeded",
        "502": "The upstream registry failed or could not be reached",
    },
}

# Paths served without a token.
PUBLIC_PATHS = frozenset({"/health"})

_STANDARD_ERRORS = {
    "400": "Invalid request (body, parameters or names)",
    "401": "Missing or invalid bearer token",
    "403": "The token lacks the scope this operation needs",
    "404": "Not found",
    "409": "Conflict with the current state",
    "413": "The request body is larger than the server accepts",
    "500": "Internal error",
}
_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options", "trace"})
_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and so ``/openapi.json``) return the corrected document."""
    generate: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        # FastAPI caches the document and regenerates it when routes change; the corrections are
        # idempotent, so applying them to a cached document again changes nothing.
        document = generate()
        _correct(document, public_paths=PUBLIC_PATHS | _docs_paths(app))
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def _docs_paths(app: FastAPI) -> set[str]:
    paths = (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    return {p for p in paths if p}


def _correct(document: dict[str, Any], public_paths: frozenset[str] | set[str]) -> None:
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas[ERROR_SCHEMA_NAME] = ERROR_SCHEMA
    needs_token = False
    for path, path_item in document.get("paths", {}).items():
        for method, operation in path_item.items():
            if method not in _HTTP_METHODS:
                continue
            authenticated = path not in public_paths
            needs_token |= authenticated
            _correct_operation(operation, path, method, authenticated)
    if needs_token:
        components.setdefault("securitySchemes", {})[SECURITY_SCHEME_NAME] = {
            "type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    _drop_unused_validation_schemas(document)


def _correct_operation(operation: dict[str, Any], path: str, method: str, authenticated: bool) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    responses.pop("422", None)
    wanted = ["400", "500"]
    if authenticated:
        wanted += ["401", "403"]
        operation.setdefault("security", [{SECURITY_SCHEME_NAME: []}])
    if re.search(r"{[^}]+}", path):
        wanted.append("404")
    if method != "get":
        wanted.append("409")
    if "requestBody" in operation:
        wanted.append("413")  # body_limit.py
    for code in wanted:
        responses.setdefault(code, {"description": _STANDARD_ERRORS[code]})
    for code, description in UPSTREAM_OPERATIONS.get((method, path), {}).items():
        responses.setdefault(code, {"description": description})
    for code, response in responses.items():
        # A route's own declaration of an error without a body gets the one error body.
        if code[:1] in ("4", "5") and "content" not in response:
            response["content"] = {"application/json": {"schema": dict(ERROR_REF)}}
    operation["responses"] = dict(sorted(responses.items()))


def _drop_unused_validation_schemas(document: dict[str, Any]) -> None:
    schemas = document.get("components", {}).get("schemas", {})
    for name in _VALIDATION_SCHEMAS:
        if name not in schemas:
            continue
        others = {key: value for key, value in schemas.items() if key not in _VALIDATION_SCHEMAS}
        remaining = json.dumps({**document, "components": {**document["components"], "schemas": others}})
        if f'"#/components/schemas/{name}"' not in remaining:
            del schemas[name]
