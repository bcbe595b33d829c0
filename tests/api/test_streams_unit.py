"""Streams without a VM: tail reading, line splitting, following across truncation and rotation,
the SSE route, every refusal that happens before a WebSocket upgrade (over real uvicorn and a
real WebSocket client, as the SDK sees them), and that a WebSocket takes exactly the credentials
an HTTP route takes (starlette's TestClient)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import jwt
import pytest
from fastapi import Depends
from hypeman import BadRequestError, ConflictError, Hypeman, NotFoundError
from hypeman.lib.exec import exec as sdk_exec
from starlette.testclient import TestClient, WebSocketDenialResponse
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from hypemand.api import logs
from hypemand.api.auth import require_scope
from hypemand.auth import mint_token
from hypemand.errors import InvalidState
from hypemand.guest.client import AgentClient
from hypemand.instances.logtail import (
    LineSplitter,
    LogFollower,
    LogTail,
    decode_log_line,
    open_log,
    read_tail,
)
from tests.api.streams_support import SECRET, FakeInstances, build_app, serve_app

# --- line splitting ---------------------------------------------------------------------------


def test_splitter_holds_a_partial_line_until_its_newline() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"one\ntw") == ["one"]
    assert splitter.pending == b"tw"
    assert splitter.feed(b"o") == []
    assert splitter.feed(b"\nthree\nfour\n") == ["two", "three", "four"]
    assert splitter.pending == b""


def test_splitter_strips_crlf_and_keeps_empty_lines() -> None:
    assert LineSplitter().feed(b"a\r\n\r\nb\n\n") == ["a", "", "b", ""]


def test_splitter_cuts_an_endless_line() -> None:
    splitter = LineSplitter(max_line_bytes=4)
    assert splitter.feed(b"abcdefghij") == ["abcd", "efgh"]
    assert splitter.feed(b"\n") == ["ij"]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert decode_log_line(b"caf\xe9") == "caf\ufffd"


# --- tail -------------------------------------------------------------------------------------


def _tail(path: Path, count: int, **kwargs: int) -> LogTail:
    with path.open("rb", buffering=0) as file:
        return read_tail(file, count, **kwargs)


def test_tail_returns_the_last_lines(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"".join(f"line {i}\n".encode() for i in range(1000)))
    found = _tail(path, 3)
    assert found.lines == ["line 997", "line 998", "line 999"]
    assert (found.partial, found.partial_offset) == (b"", path.stat().st_size)


@pytest.mark.parametrize("block", [1, 3, 7, 64 * 1024])
def test_tail_is_the_same_for_any_block_size(tmp_path: Path, block: int) -> None:
    path = tmp_path / "log"
    lines = [f"{i}:" + "x" * (i % 13) for i in range(200)]
    path.write_text("\n".join(lines) + "\n")
    for count in (0, 1, 5, 199, 200, 500):
        assert _tail(path, count, block_bytes=block).lines == (lines[-count:] if count else [])


def test_tail_reports_an_unterminated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"a\r\nb\r\npart")
    found = _tail(path, 5)
    assert found.lines == ["a", "b"]
    assert (found.partial, found.partial_offset) == (b"part", 6)


def test_tail_of_empty_and_newline_free_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert _tail(empty, 10) == LogTail([], b"", 0)
    single = tmp_path / "single"
    single.write_bytes(b"no newline")
    assert _tail(single, 10) == LogTail([], b"no newline", 0)


def test_tail_reads_only_the_end_of_a_big_file(tmp_path: Path) -> None:
    """The scan stops at its limit: lines before it are not reached, and a line the limit cuts
    in two is dropped rather than shown as a fragment."""
    path = tmp_path / "big"
    path.write_bytes(b"A" * 1000 + b"\n" + b"".join(b"%04d\n" % i for i in range(100)))
    found = _tail(path, 1000, block_bytes=64, scan_limit=200)
    # 200 bytes hold lines 60-99; line 60 is dropped too: the scan cannot see that it starts there.
    assert found.lines == [f"{i:04d}" for i in range(61, 100)]


def test_tail_reads_backwards_in_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the blocks holding the last lines are read, however big the file is."""
    path = tmp_path / "big"
    with path.open("wb") as file:
        file.truncate(256 << 20)  # sparse: 256 MiB of NUL bytes without a newline
        file.seek(0, os.SEEK_END)
        file.write(b"x\ny\nz\n")
    reads: list[int] = []
    with path.open("rb", buffering=0) as file:
        real_read = file.read
        monkeypatch.setattr(file, "read", lambda n=-1: reads.append(n) or real_read(n), raising=False)
        found = read_tail(file, 2, block_bytes=4096)
    assert found.lines == ["y", "z"]
    assert sum(reads) <= 4096


# --- following --------------------------------------------------------------------------------


