"""Helpers for the streams tests: the logs, exec and cp routers in a small app, served by
uvicorn on the test's own event loop (so a guest AgentClient created on that loop can be used by
the handlers), and an instance manager stand-in implementing ``InstanceStreams``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace

import uvicorn
from fastapi import FastAPI

from hypemand.api import cp, logs
from hypemand.api import exec as exec_routes
from hypemand.api.errors import install_error_handlers
from hypemand.errors import InvalidState, NotFound
from hypemand.guest.client import AgentClient

SECRET = "streams-test-secret-of-at-least-32-bytes"


class FakeInstances:
    """``InstanceStreams`` over fixed tables: Running instances with an agent, instances in
    another state, and log files per instance and source."""

    def __init__(
        self,
        agents: dict[str, AgentClient] | None = None,
        states: dict[str, str] | None = None,
        logs: dict[str, dict[str, Path]] | None = None,
    ) -> None:
        self.agents = agents or {}
        self.states = states or {}
        self.logs = logs or {}
        self.agent_calls: list[tuple[str, float]] = []

    async def guest_agent(self, ref: str, wait_for_agent: float = 0.0) -> AgentClient:
        self.agent_calls.append((ref, wait_for_agent))
        if ref in self.agents:
            return self.agents[ref]
        if ref in self.states:
            raise InvalidState(f"instance {ref} is {self.states[ref]}, not Running")
        raise NotFound(f"instance {ref} not found")

    async def log_file(self, ref: str, source: str) -> Path:
        if ref not in self.logs:
            raise NotFound(f"instance {ref} not found")
        return self.logs[ref][source]


def build_app(instances: FakeInstances, secret: str = SECRET) -> FastAPI:
    app = FastAPI()
    app.state.runtime = SimpleNamespace(instances=instances)
    app.state.jwt_secret = secret
    install_error_handlers(app)
    for router in (logs.router, exec_routes.router, cp.router):
        app.include_router(router)
    return app


class _TestServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Runs inside pytest: leave Ctrl-C and SIGTERM to pytest.
        yield


@contextlib.asynccontextmanager
async def serve_app(app: FastAPI) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 (the daemon's WebSocket implementation) from a task on the
    running loop; yields the base URL."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(app, ws="websockets-sansio", lifespan="off", log_level="warning",
                            timeout_graceful_shutdown=3)
    server = _TestServer(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[listener]))
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if task.done():
            task.result()
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)
        listener.close()
