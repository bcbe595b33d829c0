"""Hostile input against a real server and real guests (the harness fails any test whose server
logged a traceback or an error: a crashed handler cannot pass unseen).

* exec, cp and stat with what the guest protocol cannot carry: a clear refusal, and the agent
  still serves the next request;
* exec never logs a client's command whole;
* an update's environment is checked as the merge it leaves, and nothing is stored when refused;
* sizes: what the API shows is what QEMU and the disks got (one rounding rule, up to whole MiB);
  memory below the bootable minimum is refused, the minimum boots on both boards, and an
  environment and arguments at their limits boot too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, cast

import pytest
from hypeman import BadRequestError, Hypeman
from hypeman.lib.cp import CopyProtocolError, cp_from_instance
from hypeman.lib.exec import exec as sdk_exec
from hypeman.types import Instance
from websockets.sync.client import connect

from hypemand.api.limits import MAX_AGENT_PAYLOAD_BYTES, MAX_GUEST_ID
from hypemand.images import demo
from hypemand.instances.models import (
    MAX_ARGS_TOTAL_BYTES,
    MAX_ENV,
    MAX_ENV_TOTAL_BYTES,
    MAX_EXEC_STRING_BYTES,
)
from hypemand.instances.validation import MIN_MEMORY
from hypemand.layout import DataLayout
from hypemand.units import format_size
from tests.support.harness import ServerProcess, strict_client

pytestmark = pytest.mark.vm

MiB = 1 << 20
BOOT_WAIT: dict[str, Any] = {"api_timeout": "120s", "timeout": 150}


def _boot(sdk: Hypeman, **fields: Any) -> Instance:
    defaults = {"image": demo.DEMO_NAME, "overlay_size": "64MB", "vcpus": 1}
    created = sdk.instances.create(**{**defaults, **fields})
    waited = sdk.instances.wait(created.id, state="Running", **BOOT_WAIT)
    assert (waited.state, waited.timed_out) == ("Running", False), sdk.instances.get(created.id)
    return sdk.instances.get(created.id)


@pytest.fixture(scope="module")
def running(api: ServerProcess) -> Instance:
    """One guest for the module, its sizes given with fractions on purpose."""
    with strict_client(api) as sdk:
        return _boot(sdk, name="hostile", size="256.4MB", overlay_size="64.5MB")


def _ws(api: ServerProcess, instance: Instance, endpoint: str) -> Any:
    url = f"{api.base_url.replace('http://', 'ws://')}/instances/{instance.id}/{endpoint}"
    return connect(url, additional_headers={"Authorization": f"Bearer {api.token}"})


def _refused_exec(result: Any) -> str:
    assert result.exit_code == 127, result
    text = cast(bytes, result.output).decode()
    assert text.startswith("Error: invalid exec request: "), text
    return text


def _still_serves(sdk: Hypeman, instance: Instance) -> None:
    result = sdk_exec(sdk, instance.id, ["/bin/echo", "still here"])
    assert (result.output, result.exit_code) == (b"still here\n", 0)


# ---- exec, cp, stat ------------------------------------------------------------------------------


def test_stat_of_a_path_with_a_nul_byte_is_400(sdk: Hypeman, running: Instance) -> None:
    with pytest.raises(BadRequestError) as info:
        sdk.instances.stat(running.id, path="/etc\x00passwd")
    assert cast(dict[str, Any], info.value.body)["code"] == "invalid_request"
    assert sdk.instances.stat(running.id, path="/etc").is_dir


def test_exec_requests_the_agent_cannot_carry_are_refused(
    api: ServerProcess, sdk: Hypeman, running: Instance
) -> None:
    over_a_frame = sdk_exec(sdk, running.id, ["/bin/echo", "x" * MAX_AGENT_PAYLOAD_BYTES])
    assert str(MAX_AGENT_PAYLOAD_BYTES) in _refused_exec(over_a_frame)
    too_many = sdk_exec(sdk, running.id, ["/bin/true", *[""] * 65535])
    assert "65535" in _refused_exec(too_many)
    env_name = sdk_exec(sdk, running.id, ["/bin/true"], env={"A=B": "c"})
    assert "env" in _refused_exec(env_name)
    with _ws(api, running, "exec") as ws:
        ws.send(json.dumps({"command": ["/bin/true"], "timeout": 1e308}))
        assert cast(bytes, ws.recv()).decode().startswith("Error: invalid exec request: timeout")
        assert json.loads(ws.recv()) == {"exitCode": 127}
    _still_serves(sdk, running)


def test_cp_requests_the_agent_cannot_carry_are_error_frames(
    api: ServerProcess, sdk: Hypeman, running: Instance, tmp_path: Path
) -> None:
    with _ws(api, running, "cp") as ws:
        ws.send(json.dumps({"direction": "to", "guest_path": "/tmp/owned", "uid": MAX_GUEST_ID + 1}))
        ws.send(b"data")
        ws.send(json.dumps({"type": "end"}))
        reply = json.loads(ws.recv())
    assert reply["type"] == "error" and "uid" in reply["message"], reply
    with pytest.raises(CopyProtocolError, match="invalid cp request: guest_path"):
        cp_from_instance(sdk, running.id, "/etc\x00", tmp_path / "out")
    assert not sdk.instances.stat(running.id, path="/tmp/owned").exists
    _still_serves(sdk, running)


def test_exec_logs_a_bounded_summary_of_the_command(
    api: ServerProcess, sdk: Hypeman, running: Instance
) -> None:
    """Ten commands of 900 KB each (refused: over one agent frame) add a few lines to the log,
    not 9 MB."""
    before = api.log_size()
    for _ in range(10):
        _refused_exec(sdk_exec(sdk, running.id, ["/bin/echo", "y" * 900_000]))
    sdk_exec(sdk, running.id, ["/bin/echo", "z" * 30_000])  # accepted, and logged: cut short
    grown = api.log_size() - before
    assert grown < 20_000, f"the server log grew by {grown} bytes"
    assert "30000 characters" in api.log()[before:]


# ---- update ------------------------------------------------------------------------------------


def test_update_env_is_checked_as_the_merge_it_leaves(sdk: Hypeman, running: Instance) -> None:
    first = {f"A{i}": "v" for i in range(1000)}
    assert len(sdk.instances.update(running.id, env=first).env or {}) >= 1000
    for batch in range(1, 4):
        with pytest.raises(BadRequestError) as info:
            sdk.instances.update(running.id, env={f"B{batch}_{i}": "v" for i in range(1000)})
        body = cast(dict[str, Any], info.value.body)
        assert body["code"] == "invalid_request" and str(MAX_ENV) in body["message"], body
    big = "w" * 100_000
    with pytest.raises(BadRequestError) as info:
        sdk.instances.update(running.id, env={f"C{i}": big for i in range(20)})
    assert str(MAX_ENV_TOTAL_BYTES) in cast(dict[str, Any], info.value.body)["message"]
    stored = sdk.instances.get(running.id).env or {}
    assert set(first) <= set(stored) and not any(key[0] in "BC" for key in stored)


# ---- sizes ---------------------------------------------------------------------------------------


def _qemu_argv(data_dir: Path, instance_id: str) -> list[str]:
    """The command line of the QEMU running in the instance's directory."""
    guest_dir = (data_dir / "guests" / instance_id).resolve()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if Path(os.readlink(proc / "cwd")) != guest_dir:
                continue
            argv = (proc / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "qemu-system" in Path(argv[0]).name:
            return argv
    raise AssertionError(f"no QEMU runs in {guest_dir}")


def test_sizes_shown_are_what_qemu_and_the_disks_got(api: ServerProcess, running: Instance) -> None:
    """256.4MB and 64.5MB round up to whole MiB, are stored so and shown so, and are exactly
    what QEMU was told and what the RAM file and the overlay disk hold."""
    assert (running.size, running.overlay_size) == ("257MB", "65MB")
    argv = _qemu_argv(api.data_dir, running.id)
    assert argv[argv.index("-m") + 1] == "257M"
    paths = DataLayout(api.data_dir).instance(running.id)
    assert paths.memory_file.stat().st_size == 257 * MiB
    assert paths.overlay_disk.stat().st_size == 65 * MiB


def test_memory_below_the_bootable_minimum_is_refused(sdk: Hypeman) -> None:
    with pytest.raises(BadRequestError) as info:
        sdk.instances.create(name="too-small", image=demo.DEMO_NAME, size=f"{(MIN_MEMORY >> 20) - 1}MB")
    body = cast(dict[str, Any], info.value.body)
    assert body["code"] == "invalid_size" and format_size(MIN_MEMORY) in body["message"], body


@pytest.mark.parametrize("board", ["qemu-microvm", "qemu"])
def test_the_minimum_memory_boots(sdk: Hypeman, board: str) -> None:
    instance = _boot(sdk, name=f"smallest-{board}", size=format_size(MIN_MEMORY), hypervisor=board)
    try:
        assert instance.size == format_size(MIN_MEMORY)
        _still_serves(sdk, instance)
    finally:
        sdk.instances.delete(instance.id)


def test_env_and_arguments_at_their_limits_boot(sdk: Hypeman) -> None:
    """The limits are what the guest can take: the program starts (execve in the guest accepts
    the environment and arguments whole) and sees every variable."""
    entry = MAX_ENV_TOTAL_BYTES // MAX_ENV - 1  # "KEY=VALUE" without its NUL
    env = {f"K{i:04d}": "v" * (entry - len("K0000=")) for i in range(MAX_ENV)}
    head = ["/bin/sh", "-c", "exec sleep 100000", "sh"]
    left = MAX_ARGS_TOTAL_BYTES - sum(len(arg) + 1 for arg in head)
    arguments = [*head, "a" * MAX_EXEC_STRING_BYTES, "b" * (left - MAX_EXEC_STRING_BYTES - 2)]
    instance = _boot(sdk, name="largest", size="256MB", env=env, entrypoint=arguments)
    try:
        # The program (sh, which exec'd sleep) got every variable, and so do exec sessions.
        script = ("tr '\\0' '\\n' < /proc/$(pidof sleep)/environ | grep -c '^K[0-9]';"
                  ' echo -n "$K1023" | wc -c')
        shown = sdk_exec(sdk, instance.id, ["/bin/sh", "-c", script])
        assert shown.exit_code == 0, shown
        assert [int(n) for n in shown.output.split()] == [MAX_ENV, entry - len("K0000=")]
        assert sdk.instances.get(instance.id).state == "Running"
    finally:
        sdk.instances.delete(instance.id)
