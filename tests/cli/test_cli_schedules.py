"""``hypeman snapshot schedule set|get|delete(rm)`` against a real server (the package's
``vm_env``: its instance ``web`` runs). The server has the reference's 1m minimum, so the
schedules here never run during the tests (their runs are tests/schedules/)."""

from __future__ import annotations

import pytest
import yaml

from tests.cli.conftest import INSTANCE_NAME, VmEnv, assert_clean, assert_one_line_error

pytestmark = pytest.mark.vm


def test_set_get_and_rm_a_schedule(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    made = cli.ok("snapshot", "schedule", "set", INSTANCE_NAME, "--interval", "1h", "--max-count", "3",
                  "--max-age", "168h", "--name-prefix", "web-nightly",
                  "--metadata", "team=cli", "--metadata", "tier=gold").json()
    assert made["instance_id"] == vm_env.instance_id and made["interval"] == "1h"
    assert made["retention"] == {"max_count": 3, "max_age": "168h"}
    assert made["name_prefix"] == "web-nightly" and made["metadata"] == {"team": "cli", "tier": "gold"}
    assert made["last_run_at"] is None and made["last_error"] is None

    # By id prefix, as YAML, and as a table for people.
    shown = yaml.safe_load(cli.ok("snapshot", "schedule", "get", vm_env.instance_id[:10],
                                  "--format", "yaml").stdout)
    assert shown == made
    table = cli.ok("snapshot", "schedule", "get", INSTANCE_NAME, "--format", "table").stdout
    assert "web-nightly" in table and "next_run_at" in table

    # Only the retention changes: the next run stays where it was.
    again = cli.ok("snapshot", "schedule", "set", INSTANCE_NAME, "--interval", "60m",
                   "--max-count", "0", "--max-age", "24h").json()
    assert again["next_run_at"] == made["next_run_at"] and again["retention"] == {"max_count": 0,
                                                                                  "max_age": "24h"}
    assert "metadata" not in again and again["name_prefix"] is None

    removed = cli.ok("snapshot", "schedule", "rm", INSTANCE_NAME).json()
    assert removed == [vm_env.instance_id]
    gone = cli.run("snapshot", "schedule", "get", INSTANCE_NAME)
    assert_one_line_error(gone, "not_found", "no snapshot schedule")
    assert_one_line_error(cli.run("snapshot", "schedule", "delete", INSTANCE_NAME), "not_found")


def test_bad_schedules_are_one_line_errors_and_nothing_is_set(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    # The reference's minimum, from the server.
    assert_one_line_error(cli.run("snapshot", "schedule", "set", INSTANCE_NAME, "--interval", "30s",
                                  "--max-count", "1"), "interval", "at least 1m")
    assert_one_line_error(cli.run("snapshot", "schedule", "set", INSTANCE_NAME, "--interval", "1h",
                                  "--max-age", "soon"), "max_age")
    assert_one_line_error(cli.run("snapshot", "schedule", "set", INSTANCE_NAME, "--interval", "1h",
                                  "--max-count", "1", "--name-prefix", "Bad Prefix"), "name_prefix")
    # Refused before anything is sent.
    assert_one_line_error(cli.run("snapshot", "schedule", "set", INSTANCE_NAME, "--interval", "1h"),
                          "retention")
    assert_one_line_error(cli.run("snapshot", "schedule", "set", INSTANCE_NAME, "--interval", "1h",
                                  "--max-count", "1", "--metadata", "no-equals"), "--metadata")
    assert_one_line_error(cli.run("snapshot", "schedule", "set", "no-such-instance", "--interval", "1h",
                                  "--max-count", "1"), "not found")
    # --interval is required: a usage error (click's, exit status 2).
    usage = cli.run("snapshot", "schedule", "set", INSTANCE_NAME, "--max-count", "1")
    assert usage.returncode == 2 and "--interval" in usage.stderr, usage
    assert_clean(usage)
    assert_one_line_error(cli.run("snapshot", "schedule", "get", INSTANCE_NAME), "no snapshot schedule")
