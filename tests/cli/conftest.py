"""The real ``hypeman`` executable, run as a subprocess against a real server (and real VMs).

``Cli.run`` starts the console script installed beside the interpreter (``.venv/bin/hypeman``)
with a clean environment: its own HOME (no user cli.yaml), the server's URL and key in
``HYPEMAN_BASE_URL`` / ``HYPEMAN_API_KEY`` unless a test says otherwise, stdout and stderr piped.

``vm_env`` (package scope) is one server with the demo image pushed by ``hypeman push`` and one
instance started by ``hypeman run``: the VM tests of this package share it, so one boot serves
them all. Its harness (tests/support/harness.py) deletes every instance and stops the server at
the end, also after a failure, and fails on what the server logged or left behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hypemand.images import demo
from tests.support.harness import ServerProcess, shared_harness

HYPEMAN = Path(sys.executable).parent / "hypeman"
ANSI = re.compile(r"\x1b[\[\]()]")
INSTANCE_NAME = "web"
SERVICE_SCRIPT = "echo service-up; i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done"
SMALL = ["--memory", "256MB", "--overlay-size", "64MB", "--cpus", "1"]


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (f"hypeman {' '.join(self.args)} -> {self.returncode}\n"
                f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}")

    def json(self) -> Any:
        return json.loads(self.stdout)


def assert_clean(result: Result) -> None:
    """Nothing a pipe should not get: no colour or cursor codes, no traceback."""
    assert not ANSI.search(result.stdout), result
    assert not ANSI.search(result.stderr), result
    assert "Traceback" not in result.stderr, result


def assert_ok(result: Result) -> Result:
    assert result.returncode == 0, result
    assert_clean(result)
    return result


def assert_one_line_error(result: Result, *fragments: str) -> str:
    """Exit status 1 and exactly one line on stderr, ``error: ...``, holding each fragment."""
    assert result.returncode == 1, result
    assert_clean(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result
    for fragment in fragments:
        assert fragment in lines[0], result
    return lines[0]


def clean_environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HYPEMAN_") and k not in ("XDG_CONFIG_HOME", "COLUMNS", "LINES")}
    env["HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Cli:
    home: Path
    env: dict[str, str] = field(default_factory=dict)  # added to the clean environment

    def environment(self, **overrides: str | None) -> dict[str, str]:
        env = clean_environment(self.home)
        env.update(self.env)
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def run(self, *args: str, input: str | bytes | None = None, timeout: float = 240,
            env: dict[str, str | None] | None = None, cwd: Path | None = None) -> Result:
        data = input.encode() if isinstance(input, str) else input
        completed = subprocess.run([str(HYPEMAN), *args], input=data, capture_output=True,
                                   env=self.environment(**(env or {})), timeout=timeout, cwd=cwd,
                                   stdin=None if data is not None else subprocess.DEVNULL)
        return Result(list(args), completed.returncode, completed.stdout.decode(errors="replace"),
                      completed.stderr.decode(errors="replace"))

    def ok(self, *args: str, **kwargs: Any) -> Result:
        return assert_ok(self.run(*args, **kwargs))


def cli_for(server: ServerProcess, home: Path) -> Cli:
    home.mkdir(parents=True, exist_ok=True)
    return Cli(home, {"HYPEMAN_BASE_URL": server.base_url, "HYPEMAN_API_KEY": server.token})


@pytest.fixture(scope="session")
def demo_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo image (Debian's busybox-static) as an OCI layout, tagged ``latest``."""
    return demo.build_layout(tmp_path_factory.mktemp("cli-layout"))


@dataclass
class VmEnv:
    server: ServerProcess
    cli: Cli
    layout: Path
    push: Result
    run: Result
    instance_id: str


@pytest.fixture(scope="package")
def vm_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           demo_layout: Path) -> Iterator[VmEnv]:
    root = tmp_path_factory.mktemp("cli-vm")
    with shared_harness(root / "harness", request.node) as harness:
        server = harness.start()
        cli = cli_for(server, root / "home")
        pushed = cli.run("push", str(demo_layout), demo.DEMO_NAME)
        assert_ok(pushed)
        ran = cli.run("run", "--name", INSTANCE_NAME, *SMALL, "--tag", "team=cli", "-e", "GREETING=hello",
                      "--bandwidth-down", "100Mbps", "--bandwidth-up", "1MB/s",
                      "--entrypoint", "/bin/sh", "--cmd", "-c", "--cmd", SERVICE_SCRIPT,
                      "docker.io/demo/busybox:latest")
        assert_ok(ran)
        yield VmEnv(server, cli, demo_layout, pushed, ran, ran.json()["id"])
