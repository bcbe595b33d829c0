"""The ``exec`` WebSocket (``/instances/{id}/exec``) in the official client's format
(``hypeman.lib.exec``): a JSON request as the first text frame, then stdin and TTY resizes from
the client, output as binary frames, and ``{"exitCode": N}`` last. A command that cannot run is
reported in the protocol's own way: ``Error: <message>`` on the output and exit code 127."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import APIRouter
from pydantic import Field, ValidationError, field_validator, model_validator
from starlette.websockets import WebSocket

from hypemand.api.instance_streams import instance_streams
from hypemand.api.limits import (
    MAX_AGENT_PAYLOAD_BYTES,
    MAX_EXEC_ARGS,
    MAX_EXEC_TIMEOUT_SECONDS,
    MAX_WAIT_FOR_AGENT_SECONDS,
    agent_string_bytes,
    check_exec_env,
    check_guest_path,
    exec_request_bytes,
    summary,
)
from hypemand.api.websocket import (
    ClientGone,
    WireRequest,
    admit,
    close_quietly,
    receive,
    receive_request_text,
    send_bytes,
    send_text,
    validation_summary,
)
from hypemand.errors import DomainError
from hypemand.guest.client import AgentClient, AgentError, ExecSession
from hypemand.guest.models import ExecResult

log = logging.getLogger(__name__)

# Mounted without a router-level auth dependency: admit() checks the token (see api.websocket).
router = APIRouter()


class ExecRequest(WireRequest):
    """Checked whole against the guest protocol's limits (``api/limits.py``) before anything is
    sent to the agent or logged."""

    command: list[str] = Field(default_factory=lambda: ["/bin/sh"], max_length=MAX_EXEC_ARGS)
    tty: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str = ""
    # seconds; 0: no limit
    timeout: float = Field(0, ge=0, le=MAX_EXEC_TIMEOUT_SECONDS, allow_inf_nan=False)
    wait_for_agent: float = Field(0, ge=0, le=MAX_WAIT_FOR_AGENT_SECONDS, allow_inf_nan=False)
    rows: int = Field(24, ge=1, le=65535)
    cols: int = Field(80, ge=1, le=65535)

    @field_validator("command")
    @classmethod
    def _arguments_ok(cls, value: list[str]) -> list[str]:
        for arg in value:
            agent_string_bytes(arg)  # raises for a NUL byte
        return value

    @field_validator("env")
    @classmethod
    def _env_ok(cls, value: dict[str, str]) -> dict[str, str]:
        check_exec_env(value)
        return value

    @field_validator("cwd")
    @classmethod
    def _cwd_ok(cls, value: str) -> str:
        return check_guest_path(value) if value else value

    @model_validator(mode="after")
    def _fits_one_agent_request(self) -> ExecRequest:
        if not self.command:
            self.command = ["/bin/sh"]
        size = exec_request_bytes(self.command, self.env, self.cwd)
        if size > MAX_AGENT_PAYLOAD_BYTES:
            raise ValueError(
                f"command, env and cwd take {size} bytes; the guest agent takes at most "
                f"{MAX_AGENT_PAYLOAD_BYTES} in one request"
            )
        return self


def _resize_request(text: str) -> tuple[int, int] | None:
    """(rows, cols) if a text frame is ``{"resize": {"rows": R, "cols": C}}``, else None."""
    try:
        payload = json.loads(text)
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("resize"), dict):
        return None
    rows, cols = payload["resize"].get("rows"), payload["resize"].get("cols")
    for value in (rows, cols):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 65535:
            return None
    return rows, cols


def _exit_frame(exit_code: int) -> str:
    # The SDK accepts exactly this object, nothing more.
    return json.dumps({"exitCode": exit_code})


async def _exec_failed(websocket: WebSocket, message: str) -> None:
    """The protocol's way to report a command that could not run: text on the output, 127."""
    await send_bytes(websocket, f"Error: {message}\r\n".encode())
    await send_text(websocket, _exit_frame(127))


