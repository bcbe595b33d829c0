"""Hostile first frames and paths on the exec, cp and stat routes, without a VM: each is refused
at the edge (a 400, or the protocol's error frame: ``Error: ...`` + exit 127 for exec, a
``{"type": "error"}`` frame for cp) before the guest agent is asked, and the official SDK sees
that error rather than a dropped connection or a hang.

The agent is a stand-in that builds every request with the guest protocol's own encoders
(``hypemand.guest.protocol``), as the real client does: a request the edge let through that the
protocol cannot carry fails here as it would against a guest.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest
from hypeman import BadRequestError, Hypeman
from hypeman.lib.cp import CopyProtocolError, cp_from_instance, cp_to_instance
from hypeman.lib.exec import exec as sdk_exec
from websockets.asyncio.client import connect

from hypemand.api.exec import ExecRequest
from hypemand.api.limits import (
    MAX_AGENT_PAYLOAD_BYTES,
    MAX_EXEC_TIMEOUT_SECONDS,
    MAX_GUEST_ID,
    MAX_GUEST_PATH_BYTES,
    exec_request_bytes,
    summary,
)
from hypemand.auth import mint_token
from hypemand.guest import protocol
from hypemand.guest.client import AgentClient
from hypemand.guest.models import ExecResult, OutputChunk, PathInfo
from tests.api.streams_support import SECRET, FakeInstances, build_app, serve_app

INSTANCE = "inst-1"
T = TypeVar("T")


class _FinishedProcess:
    """An exec session whose process printed nothing and exited 0."""

    result: ExecResult | None = None

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self._none()

    async def _none(self) -> AsyncIterator[OutputChunk]:
        return
        yield  # an empty async generator

    async def wait(self) -> ExecResult:
        self.result = ExecResult(exit_code=0)
        return self.result

    async def write_stdin(self, data: bytes) -> None:
        pass

    async def resize(self, rows: int, cols: int) -> None:
        pass

    async def kill(self) -> None:
        pass


class EncodingAgent:
    """The agent calls the routes make, each encoded with the guest protocol as the real client
    encodes it (so an oversized or malformed request raises as it would there), then answered
    without a guest."""

    connected = True

    def __init__(self) -> None:
        self.requests: list[bytes] = []

    async def exec(self, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
                   tty: bool = False, rows: int = 24, cols: int = 80,
                   timeout: float | None = None,  # noqa: ASYNC109 - the agent client's signature
                   merge_stderr: bool = False) -> _FinishedProcess:
        timeout_ms = 0 if timeout is None else max(1, int(timeout * 1000))
        self.requests.append(protocol.exec_request(1, argv, env, cwd or "", tty, rows, cols, timeout_ms,
                                                   merge_stderr))
        return _FinishedProcess()

    async def put_file(self, guest_path: str, source: AsyncIterable[bytes], mode: int = 0o644,
                       uid: int | None = None, gid: int | None = None) -> int:
        self.requests.append(protocol.put_request(1, guest_path, mode, uid, gid, None))
        return sum([len(chunk) async for chunk in source])

    async def mkdir(self, guest_path: str, mode: int = 0o755, uid: int | None = None,
                    gid: int | None = None) -> None:
        self.requests.append(protocol.mkdir_request(1, guest_path, mode, uid, gid, None, True))

    async def stat(self, guest_path: str, follow_links: bool = False) -> PathInfo:
        self.requests.append(protocol.stat_request(1, guest_path, follow_links))
        return PathInfo(exists=False)

    async def get(self, guest_path: str, follow_links: bool = False) -> AsyncIterator[Any]:
        self.requests.append(protocol.get_request(1, guest_path, follow_links, True))
        return
        yield  # nothing to copy


class Server:
    def __init__(self, base_url: str, agent: EncodingAgent) -> None:
        self.base_url = base_url
        self.agent = agent
        self.token = mint_token(SECRET)
        self.headers = {"Authorization": f"Bearer {self.token}"}

    def sdk(self) -> Hypeman:
        return Hypeman(base_url=self.base_url, api_key=self.token, max_retries=0,
                       _strict_response_validation=True)

    async def call(self, work: Callable[[Hypeman], T]) -> T:
        """A sync SDK call in a thread: the server runs on this test's event loop."""

        def run() -> T:
            with self.sdk() as sdk:
                return work(sdk)

        return await asyncio.to_thread(run)

    def ws_url(self, endpoint: str) -> str:
        return f"{self.base_url.replace('http://', 'ws://')}/instances/{INSTANCE}/{endpoint}"


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    agent = EncodingAgent()
    instances = FakeInstances(agents={INSTANCE: cast(AgentClient, agent)})
    async with serve_app(build_app(instances)) as base_url:
        yield Server(base_url, agent)


