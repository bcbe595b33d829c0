"""The HTTP side of ``/builds`` and ``/builders`` without a VM: the real FastAPI app (routers,
auth, body limit, error shape) over real uvicorn on 127.0.0.1, the official SDK in strict mode,
and the build and builder services replaced by small fakes behind the routes' protocols
(``BuildsApi``, ``BuildersApi``). What a build does is the VM tests' (tests/builds); here: the
multipart form and every refusal of it, that the source streams into the service in 1 MiB pieces
(or is spooled when it comes first), the 413 of an oversized source, the SSE framing, the scopes,
and the SDK's body-less prune."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
from hypeman import AsyncHypeman, ConflictError, NotFoundError, PermissionDeniedError

from hypemand.api.app import create_app
from hypemand.api.builders import BuildersApi
from hypemand.api.builds import SOURCE_PIECE_BYTES, BuildsApi
from hypemand.api.limits import MAX_BUILD_FORM_BYTES, MiB
from hypemand.auth import mint_token
from hypemand.builds.builders import BuilderService
from hypemand.builds.models import (
    Build,
    Builder,
    BuilderStatus,
    BuildEvent,
    BuildEventType,
    BuildSpec,
    BuildStatus,
    CreateBuilderRequest,
    SecretRef,
)
from hypemand.builds.service import BuildService
from hypemand.config import Settings
from hypemand.errors import Conflict, NotFound
from hypemand.runtime import Runtime
from tests.api.streams_support import serve_app

SECRET = "builds-api-test-secret-of-at-least-32-bytes"
SOURCE_LIMIT = 3 * MiB
NOW = datetime(2026, 12, 7, 17, 0, tzinfo=UTC)
Parts = list[tuple[str, Any]]  # httpx's multipart parts: (name, (filename, content[, type]))


# ---- the fakes ---------------------------------------------------------------------------------


@dataclass
class Created:
    spec: BuildSpec
    pieces: list[int] = field(default_factory=list)
    source: bytearray = field(default_factory=bytearray)


class FakeBuilds:
    """``BuildsApi``: records each create with the pieces its source came in, as the service
    reads it (a refusal from the source's iterator goes through, as the service lets it)."""

    def __init__(self) -> None:
        self.created: list[Created] = []
        self.first_piece = asyncio.Event()
        self.builds: dict[str, Build] = {
            "done": Build(id="done", created_at=NOW, status=BuildStatus.READY, tags={"team": "a"}),
            "busy": Build(id="busy", created_at=NOW, status=BuildStatus.BUILDING, tags={"team": "b"}),
        }
        self.listed_with: list[dict[str, str] | None] = []
        self.cancelled: list[str] = []
        self.follows_closed = 0

    async def create(self, spec: BuildSpec, source: AsyncIterator[bytes]) -> Build:
        if spec.builder_id == "missing":
            raise NotFound("builder missing not found")
        created = Created(spec)
        self.created.append(created)
        async for piece in source:
            created.pieces.append(len(piece))
            created.source += piece
            self.first_piece.set()
        build = Build(id=f"b{len(self.created)}", created_at=NOW, status=BuildStatus.QUEUED,
                      queue_position=1, tags=spec.tags, builder_id=spec.builder_id)
        self.builds[build.id] = build
        return build

    async def list_builds(self, tags: dict[str, str] | None = None) -> list[Build]:
        self.listed_with.append(tags)
        wanted = (tags or {}).items()
        return [b for b in self.builds.values() if all(b.tags.get(k) == v for k, v in wanted)]

    async def get(self, build_id: str) -> Build:
        if build_id not in self.builds:
            raise NotFound(f"build {build_id} not found")
        return self.builds[build_id]

    async def cancel(self, build_id: str) -> None:
        build = await self.get(build_id)
        if build.status.finished:
            raise Conflict(f"build {build_id} has already ended", code="build_finished")
        self.cancelled.append(build_id)

    async def _events(self, follow: bool) -> AsyncIterator[BuildEvent]:
        yield BuildEvent(timestamp=NOW, type=BuildEventType.STATUS, status=BuildStatus.BUILDING)
        yield BuildEvent(timestamp=NOW, type=BuildEventType.LOG, content='STEP 1/2: FROM "busybox"\n')
        yield BuildEvent(timestamp=NOW, type=BuildEventType.HEARTBEAT)
        if follow:
            try:
                await asyncio.Event().wait()  # until the client leaves
            finally:
                self.follows_closed += 1
        yield BuildEvent(timestamp=NOW, type=BuildEventType.STATUS, status=BuildStatus.READY)

    def events(self, build_id: str, follow: bool) -> AsyncIterator[BuildEvent]:
        if build_id not in self.builds:
            raise NotFound(f"build {build_id} not found")
        return self._events(follow)


class FakeBuilders:
    def __init__(self) -> None:
        self.builders: dict[str, Builder] = {}
        self.listed_with: list[dict[str, str] | None] = []
        self.pruned: list[str] = []

    async def create(self, request: CreateBuilderRequest) -> Builder:
        builder = Builder(id=request.id or f"w{len(self.builders)}", created_at=NOW, name=request.name,
                          disk_size_gb=request.disk_size_gb or 10, status=BuilderStatus.READY,
                          tags=request.tags or {})
        self.builders[builder.id] = builder
        return builder

    async def list_builders(self, tags: dict[str, str] | None = None) -> list[Builder]:
        self.listed_with.append(tags)
        wanted = (tags or {}).items()
        return [b for b in self.builders.values() if all(b.tags.get(k) == v for k, v in wanted)]

    async def get(self, builder_id: str) -> Builder:
        if builder_id not in self.builders:
            raise NotFound(f"builder {builder_id} not found")
        return self.builders[builder_id]

    async def delete(self, builder_id: str) -> None:
        await self.get(builder_id)
        del self.builders[builder_id]

    async def prune(self, builder_id: str) -> Builder:
        builder = await self.get(builder_id)
        self.pruned.append(builder_id)
        return builder.model_copy(update={"status": BuilderStatus.PRUNING})


def _the_real_services_keep_to_the_protocols(builds: BuildService, builders: BuilderService,
                                             ) -> tuple[BuildsApi, BuildersApi]:
    return builds, builders  # mypy checks this: the fakes stand for what the routes really get


# ---- the server --------------------------------------------------------------------------------


@dataclass
class Server:
    base_url: str
    builds: FakeBuilds
    builders: FakeBuilders
    data_dir: Path
    token: str = field(default_factory=lambda: mint_token(SECRET))

    def sdk(self, token: str | None = None) -> AsyncHypeman:
        return AsyncHypeman(base_url=self.base_url, api_key=token or self.token, max_retries=0,
                            _strict_response_validation=True)

    def http(self, token: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=60,
                                 headers={"Authorization": f"Bearer {token or self.token}"})

    @property
    def spooled_files(self) -> list[str]:
        uploads = self.data_dir / "build-uploads"
        return os.listdir(uploads) if uploads.exists() else []


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    settings = Settings(data_dir=tmp_path, system_dir=tmp_path / "system",
                        max_build_source_bytes=SOURCE_LIMIT)
    builds, builders = FakeBuilds(), FakeBuilders()
    _: tuple[BuildsApi, BuildersApi] = (builds, builders)  # the fakes keep to the routes' protocols
    runtime = SimpleNamespace(settings=settings, layout=settings.layout, jwt_secret=SECRET,
                              builds=builds, builders=builders)
    async with serve_app(create_app(settings, cast(Runtime, runtime))) as base_url:
        yield Server(base_url, builds, builders, tmp_path)


def _source(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def _error(response: httpx.Response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    for word in words:
        assert word in body["message"], body


# ---- POST /builds ------------------------------------------------------------------------------


async def test_sdk_create_streams_the_source_to_the_service_with_every_field(server: Server) -> None:
    source = _source(2 * SOURCE_PIECE_BYTES + 12345)
    async with server.sdk() as sdk:
        build = await sdk.builds.create(
            source=("ctx.tar.gz", source, "application/gzip"),
            dockerfile="FROM busybox\nRUN true\n",
            base_image_digest="sha256:" + "a" * 64,
            builder_id="warm",
            cache_scope="tenant-1",
            global_cache_key="python",
            image_name="apps/web:1",
            is_admin_build="true",
            secrets=json.dumps([{"id": "npm_token"}, {"id": "gh.token"}]),
            tags=json.dumps({"team": "backend", "env": "staging"}),
            timeout_seconds=120,
            memory_mb=512,
            cpus=1,
        )
    assert build.status == "queued" and build.queue_position == 1
    assert build.tags == {"team": "backend", "env": "staging"}
    [created] = server.builds.created
    assert created.spec.model_dump() == BuildSpec(
        dockerfile="FROM busybox\nRUN true\n", base_image_digest="sha256:" + "a" * 64, builder_id="warm",
        cache_scope="tenant-1", global_cache_key="python", image_name="apps/web:1", is_admin_build=True,
        secrets=[SecretRef(id="npm_token"), SecretRef(id="gh.token")],
        tags={"team": "backend", "env": "staging"}, timeout_seconds=120, memory_mb=512, cpus=1,
    ).model_dump()
    assert bytes(created.source) == source
    assert created.pieces == [SOURCE_PIECE_BYTES, SOURCE_PIECE_BYTES, 12345]
    assert server.spooled_files == []  # the SDK sends the fields first: streamed, not spooled


async def test_sdk_create_with_only_a_source_takes_the_defaults(server: Server) -> None:
    async with server.sdk() as sdk:
        build = await sdk.builds.create(source=("ctx.tar.gz", b"tarball", "application/gzip"))
    assert build.id == "b1" and build.tags == {}
    [created] = server.builds.created
    assert created.spec == BuildSpec() and bytes(created.source) == b"tarball"


async def test_the_service_reads_the_source_while_it_arrives(server: Server) -> None:
    """The body's second half is sent only once the service has its first piece: a server that
    read the whole form before calling the service would never get it."""
    boundary = "b0undary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="tags"\r\n\r\n{{"k": "v"}}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="source"; filename="ctx.tar.gz"\r\n'
            "Content-Type: application/gzip\r\n\r\n").encode()
    first, second = _source(SOURCE_PIECE_BYTES + 100), _source(5000)

    async def body() -> AsyncIterator[bytes]:
        yield head + first
        await asyncio.wait_for(server.builds.first_piece.wait(), 60)  # fails rather than hangs
        yield second + f"\r\n--{boundary}--\r\n".encode()

    async with server.http() as http:
        response = await http.post("/builds", content=body(),
                                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 202, response.text
    [created] = server.builds.created
    assert bytes(created.source) == first + second and created.spec.tags == {"k": "v"}


async def test_a_source_sent_first_is_spooled_and_built_with_the_fields_after_it(server: Server) -> None:
    source = _source(SOURCE_PIECE_BYTES + 7)
    parts: Parts = [("source", ("ctx.tar.gz", source, "application/gzip")),
             ("tags", (None, b'{"team": "ts"}')), ("cpus", (None, b"3"))]
    async with server.http() as http:
        response = await http.post("/builds", files=parts)
    assert response.status_code == 202, response.text
    [created] = server.builds.created
    assert created.spec.tags == {"team": "ts"} and created.spec.cpus == 3
    assert bytes(created.source) == source and created.pieces == [SOURCE_PIECE_BYTES, 7]
    assert server.spooled_files == []  # the spool had no name, and is gone


async def test_a_field_after_a_streamed_source_is_refused(server: Server) -> None:
    parts: Parts = [("cpus", (None, b"1")), ("source", ("ctx.tar.gz", b"tarball", "application/gzip")),
             ("tags", (None, b'{"a": "b"}'))]
    async with server.http() as http:
        response = await http.post("/builds", files=parts)
    _error(response, 400, "invalid_request", "tags", "after the source")


BAD_FIELDS = [
    ({"timeout_seconds": "abc"}, "timeout_seconds"),
    ({"timeout_seconds": "1.5"}, "timeout_seconds"),
    ({"timeout_seconds": "0"}, "timeout_seconds"),
    ({"timeout_seconds": str(24 * 3600 + 1)}, "timeout_seconds"),
    ({"memory_mb": "255"}, "memory_mb"),
    ({"memory_mb": " 512"}, "memory_mb"),
    ({"cpus": "65"}, "cpus"),
    ({"cpus": "-1"}, "cpus"),
    ({"cpus": "99999999999999999999999"}, "cpus"),
    ({"secrets": "npm_token"}, "secrets"),
    ({"secrets": '{"id": "npm_token"}'}, "secrets"),
    ({"secrets": "[1]"}, "secrets"),
    ({"secrets": '[{"id": "no spaces"}]'}, "secrets"),
    ({"secrets": '[{"id": "a", "mount": "/x"}]'}, "secrets"),
    ({"tags": "team=backend"}, "tags"),
    ({"tags": '["team"]'}, "tags"),
    ({"tags": '{"team": 1}'}, "tags"),
    ({"is_admin_build": "yes"}, "is_admin_build"),
    ({"is_admin_build": ""}, "is_admin_build"),
    ({"colour": "blue"}, "colour"),
    ({"image_name": "app:"}, "image_name"),
    ({"image_name": "app:bad tag!"}, "image_name"),
    ({"image_name": "App/web"}, "image_name"),
    ({"image_name": "localhost:5000/app"}, "image_name"),
    ({"image_name": "hypeman/builder"}, "image_name"),
    ({"image_name": "docker.io/hypeman/builder:latest"}, "image_name"),
    ({"image_name": "a" * 5000}, "image_name"),
    ({"base_image_digest": "sha256:abc"}, "base_image_digest"),
    ({"base_image_digest": "sha256:" + "A" * 64}, "base_image_digest"),
    ({"base_image_digest": "md5:" + "a" * 32}, "base_image_digest"),
    ({"base_image_digest": "busybox:latest"}, "base_image_digest"),
]


@pytest.mark.parametrize(("fields", "named"), BAD_FIELDS)
async def test_a_bad_field_is_a_400_naming_it(server: Server, fields: dict[str, str], named: str) -> None:
    async with server.http() as http:
        response = await http.post("/builds", data=fields,
                                   files={"source": ("ctx.tar.gz", b"tarball", "application/gzip")})
    _error(response, 400, "invalid_request", named)
    assert server.builds.created == []


@pytest.mark.parametrize("named", ["tags", "secrets"])
@pytest.mark.parametrize("source_first", [False, True])
async def test_json_nested_too_deep_is_a_400_naming_the_field(server: Server, named: str,
                                                               source_first: bool) -> None:
    """5000 brackets make ``json.loads`` raise RecursionError, not ValueError: still the field's
    400, answered once the rest of the body (a source of 2 MiB) is read."""
    for opener in ("[", "{\"a\": "):
        field_part = (named, (None, (opener * 5000).encode()))
        source_part = ("source", ("ctx.tar.gz", _source(2 * MiB), "application/gzip"))
        parts: Parts = [source_part, field_part] if source_first else [field_part, source_part]
        async with server.http() as http:
            response = await http.post("/builds", files=parts)
        _error(response, 400, "invalid_request", f"{named}:")
    assert server.builds.created == [] and server.spooled_files == []


async def test_malformed_forms_are_400(server: Server) -> None:
    source: Parts = [("source", ("ctx.tar.gz", b"tarball", "application/gzip"))]
    form = {"Content-Type": "multipart/form-data; boundary=xx"}
    cut = b'--xx\r\nContent-Disposition: form-data; name="source"\r\n\r\npartial'
    nameless = b"--xx\r\nContent-Type: text/plain\r\n\r\nvalue\r\n--xx--\r\n"
    async with server.http() as http:
        _error(await http.post("/builds", files=[("tags", (None, b"{}"))]),
               400, "invalid_request", "source", "required")
        _error(await http.post("/builds", files=[("cpus", (None, b"1")), ("cpus", (None, b"2")), *source]),
               400, "invalid_request", "cpus", "more than once")
        _error(await http.post("/builds", files=source + source),
               400, "invalid_request", "source", "more than once")
        _error(await http.post("/builds", files=[("dockerfile", (None, b"FROM \xff")), *source]),
               400, "invalid_request", "dockerfile", "UTF-8")
        _error(await http.post("/builds", files=[("dockerfile", (None, b"#" * (MiB + 1))), *source]),
               400, "invalid_request", "dockerfile", "longer")
        _error(await http.post("/builds", json={"source": "x"}),
               400, "invalid_request", "multipart/form-data")
        _error(await http.post("/builds", content=cut, headers=form),
               400, "invalid_request", "closing boundary")
        _error(await http.post("/builds", content=nameless, headers=form), 400, "invalid_request", "name")
    assert server.builds.created == []


async def test_a_service_refusal_reaches_the_sdk(server: Server) -> None:
    async with server.sdk() as sdk:
        with pytest.raises(NotFoundError) as raised:
            await sdk.builds.create(source=("ctx.tar.gz", _source(MiB), "application/gzip"),
                                    builder_id="missing")
    assert cast(dict[str, Any], raised.value.body)["code"] == "not_found"


async def test_admin_builds_need_a_token_that_may_administer_builds(server: Server) -> None:
    writer = mint_token(SECRET, permissions=["build:write"])
    admin = mint_token(SECRET, permissions=["build:write", "build:admin"])
    source = ("ctx.tar.gz", b"tarball", "application/gzip")
    async with server.sdk(writer) as sdk:
        with pytest.raises(PermissionDeniedError) as raised:
            await sdk.builds.create(source=source, is_admin_build="true")
        assert "build:admin" in cast(dict[str, Any], raised.value.body)["message"]
        assert server.builds.created == []
        await sdk.builds.create(source=source, is_admin_build="false", global_cache_key="node")
    async with server.sdk(admin) as sdk:
        await sdk.builds.create(source=source, is_admin_build="1")
    assert [c.spec.is_admin_build for c in server.builds.created] == [False, True]


async def test_an_oversized_source_is_413_before_the_service_has_it_whole(server: Server) -> None:
    """Chunked (no length to refuse up front): cut at the limit, streamed or spooled."""
    boundary = "b0undary"
    source_part = (f'--{boundary}\r\nContent-Disposition: form-data; name="source"; filename="c.tgz"\r\n'
                   "\r\n").encode()
    tags_part = f'--{boundary}\r\nContent-Disposition: form-data; name="tags"\r\n\r\n{{}}\r\n'.encode()

    def body(first: bytes) -> Any:
        async def chunks() -> AsyncIterator[bytes]:
            yield first
            for _ in range(4 * SOURCE_LIMIT // (256 << 10)):
                yield bytes(256 << 10)
            yield f"\r\n--{boundary}--\r\n".encode()
        return chunks()

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    async with server.http() as http:
        streamed = await http.post("/builds", content=body(tags_part + source_part), headers=headers)
        _error(streamed, 413, "too_large", "build source")
        [created] = server.builds.created
        assert len(created.source) <= SOURCE_LIMIT
        spooled = await http.post("/builds", content=body(source_part), headers=headers)
        _error(spooled, 413, "too_large", "build source")
    assert len(server.builds.created) == 1 and server.spooled_files == []


async def test_a_declared_length_over_the_limit_is_413_before_anything_is_read(server: Server) -> None:
    host, port = server.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        declared = SOURCE_LIMIT + MAX_BUILD_FORM_BYTES + 1
        writer.write((f"POST /builds HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {server.token}\r\n"
                      f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {declared}\r\n"
                      "\r\n").encode())
        await writer.drain()
        status_line = await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()
    assert status_line.split()[1] == b"413"
    assert server.builds.created == []


# ---- the other build routes --------------------------------------------------------------------


async def test_list_get_and_cancel(server: Server) -> None:
    async with server.sdk() as sdk:
        assert [b.id for b in await sdk.builds.list()] == ["done", "busy"]
        assert [b.id for b in await sdk.builds.list(tags={"team": "b"})] == ["busy"]
        assert server.builds.listed_with == [None, {"team": "b"}]
        assert (await sdk.builds.get("done")).status == "ready"
        with pytest.raises(NotFoundError):
            await sdk.builds.get("nope")
        await sdk.builds.cancel("busy")
        with pytest.raises(ConflictError) as finished:
            await sdk.builds.cancel("done")
        assert cast(dict[str, Any], finished.value.body)["code"] == "build_finished"
        with pytest.raises(NotFoundError):
            await sdk.builds.cancel("nope")
    assert server.builds.cancelled == ["busy"]


async def test_events_are_sse_of_build_event_objects(server: Server) -> None:
    async with server.sdk() as sdk:
        stream = await sdk.builds.events("busy")
        events = [event async for event in stream]
        with pytest.raises(NotFoundError):
            await sdk.builds.events("nope")
    assert [(e.type, e.status, e.content) for e in events] == [
        ("status", "building", None), ("log", None, 'STEP 1/2: FROM "busybox"\n'), ("heartbeat", None, None),
        ("status", "ready", None),
    ]
    async with server.http() as http:
        response = await http.get("/builds/busy/events")
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [frame for frame in response.text.split("\n\n") if frame]
    assert all(frame.startswith("data: {") and "\n" not in frame for frame in frames)
    assert json.loads(frames[2][len("data: "):]) == {"timestamp": "2026-12-07T17:00:00Z", "type": "heartbeat"}


async def test_following_events_ends_when_the_client_leaves(server: Server) -> None:
    async with server.sdk() as sdk:
        stream = await sdk.builds.events("busy", follow=True)
        seen = [await anext(stream.__aiter__()) for _ in range(3)]
        await stream.close()
    assert [e.type for e in seen] == ["status", "log", "heartbeat"]
    for _ in range(200):
        if server.builds.follows_closed:
            break
        await asyncio.sleep(0.05)
    assert server.builds.follows_closed == 1


# ---- /builders ---------------------------------------------------------------------------------


async def test_builders_through_the_sdk(server: Server) -> None:
    async with server.sdk() as sdk:
        made = await sdk.builders.create(id="warm", name="Warm cache", disk_size_gb=5, tags={"team": "a"})
        assert (made.id, made.disk_size_gb, made.status, made.max_concurrency) == ("warm", 5, "ready", 1)
        await sdk.builders.create()
        assert [b.id for b in await sdk.builders.list()] == ["warm", "w1"]
        assert [b.id for b in await sdk.builders.list(tags={"team": "a"})] == ["warm"]
        assert (await sdk.builders.get("warm")).name == "Warm cache"
        pruned = await sdk.builders.prune("warm")  # Content-Type: application/json, empty body
        assert pruned.status == "pruning"
        await sdk.builders.delete("w1")
        with pytest.raises(NotFoundError):
            await sdk.builders.get("w1")
        with pytest.raises(NotFoundError):
            await sdk.builders.prune("w1")
    assert server.builders.pruned == ["warm"] and server.builders.listed_with == [None, {"team": "a"}]
    async with server.http() as http:
        empty = await http.post("/builders/warm/prune", content=b"",
                                headers={"Content-Type": "application/json"})
        assert empty.status_code == 202, empty.text
        _error(await http.post("/builders", json={"disk_size_gb": 0}), 400, "invalid_request", "disk_size_gb")
        _error(await http.post("/builders", json={"id": "../x"}), 400, "invalid_request", "id")
        _error(await http.post("/builders", json={"colour": "blue"}), 400, "invalid_request", "colour")


@pytest.mark.parametrize(("method", "path", "needed"), [
    ("GET", "/builds", "build:read"),
    ("POST", "/builds", "build:write"),
    ("GET", "/builds/done/events", "build:read"),
    ("DELETE", "/builds/busy", "build:delete"),
    ("GET", "/builders", "build:read"),
    ("POST", "/builders/warm/prune", "build:write"),
    ("DELETE", "/builders/warm", "build:delete"),
])
async def test_scopes(server: Server, method: str, path: str, needed: str) -> None:
    every = ("build:read", "build:write", "build:delete", "instance:write")
    others = [scope for scope in every if scope != needed]
    async with server.http(mint_token(SECRET, permissions=others)) as http:
        _error(await http.request(method, path), 403, "Forbidden", needed)
    async with server.http(mint_token(SECRET, permissions=[needed])) as http:
        assert (await http.request(method, path)).status_code != 403
    async with httpx.AsyncClient(base_url=server.base_url) as anonymous:
        assert (await anonymous.request(method, path)).status_code == 401


async def test_the_document_shows_the_form_and_the_stream(server: Server) -> None:
    async with server.http() as http:
        document = (await http.get("/openapi.json")).json()
    create = document["paths"]["/builds"]["post"]
    form = create["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["source"] and form["properties"]["source"]["format"] == "binary"
    assert {"202", "400", "403", "404", "409", "413"} <= set(create["responses"])
    events = document["paths"]["/builds/{build_id}/events"]["get"]["responses"]["200"]["content"]
    assert "text/event-stream" in events
    assert "202" in document["paths"]["/builders/{builder_id}/prune"]["post"]["responses"]
