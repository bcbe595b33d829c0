"""``hypeman run --auto-standby IDLE`` and ``hypeman auto-standby status|hold`` against a real
server and real VMs (the package's ``vm_env`` server)."""

from __future__ import annotations

import pytest

from tests.cli.conftest import SMALL, VmEnv, assert_one_line_error

pytestmark = pytest.mark.vm

IMAGE = "docker.io/demo/busybox:latest"
SERVE = ["--entrypoint", "/bin/sh", "--cmd", "-c", "--cmd", "exec httpd -f -p 80 -h /www"]


def test_run_with_auto_standby_goes_to_standby_and_status_and_hold_say_so(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    try:
        sleepy = cli.ok("run", "--name", "sleepy", *SMALL, *SERVE, "--auto-standby", "1s", IMAGE).json()
        assert sleepy["auto_standby"] == {"enabled": True, "idle_timeout": "1s",
                                          "ignore_source_cidrs": [], "ignore_destination_ports": []}
        waited = cli.ok("wait", "sleepy", "--state", "Standby", "--timeout", "60s").json()
        assert waited["state"] == "Standby", waited
        status = cli.ok("auto-standby", "status", "sleepy").json()
        assert (status["status"], status["reason"]) == ("ineligible", "instance_not_running")
        assert status["tracking_mode"] == "conntrack_poll_v4_tcp" and status["idle_timeout"] == "1s"
        assert_one_line_error(cli.run("auto-standby", "hold", "sleepy"), "in standby")

        awake = cli.ok("run", "--name", "awake", *SMALL, *SERVE, "--auto-standby-idle-timeout", "1h",
                       "--auto-standby-ignore-destination-port", "22",
                       "--auto-standby-ignore-source-cidr", "192.0.2.0/24", IMAGE).json()
        assert awake["auto_standby"] == {"enabled": True, "idle_timeout": "1h",
                                         "ignore_source_cidrs": ["192.0.2.0/24"],
                                         "ignore_destination_ports": [22]}
        held = cli.ok("auto-standby", "hold", "awake").json()
        assert held["hold_until"] and held["configured"] and held["enabled"] and held["eligible"]
        table = cli.ok("auto-standby", "status", "awake", "--format", "table").stdout
        assert "idle_countdown" in table and "hold_until" in table, table

        plain = cli.ok("run", "-d", "--name", "plain-as", *SMALL, *SERVE, IMAGE).json()
        assert "auto_standby" not in plain
        assert cli.ok("auto-standby", "status", "plain-as").json()["reason"] == "policy_missing"
        assert_one_line_error(cli.run("run", "--auto-standby", "1s", "--auto-standby-idle-timeout", "2s",
                                      IMAGE), "two idle timeouts")
        bad = cli.run("run", "--name", "bad-as", *SMALL, "--auto-standby", "soon", IMAGE)
        # The server's 400, naming the field (after the run's "creating" line).
        assert bad.returncode == 1 and bad.stderr.splitlines()[-1].startswith("error: "), bad
        assert "auto_standby" in bad.stderr and "idle_timeout" in bad.stderr, bad
    finally:
        for name in ("sleepy", "awake", "plain-as", "bad-as"):
            cli.run("rm", "-f", name)
