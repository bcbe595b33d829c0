"""``hypeman`` without VMs: what it imports, its configuration order, its one-line errors, the
formats of results, and the pure parts (instance resolution, option hoisting, durations)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from hypeman_cli.errors import CLIError
from hypeman_cli.main import hoist_global_options
from hypeman_cli.push import split_target
from hypeman_cli.resolve import pick
from hypeman_cli.units import parse_duration
from tests.cli.conftest import HYPEMAN, Cli, assert_ok, assert_one_line_error, cli_for
from tests.support.harness import REPO, Harness, ServerProcess
from tests.support.net import free_port

CLI_PACKAGE = REPO / "src" / "hypeman_cli"
ALLOWED_IMPORTS = {"hypeman", "hypeman_cli", "typer", "rich", "yaml", "httpx", "pathspec"}


@pytest.fixture(scope="module")
def server(module_harness: Harness) -> ServerProcess:
    return module_harness.start()


@pytest.fixture
def cli(server: ServerProcess, tmp_path: Path) -> Cli:
    return cli_for(server, tmp_path / "home")


def test_the_cli_imports_only_the_sdk_typer_rich_yaml_httpx_and_the_standard_library() -> None:
    for path in sorted(CLI_PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in ALLOWED_IMPORTS or top in sys.stdlib_module_names, f"{path.name} imports {name}"
    # And at run time, with the server's package made unimportable, every command still loads.
    probe = ("import sys; sys.modules['hypemand'] = None\n"
             "from hypeman_cli.main import app\n"
             "app(['--help'])\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("run", "ps", "exec", "cp", "push", "snapshot", "image", "standby", "restore", "fork"):
        assert command in result.stdout


def test_help_lists_the_commands_and_subcommands(tmp_path: Path) -> None:
    cli = Cli(tmp_path)
    top = cli.ok("--help").stdout
    for command in ("run", "ps", "inspect", "logs", "exec", "cp", "stats", "wait", "stop", "start", "standby",
                    "restore", "fork", "rm", "pull", "image", "push", "snapshot", "resources", "health"):
        assert f" {command} " in top, command
    assert all(f" {c} " in cli.ok("image", "--help").stdout for c in ("create", "list", "get", "delete"))
    snapshot_help = cli.ok("snapshot", "--help").stdout
    assert all(f" {c} " in snapshot_help for c in ("create", "restore", "list", "get", "delete", "fork"))
    assert cli.ok("--version").stdout.startswith("hypeman ")


def write_config(home: Path, **values: str) -> Path:
    path = home / ".config" / "hypeman" / "cli.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return path


def test_configuration_flag_then_environment_then_cli_yaml(server: ServerProcess, tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_config(home, base_url=server.base_url, api_key=server.token)
    cli = Cli(home)  # no HYPEMAN_* in the environment: everything from cli.yaml
    assert cli.ok("ps").json() == []
    assert cli.ok("health", "--format", "table").stdout == f"ok ({server.base_url})\n"

    dead = f"http://127.0.0.1:{free_port()}"
    from_env = cli.run("ps", env={"HYPEMAN_BASE_URL": dead})  # the environment beats the file
    assert_one_line_error(from_env, f"cannot reach the Hypeman server at {dead}")
    from_flag = cli.run("--base-url", server.base_url, "ps", env={"HYPEMAN_BASE_URL": dead})
    assert assert_ok(from_flag).json() == []  # the flag beats the environment
    after_command = cli.run("ps", "--base-url", server.base_url, env={"HYPEMAN_BASE_URL": dead})
    assert assert_ok(after_command).json() == []  # global options also after the command

    refused = cli.run("ps", env={"HYPEMAN_API_KEY": "not-a-token"})  # the environment's key first
    assert_one_line_error(refused, "unauthorized", "hypemand token")


def test_the_default_base_url_is_the_sdks(tmp_path: Path) -> None:
    result = Cli(tmp_path).run("health", "--format", "table")
    # Something may serve the default port on this machine (make run); either way it was asked.
    assert "http://localhost:4973" in (result.stdout + result.stderr), result


def test_a_missing_key_says_how_to_make_one(tmp_path: Path) -> None:
    result = Cli(tmp_path).run("ps")
    assert_one_line_error(result, "no API key", "HYPEMAN_API_KEY", "cli.yaml", "hypemand token")


def test_an_unreachable_server_is_named_for_every_kind_of_call(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    cli = Cli(tmp_path, {"HYPEMAN_BASE_URL": dead, "HYPEMAN_API_KEY": "k"})
    for args in (["ps"], ["exec", "web", "true"], ["image", "list"], ["health"]):
        assert_one_line_error(cli.run(*args), f"cannot reach the Hypeman server at {dead}")
    layout = tmp_path / "layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "index.json").write_text('{"schemaVersion": 2, "manifests": []}')
    assert_one_line_error(cli.run("push", str(layout), "a/b:c"), "index.json lists no image")


def test_a_broken_cli_yaml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / ".config" / "hypeman" / "cli.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("base_url: [unclosed\n")
    assert_one_line_error(Cli(tmp_path).run("ps"), str(path), "not valid YAML")


def test_api_errors_are_code_and_message_on_one_line(cli: Cli) -> None:
    assert_one_line_error(cli.run("image", "get", "docker.io/nosuch/image:1"), "error: not_found: ")
    assert_one_line_error(cli.run("inspect", "nothing-here"), "instance not found")
    assert_one_line_error(cli.run("ps", "--state", "Sleepy"), "unknown state")
    assert_one_line_error(cli.run("run", "--hypervisor", "bochs", "x"), "unknown hypervisor")
    assert_one_line_error(cli.run("wait", "x", "--state", "Running", "--timeout", "soon"), "not a duration")
    assert_one_line_error(cli.run("rm"), "--all")
    usage = cli.run("--format", "xml", "ps")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr  # a usage error, as click reports it


def test_results_as_json_yaml_or_table(cli: Cli, server: ServerProcess) -> None:
    assert cli.ok("health").json() == {"status": "ok"}
    resources = cli.ok("resources").json()
    assert resources["cpu"]["capacity"] >= 1 and resources["allocations"] == []
    as_yaml = yaml.safe_load(cli.ok("resources", "--format", "yaml").stdout)
    assert as_yaml["cpu"] == resources["cpu"]
    table = cli.ok("resources", "--format", "table").stdout.splitlines()
    assert table[0].split()[:3] == ["RESOURCE", "CAPACITY", "LIMIT"]
    assert [line.split()[0] for line in table[1:]][:2] == ["cpu", "memory"]
    assert cli.ok("image", "list").json() == [] and cli.ok("image", "list", "--format", "table").stdout
    assert cli.ok("ps", "--format", "table").stdout == ""  # nothing running: a note on stderr only


def _item(ident: str, name: str) -> Any:
    return SimpleNamespace(id=ident, name=name)


def _pick(items: list[Any], query: str) -> Any:
    return pick(items, query, "instance", lambda i: i.id, lambda i: i.name)


def test_instance_resolution_id_then_name_then_unique_prefix() -> None:
    items = [_item("abc123", "web"), _item("abd999", "abc123x"), _item("zzz000", "db")]
    assert _pick(items, "abc123").id == "abc123"  # exact id
    assert _pick(items, "db").id == "zzz000"  # exact name
    assert _pick(items, "zz").id == "zzz000"  # unique id prefix
    assert _pick([_item("abc", "x"), _item("other", "abc")], "abc").id == "abc"  # id before name
    with pytest.raises(CLIError, match="ambiguous: it matches abc123 \\(web\\), abd999 \\(abc123x\\)"):
        _pick(items, "ab")
    with pytest.raises(CLIError, match="instance not found"):
        _pick(items, "nope")
    with pytest.raises(CLIError, match="ambiguous"):
        _pick([_item("a1", "same"), _item("b2", "same")], "same")


def test_global_options_are_hoisted_but_never_out_of_an_exec_command() -> None:
    assert hoist_global_options(["ps", "--format", "json", "-a"]) == ["--format", "json", "ps", "-a"]
    assert hoist_global_options(["ps", "--base-url=http://x"]) == ["--base-url=http://x", "ps"]
    assert hoist_global_options(["exec", "-i", "web", "tool", "--format", "x"]) == [
        "exec", "-i", "web", "tool", "--format", "x"]
    assert hoist_global_options(["exec", "--format", "json", "web", "ls"]) == [
        "--format", "json", "exec", "web", "ls"]
    assert hoist_global_options(["logs", "web", "--", "--format"]) == ["logs", "web", "--", "--format"]


def test_durations_and_push_targets() -> None:
    assert parse_duration("90s") == 90 and parse_duration("1m30s") == 90 and parse_duration("5") == 5
    assert parse_duration("1h") == 3600 and parse_duration("250ms") == 0.25
    with pytest.raises(CLIError):
        parse_duration("5 minutes")
    assert split_target("team/app:v1") == ("team/app", "v1", "docker.io/team/app:v1")
    assert split_target("docker.io/demo/busybox") == (
        "demo/busybox", "latest", "docker.io/demo/busybox:latest")
    assert split_target("app") == ("app", "latest", "docker.io/library/app:latest")
    digest = "sha256:" + "a" * 64
    assert split_target(f"team/app@{digest}") == ("team/app", digest, f"docker.io/team/app@{digest}")


def test_the_console_script_is_installed_beside_hypemand() -> None:
    assert HYPEMAN.is_file() and (HYPEMAN.parent / "hypemand").is_file()
