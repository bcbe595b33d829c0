"""Generated requests against every operation of the served OpenAPI document of a real server.

Schemathesis reads ``/openapi.json`` of a running `hypemand serve` and generates requests from it:
valid ones (positive) and, for operations that take input, invalid ones (negative). Every answer
must be documented: its status code is in the operation's responses, its body matches the schema
documented for that code, and no answer is a 5xx unless it is a 502 the operation documents (an
upstream registry that cannot be reached). The operations come from the document itself, so the
test grows with every route added; none is skipped (the test fails if schemathesis cannot load or
generate for one).

Bounded: a few examples per operation and mode, no example database, no deadline per example
(the server shares two cores with other suites), and a timeout per request.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from hypemand.api.openapi import install_openapi
from tests.support.harness import ServerProcess

EXAMPLES_PER_MODE = 8
REQUEST_TIMEOUT_SECONDS = 20
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options", "trace"})
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]
# POST /volumes/from-archive takes a raw tar.gz: random bytes, or an empty archive.
EMPTY_TAR_GZ = gzip.compress(bytes(10240))  # an archive's end: two zero blocks, padded to a record
schemathesis.openapi.media_type("application/gzip",
                                st.one_of(st.binary(max_size=2048), st.just(EMPTY_TAR_GZ)))


@pytest.fixture
def document(server: ServerProcess) -> dict[str, Any]:
    response = httpx.get(f"{server.base_url}/openapi.json", timeout=30)
    assert response.status_code == 200
    served: dict[str, Any] = response.json()
    return served


@pytest.fixture
def session(server: ServerProcess) -> Iterator[requests.Session]:
    with requests.Session() as http:
        yield http
    _remove_what_the_fuzzer_created(server)


def _remove_what_the_fuzzer_created(server: ServerProcess) -> None:
    """VMs outlive the server by design, so an instance the fuzzer managed to create is deleted
    here before the server fixture stops the server; images die with the data directory."""
    headers = {"Authorization": f"Bearer {server.token}"}
    listed = httpx.get(f"{server.base_url}/instances", headers=headers, timeout=30)
    if listed.status_code != 200:
        return  # no instances API (yet)
    for instance in listed.json():
        httpx.delete(f"{server.base_url}/instances/{instance['id']}", headers=headers, timeout=120)


def _documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items()
            for method in item if method in HTTP_METHODS}


def _takes_input(operation: APIOperation) -> bool:
    """Negative data needs something to make invalid: a parameter or a body."""
    definition = operation.definition.raw
    return bool(definition.get("parameters") or definition.get("requestBody"))


def test_every_operation_answers_as_documented(server: ServerProcess, document: dict[str, Any],
                                              session: requests.Session) -> None:
    schema = schemathesis.openapi.from_dict(document)
    # ``ok()`` raises when schemathesis cannot use an operation's definition: nothing is dropped.
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == _documented_operations(document)
    assert operations, "the document has no operations"

    started = time.monotonic()
    exercised: list[tuple[str, str, str]] = []
    for operation in operations:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if _takes_input(operation) else [])
        for mode in modes:
            _fuzz(operation, mode, server, document, session)
            exercised.append((operation.method.upper(), operation.path, mode.value))
    assert {(m, p) for m, p, _ in exercised} == _documented_operations(document)
    assert "Traceback" not in server.log(), server.log()[-4000:]
    # Not a correctness check: a guard that the bounds above keep the test short.
    assert time.monotonic() - started < 120, "fuzzing took too long: lower EXAMPLES_PER_MODE"


def _fuzz(operation: APIOperation, mode: GenerationMode, server: ServerProcess, document: dict[str, Any],
          session: requests.Session) -> None:
    documented = document["paths"][operation.path][operation.method.lower()]["responses"]

    @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                     HealthCheck.data_too_large])
    @given(case=operation.as_strategy(generation_mode=mode))
    def answers_as_documented(case: Case) -> None:
        # The server's token on every request: schemathesis generates an Authorization header
        # of its own for the documented bearer scheme, which would only ever be answered 401.
        auth = {"Authorization": f"Bearer {server.token}"}
        response = case.call(base_url=server.base_url, session=session, headers=auth,
                             timeout=REQUEST_TIMEOUT_SECONDS)
        status = response.status_code
        label = f"{operation.method.upper()} {operation.path} ({mode.value}): {status} {response.text[:500]}"
        assert status < 500 or (status == 502 and "502" in documented), label
        case.validate_response(response, checks=CHECKS, headers=auth)

    answers_as_documented()


# -- the document itself ------------------------------------------------------------------------


class ThingBody(BaseModel):
    size: int


class Teapot(BaseModel):
    brew: str


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method, path, operation


def test_the_served_document_documents_the_error_shape(document: dict[str, Any]) -> None:
    """No 422 anywhere (the server answers validation errors 400); every error response of
    every operation is the ``Error`` schema ``{code, message}``."""
    error = document["components"]["schemas"]["Error"]
    assert set(error["required"]) == {"code", "message"}
    assert {"details", "inner_error"} <= set(error["properties"])
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for method, path, operation in _operations(document):
        responses = operation["responses"]
        assert "422" not in responses, (method, path)
        expected = {"400", "500"}
        if path != "/health":
            expected |= {"401", "403"}
        if "{" in path:
            expected.add("404")
        if method != "get":
            expected.add("409")
        assert expected <= set(responses), (method, path, sorted(responses))
        for code, response in responses.items():
            if code[0] in "45":
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, code)
    assert "502" in document["paths"]["/images"]["post"]["responses"]
    assert "502" not in document["paths"]["/images"]["get"]["responses"]


def test_route_declarations_are_kept_and_later_routes_are_corrected() -> None:
    """In-process: a route's own ``responses=`` survive, and a route added after installation
    (FastAPI regenerates the document when routes change) is corrected too."""
    app = FastAPI()
    install_openapi(app)

    @app.post("/things/{thing_id}", responses={
        502: {"description": "the upstream thing store failed"},
        418: {"model": Teapot, "description": "short and stout"},
    })
    async def make(thing_id: str, body: ThingBody) -> dict[str, str]:
        return {}

    first = app.openapi()
    responses = first["paths"]["/things/{thing_id}"]["post"]["responses"]
    assert responses["502"]["description"] == "the upstream thing store failed"
    schema_of = {code: response["content"]["application/json"]["schema"]
                 for code, response in responses.items() if "content" in response}
    assert schema_of["502"] == {"$ref": "#/components/schemas/Error"}
    assert schema_of["418"] == {"$ref": "#/components/schemas/Teapot"}
    assert "422" not in responses and {"400", "401", "403", "404", "409", "500"} <= set(responses)
    assert app.openapi() == first  # applying the corrections again changes nothing

    @app.get("/later")
    async def later(flag: bool = False) -> dict[str, str]:
        return {}

    regenerated = app.openapi()
    later_responses = regenerated["paths"]["/later"]["get"]["responses"]
    assert "422" not in later_responses
    assert {"400", "401", "403", "500"} <= set(later_responses)
    assert "404" not in later_responses and "409" not in later_responses