async def _forward_output(websocket: WebSocket, session: ExecSession) -> ExecResult:
    async for chunk in session:
        await send_bytes(websocket, chunk.data)
    return await session.wait()


async def _forward_input(websocket: WebSocket, session: ExecSession, tty: bool) -> None:
    """Client frames to the process: binary and text frames are stdin, except a TTY resize.
    Returns when the client goes away. The protocol has no stdin EOF: stdin stays open."""
    stdin_open = True
    while True:
        try:
            message = await receive(websocket)
        except ClientGone:
            return
        data = message.get("bytes")
        if data is None:
            text = message.get("text") or ""
            size = _resize_request(text) if tty else None
            if size is not None:
                await session.resize(*size)
                continue
            data = text.encode()
        if stdin_open and data:
            try:
                await session.write_stdin(data)
            except AgentError:
                # The process has ended (its exit code is on its way); later input goes nowhere.
                stdin_open = False


async def _run_exec(websocket: WebSocket, session: ExecSession, tty: bool) -> ExecResult | None:
    """Pump both directions until the process exits (its result) or the client leaves (None;
    the process is killed). The exit frame is sent here, after all output."""
    output = asyncio.create_task(_forward_output(websocket, session))
    client = asyncio.create_task(_forward_input(websocket, session, tty))
    try:
        done, _ = await asyncio.wait({output, client}, return_when=asyncio.FIRST_COMPLETED)
        if output not in done:
            return None
        try:
            result = output.result()
        except ClientGone:
            return None
        except AgentError as exc:
            # The agent connection broke while the command ran (VM stopped or restored).
            await _exec_failed(websocket, str(exc))
            return None
        await send_text(websocket, _exit_frame(result.exit_code))
        return result
    finally:
        for task in (output, client):
            task.cancel()
        # Collects whatever the tasks ended with; a cancellation of this coroutine still propagates.
        await asyncio.gather(output, client, return_exceptions=True)
        if session.result is None:
            await session.kill()


@router.websocket("/instances/{instance_id}/exec")
async def exec_in_instance(websocket: WebSocket, instance_id: str) -> None:
    admitted = await admit(websocket, instance_id)
    if admitted is None:
        return
    agent, claims = admitted
    await websocket.accept()
    try:
        await _serve_exec(websocket, instance_id, agent, summary(str(claims.get("sub", "unknown"))))
    except ClientGone:
        pass
    finally:
        await close_quietly(websocket)


async def _serve_exec(websocket: WebSocket, instance_id: str, agent: AgentClient, subject: str) -> None:
    text = await receive_request_text(websocket)
    if text is None:
        await _exec_failed(websocket, "the first message must be a JSON text frame")
        return
    try:
        request = ExecRequest.model_validate_json(text)
    except ValidationError as exc:
        await _exec_failed(websocket, f"invalid exec request: {validation_summary(exc)}")
        return
    started = time.monotonic()
    instance = summary(instance_id)
    # Only a bounded summary of what the client sent: never the whole of it, never env values.
    log.info("exec started: instance=%s subject=%s command=%s env_keys=%d tty=%s",
             instance, subject, summary(request.command), len(request.env), request.tty)
    try:
        if not agent.connected:
            agent = await instance_streams(websocket).guest_agent(instance_id, request.wait_for_agent)
        session = await agent.exec(
            request.command,
            env=request.env or None,
            cwd=request.cwd or None,
            tty=request.tty,
            rows=request.rows,
            cols=request.cols,
            timeout=request.timeout or None,
            # Without a TTY the two streams are merged in the guest, so their order is kept.
            merge_stderr=not request.tty,
        )
    except DomainError as exc:
        log.info("exec failed to start: instance=%s subject=%s: %s", instance, subject, summary(str(exc)))
        await _exec_failed(websocket, str(exc))
        return
    result = await _run_exec(websocket, session, request.tty)
    log.info("exec ended: instance=%s subject=%s exit_code=%s duration_ms=%d", instance, subject,
             result.exit_code if result else "none (client left or agent lost)",
             (time.monotonic() - started) * 1000)