def _follower(path: Path, offset: int | None = None) -> LogFollower:
    file = path.open("rb", buffering=0)
    return LogFollower(path, file, path.stat().st_size if offset is None else offset)


def test_follow_sees_appends_and_holds_partial_lines(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"old\n")
    follower = _follower(path)
    try:
        assert follower.read_new() == []
        with path.open("ab") as log:
            log.write(b"new 1\nnew ")
            log.flush()
            assert follower.read_new() == ["new 1"]
            log.write(b"2\r\n")
            log.flush()
            assert follower.read_new() == ["new 2"]
    finally:
        follower.close()


def test_follow_starts_again_after_truncation(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"a long first line\n")
    follower = _follower(path)
    try:
        with path.open("r+b") as log:
            log.truncate(0)
        with path.open("ab") as log:
            log.write(b"after\n")
        assert follower.read_new() == ["after"]
    finally:
        follower.close()


def test_follow_across_rotation_reads_the_old_file_to_its_end(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(b"")
    follower = _follower(path)
    try:
        with path.open("ab") as old:
            old.write(b"before\n")
            old.flush()
            path.rename(tmp_path / "app.log.1")
            assert follower.read_new() == ["before"]  # no successor yet: stay on the old file
            old.write(b"late write to the old file\n")
            old.flush()
            path.write_bytes(b"first of the new file\n")
            assert follower.read_new() == ["late write to the old file"]
            assert follower.read_new() == ["first of the new file"]
    finally:
        follower.close()


def test_follow_reads_a_burst_in_bounded_steps(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"")
    follower = LogFollower(path, path.open("rb", buffering=0), 0, read_limit=100)
    try:
        path.write_bytes(b"".join(b"%09d\n" % i for i in range(50)))  # 500 bytes
        batches = [follower.read_new() for _ in range(6)]
        assert [len(batch) for batch in batches] == [10, 10, 10, 10, 10, 0]
    finally:
        follower.close()


def test_close_during_a_read_is_done_by_the_reader(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"x\n")
    follower = _follower(path, 0)
    entered, release = threading.Event(), threading.Event()
    real_drain = follower._drain

    def slow_drain() -> list[str]:
        entered.set()
        release.wait(5)
        return real_drain()

    follower._drain = slow_drain  # type: ignore[method-assign]
    reader = threading.Thread(target=follower.read_new)
    reader.start()
    assert entered.wait(5)
    follower.close()  # must not block while the reader holds the file
    assert not follower._file.closed
    release.set()
    reader.join(5)
    assert follower._file.closed
    assert follower.read_new() == []


def test_open_log_without_follow_includes_the_partial_line(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"1\n2\n3\npartial")
    assert open_log(path, 2, follow=False) == (["3", "partial"], None)
    assert open_log(path, 0, follow=False) == ([], None)


def test_open_log_with_follow_holds_the_partial_line_until_complete(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(b"1\n2\npart")
    lines, follower = open_log(path, 5, follow=True)
    assert follower is not None
    try:
        assert lines == ["1", "2"]
        assert follower.read_new() == []
        with path.open("ab") as log:
            log.write(b"ial\nnext\n")
        assert follower.read_new() == ["partial", "next"]
    finally:
        follower.close()


# --- over HTTP / WebSocket (no VM) --------------------------------------------------------------


class Server:
    def __init__(self, base_url: str, instances: FakeInstances, log_dir: Path) -> None:
        self.base_url = base_url
        self.instances = instances
        self.log_dir = log_dir
        self.token = mint_token(SECRET)

    def sdk(self, token: str | None = None) -> Hypeman:
        return Hypeman(base_url=self.base_url, api_key=token or self.token, max_retries=0,
                       _strict_response_validation=True)

    def ws_url(self, ref: str, endpoint: str) -> str:
        return f"{self.base_url.replace('http://', 'ws://')}/instances/{ref}/{endpoint}"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    app_log = tmp_path / "app.log"
    app_log.write_bytes(b"boot 1\r\nboot 2\r\nboot 3\r\n")
    instances = FakeInstances(
        states={"stopped-1": "Stopped"},
        logs={"inst-1": {"app": app_log, "vmm": tmp_path / "missing-vmm.log", "hypeman": app_log}},
    )
    async with serve_app(build_app(instances)) as base_url:
        yield Server(base_url, instances, tmp_path)


async def test_logs_tail_over_sse(server: Server) -> None:
    def read() -> list[str]:
        with server.sdk() as sdk:
            return list(sdk.instances.logs("inst-1", tail=2))

    assert await asyncio.to_thread(read) == ["boot 2", "boot 3"]


async def test_logs_follow_streams_appends_and_keepalives(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "KEEPALIVE_SECONDS", 0.3)
    closed: list[LogFollower] = []
    real_close = LogFollower.close

    def recording_close(follower: LogFollower) -> None:
        closed.append(follower)
        real_close(follower)

    monkeypatch.setattr(LogFollower, "close", recording_close)
    app_log = server.log_dir / "app.log"
    url = f"{server.base_url}/instances/inst-1/logs"
    params: dict[str, Any] = {"follow": "true", "tail": 1}
    headers = {"Authorization": f"Bearer {server.token}"}
    async with httpx.AsyncClient(timeout=30) as client, client.stream(
        "GET", url, params=params, headers=headers
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = ""
        appended = False
        chunks = response.aiter_text()
        while "keep-alive" not in received or 'data: "appended \\"quoted\\""' not in received:
            if "boot 3" in received and not appended:
                with app_log.open("ab") as log:
                    log.write(b'appended "quoted"\r\n')
                appended = True
            received += await asyncio.wait_for(anext(chunks), 10)
    # The client went away: the server stops following and closes the file.
    for _ in range(100):
        if closed:
            break
        await asyncio.sleep(0.05)
    assert len(closed) == 1 and closed[0]._closed
    events = [block for block in received.split("\n\n") if block]
    assert events[0] == 'data: "boot 3"'
    assert ": keep-alive" in events
    assert [json.loads(e[6:]) for e in events if e.startswith("data: ")] == ["boot 3", 'appended "quoted"']


async def test_logs_errors_are_json_before_streaming(server: Server) -> None:
    def errors() -> list[tuple[int, Any]]:
        found = []
        with server.sdk() as sdk:
            for call in (
                lambda: sdk.instances.logs("nope"),
                lambda: sdk.instances.logs("inst-1", source="vmm"),
                lambda: sdk.instances.logs("inst-1", source=cast(Any, "kernel")),
                lambda: sdk.instances.logs("inst-1", tail=-1),
            ):
                try:
                    call()
                except (NotFoundError, BadRequestError) as exc:
                    found.append((exc.status_code, cast(dict[str, Any], exc.body)["code"]))
        return found

    assert await asyncio.to_thread(errors) == [
        (404, "not_found"), (404, "log_not_found"), (400, "invalid_request"), (400, "invalid_request")
    ]


async def test_http_routes_need_instance_read(server: Server) -> None:
    reader = mint_token(SECRET, permissions=["instance:read"])
    writer_only = mint_token(SECRET, permissions=["instance:write"])
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        url = "/instances/inst-1/logs"
        assert (await client.get(url)).status_code == 401
        assert (await client.get(url, headers={"Authorization": f"Bearer {reader}"})).status_code == 200
        denied = await client.get(url, headers={"Authorization": f"Bearer {writer_only}"})
        assert denied.status_code == 403
        assert set(denied.json()) == {"code", "message"}


async def test_stat_refuses_a_stopped_instance_and_a_missing_path(server: Server) -> None:
    def conflict() -> Any:
        with server.sdk() as sdk, pytest.raises(ConflictError) as info:
            sdk.instances.stat("stopped-1", path="/etc")
        return info.value.body

    assert cast(dict[str, Any], await asyncio.to_thread(conflict))["code"] == "invalid_state"
    headers = {"Authorization": f"Bearer {server.token}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers) as client:
        missing = await client.get("/instances/inst-1/stat")
    assert missing.status_code == 400 and missing.json()["code"] == "invalid_request"


async def _refusal(url: str, token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, additional_headers=headers):
            pass
    response = info.value.response
    return response.status_code, json.loads(response.body or b"{}")


@pytest.mark.parametrize("endpoint", ["exec", "cp"])
async def test_websockets_refuse_before_the_upgrade(server: Server, endpoint: str) -> None:
    read_only = mint_token(SECRET, permissions=["instance:read"])
    cases = [
        ("stopped-1", server.token, 409, "invalid_state"),
        ("nope", server.token, 404, "not_found"),
        ("stopped-1", None, 401, "unauthorized"),
        ("stopped-1", "not-a-jwt", 401, "unauthorized"),
        ("stopped-1", read_only, 403, "Forbidden"),
    ]
    for ref, token, status, code in cases:
        got_status, body = await _refusal(server.ws_url(ref, endpoint), token)
        assert (got_status, body.get("code")) == (status, code), (ref, token)
        assert set(body) == {"code", "message"}


async def test_sdk_exec_sees_the_409(server: Server) -> None:
    def run() -> int:
        with server.sdk() as sdk, pytest.raises(InvalidStatus) as info:
            sdk_exec(sdk, "stopped-1", ["true"])
        return info.value.response.status_code

    assert await asyncio.to_thread(run) == 409


class _LostAgent:
    """An agent whose connection is gone: exec must ask the manager again, with the wait."""

    connected = False


async def test_exec_waits_for_the_agent_as_asked(server: Server) -> None:
    async def second_call(ref: str, wait_for_agent: float = 0.0) -> AgentClient:
        server.instances.agent_calls.append((ref, wait_for_agent))
        if len(server.instances.agent_calls) == 1:
            return cast(AgentClient, _LostAgent())
        raise InvalidState("instance booting-1 is Initializing")

    server.instances.guest_agent = second_call  # type: ignore[method-assign]

    def run() -> tuple[bytes, int]:
        with server.sdk() as sdk:
            result = sdk_exec(sdk, "booting-1", ["true"], wait_for_agent=7)
        return result.output, result.exit_code

    output, exit_code = await asyncio.to_thread(run)
    assert server.instances.agent_calls == [("booting-1", 0.0), ("booting-1", 7.0)]
    assert (output, exit_code) == (b"Error: instance booting-1 is Initializing\r\n", 127)


async def test_bad_first_frames_get_protocol_errors(server: Server) -> None:
    headers = {"Authorization": f"Bearer {server.token}"}
    server.instances.agents["inst-1"] = cast(AgentClient, _LostAgent())
    async with connect(server.ws_url("inst-1", "exec"), additional_headers=headers) as ws:
        await ws.send(json.dumps({"command": "not-a-list"}))
        assert (await ws.recv()).startswith(b"Error: invalid exec request: command")
        assert json.loads(await ws.recv()) == {"exitCode": 127}
    async with connect(server.ws_url("inst-1", "cp"), additional_headers=headers) as ws:
        await ws.send(json.dumps({"direction": "sideways", "guest_path": "/x"}))
        reply = json.loads(await ws.recv())
        assert reply["type"] == "error" and "direction" in reply["message"]


# --- one credential check for HTTP routes and WebSockets (starlette's TestClient, no VM) -------


def _basic(password: str) -> str:
    """Docker-style: the API token is the Basic password, the user name is ignored."""
    return "Basic " + base64.b64encode(f"someone:{password}".encode()).decode()


def _credentials() -> list[Any]:
    registry_token = jwt.encode({"sub": "builder", "repos": ["app"], "scope": "push"}, SECRET, "HS256")
    string_permissions = mint_token(SECRET, permissions=cast(Any, "instance:write"))
    cases = {
        "bearer": f"Bearer {mint_token(SECRET)}",
        "basic": _basic(mint_token(SECRET)),
        "basic-with-write-scope": _basic(mint_token(SECRET, permissions=["instance:write"])),
        "bearer-star-scope": f"Bearer {mint_token(SECRET, permissions=['*'])}",
        "none": None,
        "bearer-garbage": "Bearer not-a-jwt",
        "bearer-other-secret": f"Bearer {mint_token('another-secret-of-at-least-32-bytes!!')}",
        "basic-garbage": _basic("not-a-jwt"),
        "basic-not-base64": "Basic %%%",
        "basic-without-password": "Basic " + base64.b64encode(b"someone:").decode(),
        "unknown-scheme": f"Token {mint_token(SECRET)}",
        "bearer-read-only": f"Bearer {mint_token(SECRET, permissions=['instance:read'])}",
        "basic-read-only": _basic(mint_token(SECRET, permissions=["instance:read"])),
        "bearer-string-permissions": f"Bearer {string_permissions}",
        "bearer-registry-token": f"Bearer {registry_token}",
    }
    return [pytest.param(header, id=name) for name, header in cases.items()]


@pytest.fixture
def probe_client() -> Iterator[TestClient]:
    """The stream routers plus an HTTP route guarded by ``require_scope("instance")``: a POST,
    so it needs ``instance:write``, the scope the WebSockets need."""
    app = build_app(FakeInstances(agents={"inst-1": cast(AgentClient, _LostAgent())}))

    @app.post("/probe", dependencies=[Depends(require_scope("instance"))])
    async def probe() -> dict[str, bool]:
        return {"admitted": True}

    with TestClient(app) as client:
        yield client


def _websocket_answer(client: TestClient, headers: dict[str, str]) -> tuple[int, Any]:
    """(200, None) once the upgrade is accepted and the route answers; else the refusal."""
    try:
        with client.websocket_connect("/instances/inst-1/cp", headers=headers) as ws:
            ws.send_text(json.dumps({"direction": "sideways", "guest_path": "/x"}))
            assert ws.receive_json()["type"] == "error"  # the cp protocol's answer: admitted
            return 200, None
    except WebSocketDenialResponse as refusal:
        return refusal.status_code, refusal.json()


@pytest.mark.parametrize("authorization", _credentials())
def test_websockets_accept_and_refuse_credentials_as_http_does(
    probe_client: TestClient, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    http = probe_client.post("/probe", headers=headers)
    http_answer = (200, None) if http.status_code == 200 else (http.status_code, http.json())
    assert _websocket_answer(probe_client, headers) == http_answer
    if http.status_code != 200:
        assert http.status_code in (401, 403) and set(http.json()) == {"code", "message"}
