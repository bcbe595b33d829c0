"""Request bodies and instance fields a client cannot use to exhaust the server or the guest.

* The body limit at the edge (``api/body_limit.py``), over a real server: a declared length over
  the limit is refused before the body is read; a chunked body is cut off at the limit (the
  server's peak memory shows it); a create at every field limit still fits; registry blob
  uploads are not limited, manifests are, in the registry's shape.
* The instance limits (``instances/models.py``, ``instances/validation.py``), pure: environment
  count, names and sizes, for a create and for an update's merge; argument sizes; the one
  rounding rule for sizes; the minimum memory.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from hypemand.api.limits import MAX_JSON_BODY_BYTES, MAX_MANIFEST_BODY_BYTES
from hypemand.api.openapi import install_openapi
from hypemand.errors import BadRequest
from hypemand.instances.models import (
    MAX_ARGS_TOTAL_BYTES,
    MAX_ENV,
    MAX_ENV_ENTRY_BYTES,
    MAX_ENV_TOTAL_BYTES,
    MAX_EXEC_STRING_BYTES,
    CreateInstanceRequest,
    StartInstanceRequest,
    UpdateInstanceRequest,
)
from hypemand.instances.validation import MIN_MEMORY, merged_env, validate_create
from tests.support.harness import ServerProcess

MiB = 1 << 20


def _headers(server: ServerProcess) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.token}", "Content-Type": "application/json"}


def _peak_rss(server: ServerProcess) -> int:
    """The server's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def _raw_request(server: ServerProcess, head: str, body: bytes = b"", wait: float = 10.0) -> bytes:
    """Send a request head (and maybe part of a body) and read what the server answers within
    ``wait`` seconds, without sending anything more."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as conn:
        conn.sendall(head.encode() + body)
        answer = b""
        deadline = time.monotonic() + wait
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            conn.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                piece = conn.recv(65536)
            except TimeoutError:
                break
            if not piece:
                break
            answer += piece
        return answer


# ---- the body limit, over a real server -----------------------------------------------------------


def test_a_declared_length_over_the_limit_is_413_before_the_body_is_read(server: ServerProcess) -> None:
    """400 MB announced, none of it sent: the answer comes at once, in the API's error shape."""
    head = (f"POST /instances HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {400 * 1000 * 1000}\r\n\r\n")
    answer = _raw_request(server, head, b'{"name": "x", "env": {"A": "')
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b'"code":"too_large"' in answer and b"8MB" in answer, answer


def test_a_client_expecting_100_continue_is_refused_without_sending(server: ServerProcess) -> None:
    head = (f"POST /instances HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {server.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {MAX_JSON_BODY_BYTES + 1}\r\n"
            "Expect: 100-continue\r\n\r\n")
    answer = _raw_request(server, head)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]


