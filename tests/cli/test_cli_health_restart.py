"""``hypeman run`` with a health check and a restart policy, and ``ps``/``inspect`` showing them,
against the package's real server (tests/cli/conftest.py): the short flags (``--health-http``,
``--health-cmd``, ``--restart``) and the Go CLI's long ones; a flag the CLI can tell is wrong is
one error line, a value the server refuses is its 400."""

from __future__ import annotations

import time
from typing import Any

from tests.cli.conftest import SMALL, VmEnv, assert_one_line_error

PATIENCE = 240.0


def inspect_until(vm_env: VmEnv, name: str, wanted: Any) -> dict[str, Any]:
    deadline = time.monotonic() + PATIENCE
    while True:
        found: dict[str, Any] = vm_env.cli.ok("inspect", name).json()
        if wanted(found):
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.2)


def test_run_with_an_http_health_check_and_a_restart_policy(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    ran = cli.ok("run", "--name", "checked", *SMALL, "--health-http", "80/index.html",
                 "--health-interval", "500ms", "--health-start-period", "0s",
                 "--restart", "on-failure", "--restart-backoff", "1s", "--restart-max-attempts", "3",
                 "docker.io/demo/busybox:latest")
    try:
        instance = ran.json()
        assert instance["health_check"]["type"] == "http"
        assert instance["health_check"]["http"] == {
            "port": 80, "path": "/index.html", "scheme": "http", "expected_status": 200}
        assert instance["restart_policy"] == {
            "policy": "on_failure", "backoff": "1s", "max_attempts": 3, "stable_after": "10m"}
        healthy = inspect_until(vm_env, "checked", lambda i: i["health_status"]["status"] == "healthy")
        assert healthy["health_status"]["consecutive_successes"] >= 1
        table = cli.ok("ps", "--format", "table").stdout.splitlines()
        header = table[0].split()
        assert header[-2:] == ["HEALTH", "RESTARTS"], table
        row = next(line.split() for line in table if line.startswith(instance["id"][:12]))
        assert row[-2:] == ["healthy", "0"], table
        others = [line.split() for line in table[1:] if not line.startswith(instance["id"][:12])]
        assert all(other[-2:] == ["-", "-"] for other in others), table  # no check, no policy
        fields = cli.ok("inspect", "checked", "--format", "table").stdout
        assert "health_status" in fields and "healthy" in fields and "restart_policy" in fields
    finally:
        cli.ok("rm", "-f", "checked")


def test_run_with_an_exec_check_and_the_go_cli_flags(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    ran = cli.ok("run", "-d", "--name", "exec-checked", *SMALL, "--health-cmd", "test -e /www/index.html",
                 "--health-exec-working-dir", "/www", "--health-timeout", "3s",
                 "--health-failure-threshold", "2", "--health-success-threshold", "1",
                 "--restart-policy", "always", "--restart-stable-after", "1m",
                 "docker.io/demo/busybox:latest")
    try:
        check = ran.json()["health_check"]
        assert check["type"] == "exec" and check["timeout"] == "3s" and check["failure_threshold"] == 2
        assert check["exec"] == {"command": ["/bin/sh", "-c", "test -e /www/index.html"],
                                 "working_dir": "/www"}
        assert ran.json()["restart_policy"]["policy"] == "always"
        assert ran.json()["restart_policy"]["stable_after"] == "1m"
    finally:
        cli.ok("rm", "-f", "exec-checked")


def test_bad_health_and_restart_flags(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    image = "docker.io/demo/busybox:latest"
    assert_one_line_error(cli.run("run", "--health-http", "eighty", image), "--health-http", "port")
    assert_one_line_error(cli.run("run", "--health-http", "80", "--health-cmd", "true", image), "one of them")
    assert_one_line_error(cli.run("run", "--restart", "sometimes", image), "--restart", "on_failure")
    # The server's 400, after the progress line of the create.
    refused = cli.run("run", "--name", "bad-interval", "--health-tcp", "80", "--health-interval", "soon",
                      image)
    assert refused.returncode == 1, refused
    last = refused.stderr.splitlines()[-1]
    assert last.startswith("error: ") and "interval" in last and "soon" in last, refused
    assert "bad-interval" not in cli.ok("ps", "-a", "-q", "--format", "json").stdout
