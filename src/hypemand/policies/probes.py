"""One health probe of one VM: ``http``, ``tcp`` or ``exec``, each bounded by the check's timeout.

``http`` and ``tcp`` connect to the VM's address from the namespace its network lives in: the
socket is made there by the network host (:meth:`NetworkHost.connect_socket`) and then driven by
the event loop, so a probe costs no thread while it waits and a VM that never answers holds only
its own probe. The HTTP exchange is h11's (one request, ``Connection: close``; only the status
line and headers are read); ``https`` is not verified (a VM's certificate is its own business,
the probe asks only whether it answers). ``exec`` runs the command through the guest agent and
wants exit code 0.

A probe that cannot be made (no bridge network, so no VM address to reach; no guest agent) is
``unknown``, not a failure: the program was not asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11

from hypemand.errors import DomainError
from hypemand.guest.client import AgentClient
from hypemand.network import NetworkHost
from hypemand.policies.health_state import ProbeOutcome
from hypemand.policies.models import HealthCheck, HealthCheckExec, HealthCheckHTTP, seconds

READ_CHUNK = 4096
MAX_RESPONSE_HEAD = 64 << 10  # a status line and headers longer than this are a failure
EXEC_OUTPUT_KEPT = 256  # bytes of a failing command's output shown in last_error
USER_AGENT = "hypemand-health-check"


@dataclass(frozen=True)
class ProbeTarget:
    """Where a VM is reachable for network probes: its address and the network host whose
    namespace reaches it; ``unreachable`` says why there is none (user-mode networking)."""

    ip: str | None
    host: NetworkHost | None
    unreachable: str | None = None


def _no_verify() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


_TLS = _no_verify()


AgentOf = Callable[[], Awaitable[AgentClient]]


async def probe(check: HealthCheck, target: ProbeTarget, agent_of: AgentOf | None,
                no_agent: str | None = None) -> ProbeOutcome:
    """Run the check once; never raises for what the VM does, never outlives the timeout.
    ``agent_of`` links the guest agent (for ``exec``; None: the VM has none, ``no_agent`` says
    why)."""
    timeout = seconds(check.timeout)
    try:
        async with asyncio.timeout(timeout):
            if check.type == "exec":
                assert check.exec is not None
                if agent_of is None:
                    return ProbeOutcome(False, no_agent or "no guest agent", unknown=True)
                return await _exec(await agent_of(), check.exec, timeout)
            if target.ip is None or target.host is None:
                return ProbeOutcome(False, target.unreachable or "the VM has no address", unknown=True)
            if check.type == "tcp":
                assert check.tcp is not None
                return await _tcp(target.host, target.ip, check.tcp.port)
            assert check.http is not None
            return await _http(target.host, target.ip, check.http)
    except TimeoutError:
        return ProbeOutcome(False, f"timed out after {check.timeout}")
    except (OSError, DomainError, h11.ProtocolError, ssl.SSLError) as exc:
        return ProbeOutcome(False, _describe(exc))


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return text


async def _tcp(host: NetworkHost, ip: str, port: int) -> ProbeOutcome:
    sock = await host.connect_socket()
    try:
        await asyncio.get_running_loop().sock_connect(sock, (ip, port))
    finally:
        sock.close()
    return ProbeOutcome(True)


async def _http(host: NetworkHost, ip: str, http: HealthCheckHTTP) -> ProbeOutcome:
    loop = asyncio.get_running_loop()
    sock = await host.connect_socket()
    try:
        await loop.sock_connect(sock, (ip, http.port))
        if http.scheme == "https":
            status = await _over_tls(sock, ip, http)
        else:
            # Plain HTTP straight on the socket: no transport or streams to build per probe.
            async def send(data: bytes) -> None:
                await loop.sock_sendall(sock, data)

            async def receive() -> bytes:
                return await loop.sock_recv(sock, READ_CHUNK)

            status = await _exchange(send, receive, ip, http)
    finally:
        sock.close()
    if status != http.expected_status:
        return ProbeOutcome(False, f"GET {http.path} answered {status}, expected {http.expected_status}")
    return ProbeOutcome(True)


async def _over_tls(sock: socket.socket, ip: str, http: HealthCheckHTTP) -> int:
    reader, writer = await asyncio.open_connection(sock=sock, ssl=_TLS, server_hostname=ip)
    try:
        async def send(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        return await _exchange(send, lambda: reader.read(READ_CHUNK), ip, http)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _exchange(send: Callable[[bytes], Awaitable[None]], receive: Callable[[], Awaitable[bytes]],
                    ip: str, http: HealthCheckHTTP) -> int:
    """Send the GET and read up to the response's head; its status code."""
    conn = h11.Connection(h11.CLIENT)
    host = ip if http.port == (443 if http.scheme == "https" else 80) else f"{ip}:{http.port}"
    request = h11.Request(method="GET", target=http.path, headers=[
        ("Host", host), ("User-Agent", USER_AGENT), ("Connection", "close"),
    ])
    await send(conn.send(request) + conn.send(h11.EndOfMessage()))
    received = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await receive()
            received += len(data)
            if received > MAX_RESPONSE_HEAD:
                raise h11.RemoteProtocolError("the response's head is too long")
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Response):
            return event.status_code
        if isinstance(event, h11.ConnectionClosed):
            raise ConnectionResetError("the connection closed before a response")


async def _exec(agent: AgentClient, command: HealthCheckExec, timeout: float) -> ProbeOutcome:  # noqa: ASYNC109
    """The command to its end (the guest kills it at the timeout too); exit 0 is healthy."""
    session = await agent.exec(command.command, cwd=command.working_dir, timeout=timeout, merge_stderr=True)
    kept = bytearray()
    try:
        async for chunk in session:
            if len(kept) < EXEC_OUTPUT_KEPT:
                kept += chunk.data[: EXEC_OUTPUT_KEPT - len(kept)]
        result = await session.wait()
    except BaseException:
        if session.result is None:
            await session.kill()
        raise
    if result.exit_code == 0:
        return ProbeOutcome(True)
    output = kept.decode(errors="replace").strip()
    why = "timed out" if result.timed_out else f"exit code {result.exit_code}"
    return ProbeOutcome(False, f"{why}" + (f": {output}" if output else ""))