def _refused_exec(result: Any) -> str:
    """The exec protocol's refusal: ``Error: invalid exec request: ...`` and exit code 127."""
    assert result.exit_code == 127, result
    text = cast(bytes, result.output).decode()
    assert text.startswith("Error: invalid exec request: "), text
    return text


# ---- exec ----------------------------------------------------------------------------------------


async def test_exec_over_one_agent_frame_is_refused(server: Server) -> None:
    big = "x" * MAX_AGENT_PAYLOAD_BYTES
    result = await server.call(lambda sdk: sdk_exec(sdk, INSTANCE, ["echo", big]))
    assert f"at most {MAX_AGENT_PAYLOAD_BYTES}" in _refused_exec(result)
    assert server.agent.requests == []


async def test_exec_at_exactly_one_agent_frame_reaches_the_agent(server: Server) -> None:
    """The limit is the protocol's, not a guess: the largest request that fits is sent."""
    fixed = exec_request_bytes(["echo", ""], {}, "")
    command = ["echo", "y" * (MAX_AGENT_PAYLOAD_BYTES - fixed)]
    result = await server.call(lambda sdk: sdk_exec(sdk, INSTANCE, command))
    assert (result.output, result.exit_code) == (b"", 0)
    assert len(server.agent.requests[0]) == protocol.HEADER.size + MAX_AGENT_PAYLOAD_BYTES


async def test_exec_with_more_than_65535_arguments_is_refused(server: Server) -> None:
    command = ["true", *[""] * 65535]
    result = await server.call(lambda sdk: sdk_exec(sdk, INSTANCE, command))
    assert "65535" in _refused_exec(result)
    assert server.agent.requests == []


@pytest.mark.parametrize("seconds", [1e308, MAX_EXEC_TIMEOUT_SECONDS + 1, -1])
async def test_exec_timeout_out_of_the_protocols_range_is_refused(server: Server, seconds: float) -> None:
    async with connect(server.ws_url("exec"), additional_headers=server.headers) as ws:
        await ws.send(json.dumps({"command": ["true"], "timeout": seconds}))
        text = cast(bytes, await ws.recv()).decode()
        assert text.startswith("Error: invalid exec request: timeout"), text
        assert json.loads(await ws.recv()) == {"exitCode": 127}
    assert server.agent.requests == []


async def test_exec_longest_timeout_reaches_the_agent(server: Server) -> None:
    longest = MAX_EXEC_TIMEOUT_SECONDS
    result = await server.call(lambda sdk: sdk_exec(sdk, INSTANCE, ["true"], timeout=longest))
    assert result.exit_code == 0 and len(server.agent.requests) == 1


@pytest.mark.parametrize("env", [{"A=B": "c"}, {"": "x"}, {"A\x00": "x"}, {"A": "x\x00"}], ids=repr)
async def test_exec_env_the_guest_cannot_set_is_refused(server: Server, env: dict[str, str]) -> None:
    result = await server.call(lambda sdk: sdk_exec(sdk, INSTANCE, ["true"], env=env))
    assert "env" in _refused_exec(result)
    assert server.agent.requests == []


@pytest.mark.parametrize("cwd", ["/tmp\x00x", "/" + "d" * MAX_GUEST_PATH_BYTES])
async def test_exec_cwd_the_guest_cannot_take_is_refused(server: Server, cwd: str) -> None:
    result = await server.call(lambda sdk: sdk_exec(sdk, INSTANCE, ["true"], cwd=cwd))
    assert "cwd" in _refused_exec(result)


async def test_exec_argument_with_a_nul_byte_is_refused(server: Server) -> None:
    result = await server.call(lambda sdk: sdk_exec(sdk, INSTANCE, ["echo", "a\x00b"]))
    assert "NUL" in _refused_exec(result)


