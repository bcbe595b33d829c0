"""The probes against real servers on 127.0.0.1 (the VM tests in tests/health run them against
guests on the bridge): http status, https without verification, a server that never answers
bounded by the timeout, tcp refused, exec without an agent, what a probe that cannot be made
says. ``Loopback`` stands in for the network host: it makes the socket in this namespace."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest

from hypemand.network import NetworkHost
from hypemand.policies.models import HealthCheck
from hypemand.policies.probes import ProbeTarget, probe


class Loopback:
    async def connect_socket(self) -> socket.socket:
        made = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        made.setblocking(False)
        return made


HOST = cast(NetworkHost, Loopback())
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def answering(status_line: bytes) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(status_line + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()
    return handle


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # until the probe gives up and closes: never a word back
    writer.close()


async def serve(handler: Handler, tls: ssl.SSLContext | None = None) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
    return server, server.sockets[0].getsockname()[1]


def check(kind: str, port: int, **extra: object) -> HealthCheck:
    settings: dict[str, object] = {"port": port, **extra} if kind != "exec" else {"command": ["true"]}
    return HealthCheck.model_validate({"type": kind, "timeout": "500ms", kind: settings})


@pytest.fixture
async def web() -> AsyncIterator[int]:
    server, port = await serve(answering(b"HTTP/1.1 200 OK"))
    async with server:
        yield port


async def test_http_wants_the_expected_status(web: int) -> None:
    target = ProbeTarget("127.0.0.1", HOST)
    assert (await probe(check("http", web), target, None)).ok
    wrong = await probe(check("http", web, expected_status=204), target, None)
    assert not wrong.ok and wrong.error == "GET / answered 200, expected 204"


@pytest.fixture
def self_signed(tmp_path: Path) -> ssl.SSLContext:
    """A server context with a certificate nobody vouches for."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=vm", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    return tls


async def test_https_answers_without_a_verified_certificate(self_signed: ssl.SSLContext) -> None:
    server, port = await serve(answering(b"HTTP/1.1 503 Busy"), self_signed)
    async with server:
        outcome = await probe(check("http", port, scheme="https"), ProbeTarget("127.0.0.1", HOST), None)
    assert not outcome.ok and outcome.error == "GET / answered 503, expected 200"


async def test_a_server_that_never_answers_is_bounded_by_the_timeout() -> None:
    server, port = await serve(silent)
    async with server:
        others = asyncio.gather(*(probe(check("http", port), ProbeTarget("127.0.0.1", HOST), None)
                                  for _ in range(5)))
        outcomes = await asyncio.wait_for(others, 30)  # a bound for a broken probe, not a measure
    assert all(not o.ok and o.error == "timed out after 500ms" for o in outcomes)


async def test_tcp_connects_or_is_refused(web: int) -> None:
    target = ProbeTarget("127.0.0.1", HOST)
    assert (await probe(check("tcp", web), target, None)).ok
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed = unused.getsockname()[1]
    refused = await probe(check("tcp", closed), target, None)
    assert not refused.ok and refused.error == "connection refused" and not refused.unknown


async def test_a_probe_that_cannot_be_made_is_unknown() -> None:
    no_address = await probe(check("http", 80), ProbeTarget(None, None, "user-mode networking"), None)
    assert no_address.unknown and no_address.error == "user-mode networking"
    no_agent = await probe(check("exec", 0), ProbeTarget(None, None), None, "skip_guest_agent")
    assert no_agent.unknown and no_agent.error == "skip_guest_agent"
