"""``hypeman resources reclaim-memory`` against a real server and its running instance ``web``
(the package's ``vm_env``). What a reclaim does to the guests is tests/api/test_memory_reclaim.py;
here: the flags reach the server, the answer comes back in each format, and bad input is one line.
Nothing is inflated: the other CLI tests share ``web``."""

from __future__ import annotations

import pytest
import yaml

from tests.cli.conftest import INSTANCE_NAME, VmEnv, assert_one_line_error

pytestmark = pytest.mark.vm

MIB = 1 << 20


def test_a_dry_run_plans_and_zero_applies_nothing(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    plan = cli.ok("resources", "reclaim-memory", "--reclaim-bytes", "64MB", "--dry-run",
                  "--hold-for", "1m", "--reason", "cli test").json()
    assert plan["requested_reclaim_bytes"] == 64 * MIB and "hold_until" not in plan
    (web,) = [action for action in plan["actions"] if action["instance_id"] == vm_env.instance_id]
    assert web["instance_name"] == INSTANCE_NAME and web["status"] == "planned"
    assert web["planned_target_guest_memory_bytes"] < web["assigned_memory_bytes"]
    assert web["target_guest_memory_bytes"] == web["previous_target_guest_memory_bytes"]

    # A bare number is bytes; as YAML; as a table for people.
    as_yaml = yaml.safe_load(cli.ok("resources", "reclaim-memory", "--reclaim-bytes", str(32 * MIB),
                                    "--dry-run", "--format", "yaml").stdout)
    assert as_yaml["requested_reclaim_bytes"] == 32 * MIB
    table = cli.ok("resources", "reclaim-memory", "--reclaim-bytes", "64MiB", "--dry-run",
                   "--format", "table").stdout
    assert "planned" in table and INSTANCE_NAME in table and "PLANNED" in table, table

    # Zero applied: nothing was reclaimed, so nothing changes, and no hold is left.
    zero = cli.ok("resources", "reclaim-memory", "--reclaim-bytes", "0").json()
    (web,) = [action for action in zero["actions"] if action["instance_id"] == vm_env.instance_id]
    assert web["status"] == "unchanged" and web["applied_reclaim_bytes"] == 0 and "hold_until" not in zero

    # `resources` alone still shows the resources.
    assert cli.ok("resources").json()["memory"]["capacity"] > 0


def test_bad_input_is_one_line_and_nothing_is_sent(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    lots = cli.run("resources", "reclaim-memory", "--reclaim-bytes", "lots")
    assert_one_line_error(lots, "--reclaim-bytes")
    assert_one_line_error(cli.run("resources", "reclaim-memory", "--reclaim-bytes", "1GiB",
                                  "--hold-for", "soon"), "hold_for")
    missing = cli.run("resources", "reclaim-memory")
    assert missing.returncode != 0 and "--reclaim-bytes" in missing.stderr