def test_exec_request_size_is_the_protocols() -> None:
    """``exec_request_bytes`` counts what ``protocol.exec_request`` encodes."""
    cases = [(["true"], {}, ""), (["echo", "é", "\U0001f600"], {"K": "v", "LANG": "C.UTF-8"}, "/tmp")]
    for command, env, cwd in cases:
        request = ExecRequest(command=command, env=env, cwd=cwd)
        encoded = protocol.exec_request(1, request.command, request.env, request.cwd)
        assert exec_request_bytes(command, env, cwd) == len(encoded) - protocol.HEADER.size


# ---- cp and stat ---------------------------------------------------------------------------------


async def test_stat_of_a_path_with_a_nul_byte_is_400(server: Server) -> None:
    def stat() -> Any:
        with server.sdk() as sdk, pytest.raises(BadRequestError) as info:
            sdk.instances.stat(INSTANCE, path="/etc\x00passwd")
        return info.value.body

    body = cast(dict[str, Any], await asyncio.to_thread(stat))
    assert body["code"] == "invalid_request" and "path" in body["message"] and "NUL" in body["message"]
    async with httpx.AsyncClient(base_url=server.base_url, headers=server.headers) as client:
        path = "/" + "p" * MAX_GUEST_PATH_BYTES
        too_long = await client.get(f"/instances/{INSTANCE}/stat", params={"path": path})
    assert too_long.status_code == 400 and too_long.json()["code"] == "invalid_request"
    assert server.agent.requests == []


async def test_cp_from_a_path_with_a_nul_byte_is_an_error_frame(server: Server, tmp_path: Path) -> None:
    def copy() -> str:
        with server.sdk() as sdk, pytest.raises(CopyProtocolError) as info:
            cp_from_instance(sdk, INSTANCE, "/etc\x00", tmp_path / "out")
        return str(info.value)

    message = await asyncio.to_thread(copy)
    assert message.startswith("copy failed: invalid cp request: guest_path") and "NUL" in message
    assert server.agent.requests == []


async def test_cp_to_an_oversized_path_is_an_error_the_sdk_reads(server: Server, tmp_path: Path) -> None:
    """The SDK sends the whole file before it reads an answer: the refusal waits for it."""
    source = tmp_path / "data"
    source.write_bytes(b"z" * 300_000)
    path = "/" + "q" * 70_000

    def copy() -> str:
        with server.sdk() as sdk, pytest.raises(CopyProtocolError) as info:
            cp_to_instance(sdk, INSTANCE, source, path)
        return str(info.value)

    message = await asyncio.to_thread(copy)
    assert message.startswith("copy failed: invalid cp request: guest_path") and "4095" in message
    assert server.agent.requests == []


@pytest.mark.parametrize("field", ["uid", "gid"])
async def test_cp_to_with_an_owner_over_2_31_is_an_error_frame(server: Server, field: str) -> None:
    for is_dir in (False, True):
        async with connect(server.ws_url("cp"), additional_headers=server.headers) as ws:
            await ws.send(json.dumps({"direction": "to", "guest_path": "/tmp/f", "is_dir": is_dir,
                                      field: MAX_GUEST_ID + 1}))
            if not is_dir:
                await ws.send(b"data")
            await ws.send(json.dumps({"type": "end"}))
            reply = json.loads(await ws.recv())
        assert reply["type"] == "error" and field in reply["message"], reply
    assert server.agent.requests == []


async def test_cp_to_with_the_largest_owner_reaches_the_agent(server: Server) -> None:
    async with connect(server.ws_url("cp"), additional_headers=server.headers) as ws:
        await ws.send(json.dumps({"direction": "to", "guest_path": "/tmp/f", "uid": MAX_GUEST_ID,
                                  "gid": MAX_GUEST_ID}))
        await ws.send(b"data")
        await ws.send(json.dumps({"type": "end"}))
        assert json.loads(await ws.recv()) == {"type": "result", "success": True, "bytes_written": 4}
    assert len(server.agent.requests) == 1


# ---- log summaries -------------------------------------------------------------------------------


def test_summary_is_bounded_whatever_it_is_given() -> None:
    assert summary("short") == "'short'"
    long = summary("x" * 15_000_000)
    assert len(long) < 300 and "15000000 characters" in long
    many = summary(["a" * 1000] * 70_000)
    assert len(many) < 700 and "70000 items" in many
    assert summary(["ls", "-l"]) == "['ls', '-l']"
