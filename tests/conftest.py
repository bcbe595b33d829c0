"""Fixtures shared by the whole suite: a real `hypemand serve` process and a strict SDK client.

System files (kernel, initrd, guest binary) are prepared once into a shared system directory
(``HYPEMAND_SYSTEM_DIR``, default ``/var/lib/hypemand/system``, the one `make run` uses) so that
each test's fresh data directory does not download the kernel again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypeman import Hypeman

from tests.support.net import free_port

REPO = Path(__file__).resolve().parent.parent
SHARED_SYSTEM_DIR = Path(os.environ.get("HYPEMAND_SYSTEM_DIR", "/var/lib/hypemand/system"))
os.environ.setdefault("HYPEMAND_SYSTEM_DIR", str(SHARED_SYSTEM_DIR))


@dataclass
class ServerProcess:
    base_url: str
    token: str
    data_dir: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the server the way a service manager would (SIGTERM, then SIGKILL)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_server(data_dir: Path, log_path: Path, port: int | None = None) -> ServerProcess:
    port = port or free_port()
    env = dict(os.environ, HYPEMAND_SYSTEM_DIR=str(SHARED_SYSTEM_DIR), PYTHONUNBUFFERED="1")
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "hypemand.cli.main", "serve", "--port", str(port),
             "--data-dir", str(data_dir), "--log-level", "info"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text(errors='replace')}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"server did not answer /health:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.1)
    token = subprocess.run(
        [sys.executable, "-m", "hypemand.cli.main", "token", "--data-dir", str(data_dir)],
        check=True, capture_output=True, text=True, env=env,
    ).stdout.strip()
    return ServerProcess(base_url, token, data_dir, port, process, log_path)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    data_dir = tmp_path / "data"
    srv = start_server(data_dir, tmp_path / "server.log")
    try:
        yield srv
    finally:
        srv.stop()


def strict_client(srv: ServerProcess, token: str | None = None) -> Hypeman:
    return Hypeman(base_url=srv.base_url, api_key=token or srv.token, max_retries=0,
                   _strict_response_validation=True)


@pytest.fixture
def sdk(server: ServerProcess) -> Iterator[Hypeman]:
    client = strict_client(server)
    try:
        yield client
    finally:
        client.close()