def _chunks(total: int, piece: int = MiB) -> Iterator[bytes]:
    yield b'{"name": "big", "image": "x", "env": {"A": "'
    for _ in range(total // piece):
        yield b"a" * piece


def test_a_chunked_body_is_cut_off_at_the_limit(server: ServerProcess) -> None:
    """200 MiB sent without a length: refused with 413, and the server never holds it (its peak
    memory grows by far less than the body)."""
    with httpx.Client(timeout=60) as client:
        client.get(f"{server.base_url}/instances", headers=_headers(server))  # warm up the server
        before = _peak_rss(server)
        response = client.post(f"{server.base_url}/instances", headers=_headers(server),
                               content=_chunks(200 * MiB))
        grown = _peak_rss(server) - before
        assert response.status_code == 413, response.text
        assert response.json()["code"] == "too_large"
        assert grown < 48 * MiB, f"peak memory grew by {grown >> 20} MiB for a refused body"
        # The connection is still good for the next request.
        assert client.get(f"{server.base_url}/instances", headers=_headers(server)).status_code == 200


def test_chunked_bodies_of_body_less_routes_are_cut_off_too(server: ServerProcess) -> None:
    """``start`` reads an optional body itself (``request.body()``): the same limit applies."""
    with httpx.Client(timeout=60) as client:
        response = client.post(f"{server.base_url}/instances/nope/start", headers=_headers(server),
                               content=_chunks(20 * MiB))
    assert response.status_code == 413 and response.json()["code"] == "too_large", response.text


def _largest_valid_create() -> dict[str, Any]:
    """Every size limit of a create at once: 1024 variables filling the environment's budget,
    and arguments filling theirs. Values are non-ASCII, so their JSON is escaped (\\uXXXX)."""
    entry = MAX_ENV_TOTAL_BYTES // MAX_ENV  # bytes per "KEY=VALUE" with its NUL
    env = {f"K{i:04d}": "é" * ((entry - len("K0000=") - 1) // 2) for i in range(MAX_ENV)}
    argument = "a" * (MAX_ARGS_TOTAL_BYTES // 4 - 1)
    # A board this server does not offer: refused (400 invalid_hypervisor) after every field
    # check, before an image is looked for.
    return {"name": "largest", "image": "no-such/image:latest", "hypervisor": "none-such", "env": env,
            "entrypoint": [argument, argument], "cmd": [argument, argument]}


def test_the_largest_valid_create_passes_the_body_limit(server: ServerProcess) -> None:
    fields = _largest_valid_create()
    CreateInstanceRequest.model_validate(fields)  # within every field limit
    body = json.dumps(fields).encode()  # ensure_ascii: every "é" is sent as \u00e9
    assert len(body) > 4 * MiB
    response = httpx.post(f"{server.base_url}/instances", headers=_headers(server), content=body, timeout=60)
    # Past the body limit and the field checks: only the board is refused.
    assert (response.status_code, response.json()["code"]) == (400, "invalid_hypervisor"), response.text[:500]


def test_a_create_past_the_env_limits_is_400_not_413(server: ServerProcess) -> None:
    fields = _largest_valid_create()
    fields["env"]["ONE_MORE"] = "x"
    response = httpx.post(f"{server.base_url}/instances", headers=_headers(server), json=fields, timeout=60)
    assert response.status_code == 400, response.text[:500]
    assert response.json()["code"] == "invalid_request" and "env" in response.json()["message"]


def _blob_upload(server: ServerProcess, data: bytes) -> httpx.Response:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return httpx.post(f"{server.base_url}/v2/limits/app/blobs/uploads/", params={"digest": digest},
                      content=data, headers={"Authorization": f"Bearer {server.token}"}, timeout=120)


def test_registry_blob_uploads_are_not_limited_and_not_held(server: ServerProcess) -> None:
    before = _peak_rss(server)
    data = b"\x5a" * (96 * MiB)
    response = _blob_upload(server, data)
    assert response.status_code == 201, response.text
    grown = _peak_rss(server) - before
    assert grown < 48 * MiB, f"peak memory grew by {grown >> 20} MiB for a streamed upload"


def test_registry_manifests_over_their_cap_are_413_in_the_registry_shape(server: ServerProcess) -> None:
    response = httpx.put(
        f"{server.base_url}/v2/limits/app/manifests/latest",
        content=b" " * (MAX_MANIFEST_BODY_BYTES + 1),
        headers={"Authorization": f"Bearer {server.token}",
                 "Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        timeout=60,
    )
    assert response.status_code == 413, response.text
    assert response.json()["errors"][0]["code"] == "SIZE_INVALID"
    assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


# ---- instance limits, pure ------------------------------------------------------------------------


def test_env_limits_of_a_create() -> None:
    def refused(env: dict[str, str]) -> str:
        with pytest.raises(ValidationError) as info:
            CreateInstanceRequest(name="x", image="i", env=env)
        return str(info.value)

    assert "1024" in refused({f"K{i}": "" for i in range(MAX_ENV + 1)})
    assert "name" in refused({"A=B": "c"})
    long_key = "K" * 10_000_000
    message = refused({long_key + "=": "c"})
    assert "10000001 characters" in message and len(message) < 2000  # the name is not echoed whole
    assert "one may have at most" in refused({"BIG": "v" * MAX_ENV_ENTRY_BYTES})
    CreateInstanceRequest(name="x", image="i", env={"BIG": "v" * (MAX_ENV_ENTRY_BYTES - 4)})
    per_entry = MAX_ENV_ENTRY_BYTES - 100
    too_much = {f"K{i}": "v" * per_entry for i in range(MAX_ENV_TOTAL_BYTES // per_entry + 1)}
    assert f"at most {MAX_ENV_TOTAL_BYTES}" in refused(too_much)


def test_argument_limits_count_entrypoint_and_cmd_together() -> None:
    half = ["a" * (MAX_ARGS_TOTAL_BYTES // 4), "b" * (MAX_ARGS_TOTAL_BYTES // 4)]
    for model in (CreateInstanceRequest, StartInstanceRequest):
        extra = {"name": "x", "image": "i"} if model is CreateInstanceRequest else {}
        model.model_validate({**extra, "entrypoint": half})
        with pytest.raises(ValidationError, match="entrypoint and cmd take"):
            model.model_validate({**extra, "entrypoint": half, "cmd": half})
        model.model_validate({**extra, "cmd": ["c" * MAX_EXEC_STRING_BYTES]})
        with pytest.raises(ValidationError, match="an argument is"):  # execve's one-string limit
            model.model_validate({**extra, "cmd": ["c" * (MAX_EXEC_STRING_BYTES + 1)]})


def test_an_update_is_checked_as_the_merge_it_leaves() -> None:
    """Four updates of 1000 new variables each: each is valid alone, the merge is not."""
    current: dict[str, str] = {}
    for batch in range(4):
        patch = {f"B{batch}_{i}": "v" for i in range(1000)}
        UpdateInstanceRequest(env=patch)  # a single update is within the limits
        if batch == 0:
            current = merged_env(current, patch)
            continue
        with pytest.raises(BadRequest) as info:
            merged_env(current, patch)
        assert info.value.code == "invalid_request" and "1024" in str(info.value)
    assert len(current) == 1000
    # Replacing values keeps the count: allowed, and the patch wins.
    assert merged_env({"A": "1", "B": "2"}, {"A": "3"}) == {"A": "3", "B": "2"}
    big = "v" * (MAX_ENV_ENTRY_BYTES - 10)
    whole = {f"K{i}": big for i in range(MAX_ENV_TOTAL_BYTES // MAX_ENV_ENTRY_BYTES)}
    with pytest.raises(BadRequest, match=f"at most {MAX_ENV_TOTAL_BYTES}"):
        merged_env(whole, {"ONE_MORE": big})


def _shape(**fields: Any) -> Any:
    request = CreateInstanceRequest(name="x", image="i", **fields)
    return validate_create(request, platform="linux/amd64", hotplug_memory=True)


@pytest.mark.parametrize(("given", "stored"), [
    ("200.3MB", 201 * MiB), ("128MB", 128 * MiB), ("1GB", 1024 * MiB), ("134217729", 129 * MiB),
    ("0.5GB", 512 * MiB),
])
def test_sizes_are_rounded_up_to_whole_mib(given: str, stored: int) -> None:
    shape = _shape(size=given, overlay_size=given, hotplug_size=given)
    assert (shape.memory_bytes, shape.overlay_bytes, shape.hotplug_bytes) == (stored, stored, stored)


def test_memory_below_the_bootable_minimum_is_refused_naming_it() -> None:
    with pytest.raises(BadRequest) as info:
        _shape(size=f"{(MIN_MEMORY >> 20) - 1}MB")
    assert info.value.code == "invalid_size" and f"{MIN_MEMORY >> 20}MB" in str(info.value)
    assert _shape(size=f"{(MIN_MEMORY >> 20) - 0.5}MB").memory_bytes == MIN_MEMORY  # rounded up to it


def test_the_openapi_document_declares_the_413_where_a_body_is_taken() -> None:
    app = FastAPI()
    install_openapi(app)

    @app.patch("/things/{thing_id}")
    async def change(thing_id: str, body: UpdateInstanceRequest) -> dict[str, str]:
        return {}

    @app.post("/things/{thing_id}/poke")
    async def poke(thing_id: str) -> dict[str, str]:
        return {}

    paths = app.openapi()["paths"]
    declared = paths["/things/{thing_id}"]["patch"]["responses"]["413"]
    assert declared["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert "413" not in paths["/things/{thing_id}/poke"]["post"]["responses"]
