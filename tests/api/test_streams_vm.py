"""The streams routes against a real booted guest, driven by the official SDK in strict mode.

One VM serves the module (boots are expensive on 2 shared cores). The API is the streams router
in a small app served by uvicorn (``websockets-sansio``, as the daemon runs it) on the module's
event loop, with an ``InstanceStreams`` stand-in over the guest's agent and log files; the sync
SDK runs in worker threads.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest
import pytest_asyncio
from hypeman import BadRequestError, ConflictError, Hypeman, NotFoundError
from hypeman.lib.cp import CopyProtocolError, cp_from_instance, cp_to_instance
from hypeman.lib.exec import exec as sdk_exec
from hypeman.types import PathInfo
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from hypemand.auth import mint_token
from hypemand.guest.config_disk import GuestConfig
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.instances.boot import RunningGuest
from hypemand.system.files import SystemFiles
from tests.api.streams_support import SECRET, FakeInstances, build_app, serve_app
from tests.support.guest import (
    accel_cache_dir,
    booted_guest,
    busybox_ext4,
    busybox_tree,
    guest_spec,
    system_files,
)

__all__ = ["accel_cache_dir", "busybox_ext4", "busybox_tree", "system_files"]

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

INSTANCE = "inst-1"
T = TypeVar("T")


@dataclass
class Api:
    base_url: str
    token: str
    vm: RunningGuest
    hypeman_log: Path

    def sdk(self) -> Hypeman:
        return Hypeman(base_url=self.base_url, api_key=self.token, max_retries=0,
                       _strict_response_validation=True)

    async def call(self, work: Callable[[Hypeman], T]) -> T:
        """Run a sync SDK call in a thread: the server runs on this test's event loop."""

        def run() -> T:
            with self.sdk() as sdk:
                return work(sdk)

        return await asyncio.to_thread(run)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(
    accel_cache_dir: Path,
    system_files: SystemFiles,
    busybox_ext4: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RunningGuest]:
    spec = guest_spec(
        tmp_path_factory.mktemp("streams-vm") / "vm",
        busybox_ext4,
        GuestConfig(cmd=["/bin/sleep", "100000"], env={"PATH": "/bin"}),
        network=False,
    )
    async with booted_guest(QemuHypervisor(state_dir=accel_cache_dir), system_files, spec) as guest:
        yield guest


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(vm: RunningGuest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    logs = tmp_path_factory.mktemp("streams-logs")
    instances = FakeInstances(
        agents={INSTANCE: vm.agent},
        states={"stopped-1": "Stopped"},
        logs={INSTANCE: {
            "app": vm.handle.console_log_path,
            "vmm": logs / "vmm-not-written-yet.log",
            "hypeman": logs / "hypeman.log",
        }},
    )
    async with serve_app(build_app(instances)) as base_url:
        yield Api(base_url, mint_token(SECRET), vm, logs / "hypeman.log")


# --- exec ---------------------------------------------------------------------------------------


async def test_exec_merges_output_and_reports_the_exit_code(api: Api) -> None:
    command = ["sh", "-c", "echo out; echo err >&2; exit 3"]
    result = await api.call(lambda sdk: sdk_exec(sdk, INSTANCE, command))
    assert (result.output, result.exit_code) == (b"out\nerr\n", 3)


async def test_exec_stdin_round_trip(api: Api) -> None:
    data = os.urandom(256 * 1024)
    # No stdin EOF exists in the protocol: the command stops after reading what it expects.
    result = await api.call(lambda sdk: sdk_exec(sdk, INSTANCE, ["head", "-c", str(len(data))], stdin=data))
    assert result.exit_code == 0
    assert result.output == data


async def test_exec_env_and_cwd(api: Api) -> None:
    result = await api.call(lambda sdk: sdk_exec(
        sdk, INSTANCE, ["sh", "-c", 'echo "$GREETING"; pwd'], env={"GREETING": "hi there"}, cwd="/tmp"
    ))
    assert (result.output, result.exit_code) == (b"hi there\n/tmp\n", 0)


async def test_exec_tty_size_and_resize(api: Api) -> None:
    initial = await api.call(
        lambda sdk: sdk_exec(sdk, INSTANCE, ["stty", "size"], tty=True, rows=30, cols=100)
    )
    assert (initial.output, initial.exit_code) == (b"30 100\r\n", 0)
    # The resize frame follows the request at once; the command waits until it has applied.
    wait_for_resize = 'while [ "$(stty size)" != "50 120" ]; do sleep 0.1; done; stty size; tty'
    resized = await api.call(lambda sdk: sdk_exec(
        sdk, INSTANCE, ["sh", "-c", wait_for_resize], tty=True, resize=[(50, 120)], timeout=60
    ))
    assert resized.exit_code == 0, resized
    assert resized.output.startswith(b"50 120\r\n/dev/pts/")


async def test_exec_without_command_runs_a_shell_reading_stdin(api: Api) -> None:
    """The CLI's plain ``exec``: no command means /bin/sh; text frames are stdin too."""
    headers = {"Authorization": f"Bearer {api.token}"}
    async with connect(f"{api.base_url.replace('http', 'ws')}/instances/{INSTANCE}/exec",
                       additional_headers=headers) as ws:
        await ws.send(json.dumps({"tty": False}))
        await ws.send("echo from-text-frame\n")
        await ws.send(b"exit 5\n")
        output = b""
        while isinstance(frame := await ws.recv(), bytes):
            output += frame
    assert output == b"from-text-frame\n"
    assert json.loads(frame) == {"exitCode": 5}


async def test_exec_of_a_missing_program(api: Api) -> None:
    result = await api.call(lambda sdk: sdk_exec(sdk, INSTANCE, ["no-such-program"]))
    assert result.exit_code == 127
    assert result.output.startswith(b"Error: ") and result.output.endswith(b"\r\n")


async def test_exec_timeout_kills_the_command(api: Api) -> None:
    started = time.monotonic()
    result = await api.call(lambda sdk: sdk_exec(sdk, INSTANCE, ["sleep", "60"], timeout=1))
    assert result.exit_code == 128 + 9  # SIGKILL, as the agent reports it
    assert time.monotonic() - started < 30


async def test_client_leaving_kills_the_command(api: Api) -> None:
    headers = {"Authorization": f"Bearer {api.token}"}
    async with connect(f"{api.base_url.replace('http', 'ws')}/instances/{INSTANCE}/exec",
                       additional_headers=headers) as ws:
        await ws.send(json.dumps({"command": ["sh", "-c", "echo $$; exec sleep 1000"]}))
        pid = int(cast(bytes, await ws.recv()))
    for _ in range(100):
        if (await api.vm.agent.run(["kill", "-0", str(pid)])).exit_code != 0:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the command outlived its client")


async def test_exec_refused_before_the_upgrade(api: Api) -> None:
    def refused(ref: str) -> tuple[int, Any]:
        with api.sdk() as sdk, pytest.raises(InvalidStatus) as info:
            sdk_exec(sdk, ref, ["true"])
        response = info.value.response
        return response.status_code, json.loads(response.body or b"{}")["code"]

    assert await asyncio.to_thread(refused, "unknown") == (404, "not_found")
    assert await asyncio.to_thread(refused, "stopped-1") == (409, "invalid_state")


# --- stat ---------------------------------------------------------------------------------------


async def test_stat(api: Api) -> None:
    agent = api.vm.agent
    await agent.put_file("/tmp/stat/file.txt", b"12345", mode=0o640)
    await agent.symlink("file.txt", "/tmp/stat/link")

    def stats(sdk: Hypeman) -> dict[str, PathInfo]:
        return {
            "file": sdk.instances.stat(INSTANCE, path="/tmp/stat/file.txt"),
            "dir": sdk.instances.stat(INSTANCE, path="/tmp/stat"),
            "link": sdk.instances.stat(INSTANCE, path="/tmp/stat/link"),
            "followed": sdk.instances.stat(INSTANCE, path="/tmp/stat/link", follow_links=True),
            "missing": sdk.instances.stat(INSTANCE, path="/tmp/stat/missing"),
        }

    found = await api.call(stats)
    assert found["file"].model_dump(exclude_none=True) == {
        "exists": True, "is_dir": False, "is_file": True, "is_symlink": False, "mode": 0o640, "size": 5
    }
    assert found["dir"].exists and found["dir"].is_dir and not found["dir"].is_file
    link, followed = found["link"], found["followed"]
    assert (link.is_symlink, link.link_target, link.is_file) == (True, "file.txt", False)
    assert (followed.is_file, followed.size, followed.is_symlink) == (True, 5, False)
    assert (found["missing"].exists, found["missing"].error) == (False, None)


async def test_stat_refusals(api: Api) -> None:
    def stopped(sdk: Hypeman) -> Any:
        with pytest.raises(ConflictError) as info:
            sdk.instances.stat("stopped-1", path="/")
        return info.value.body

    assert cast(dict[str, Any], await api.call(stopped))["code"] == "invalid_state"
    headers = {"Authorization": f"Bearer {api.token}"}
    async with httpx.AsyncClient(base_url=api.base_url, headers=headers) as client:
        response = await client.get(f"/instances/{INSTANCE}/stat")
    assert response.status_code == 400 and set(response.json()) == {"code", "message"}


# --- cp -----------------------------------------------------------------------------------------


async def test_cp_file_both_ways_is_byte_identical_and_keeps_its_mode(api: Api, tmp_path: Path) -> None:
    source = tmp_path / "data.bin"
    data = os.urandom((2 << 20) + 12_345)  # beyond the agent's flow-control window; a short last chunk
    source.write_bytes(data)
    source.chmod(0o640)
    await api.call(lambda sdk: cp_to_instance(sdk, INSTANCE, source, "/tmp/cp-file/data.bin"))
    digest = await api.vm.agent.run(["md5sum", "/tmp/cp-file/data.bin"])
    assert digest.stdout.split()[0].decode() == hashlib.md5(data).hexdigest()
    info = await api.call(lambda sdk: sdk.instances.stat(INSTANCE, path="/tmp/cp-file/data.bin"))
    assert (info.size, info.mode) == (len(data), 0o640)

    back = tmp_path / "back"
    await api.call(lambda sdk: cp_from_instance(sdk, INSTANCE, "/tmp/cp-file/data.bin", back))
    assert (back / "data.bin").read_bytes() == data
    assert stat.S_IMODE((back / "data.bin").stat().st_mode) == 0o640


async def test_cp_empty_file(api: Api, tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    await api.call(lambda sdk: cp_to_instance(sdk, INSTANCE, tmp_path / "empty", "/tmp/cp-empty/empty"))
    await api.call(lambda sdk: cp_from_instance(sdk, INSTANCE, "/tmp/cp-empty/empty", tmp_path / "back"))
    assert (tmp_path / "back/empty").read_bytes() == b""


async def test_cp_tree_with_a_symlink_both_ways(api: Api, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"A" * 10)
    (tree / "sub/b.bin").write_bytes(os.urandom(70_000))
    (tree / "sub").chmod(0o750)
    (tree / "to-a").symlink_to("a.txt")
    await api.call(lambda sdk: cp_to_instance(sdk, INSTANCE, tree, "/tmp/cp-tree/up"))

    agent = api.vm.agent
    assert await agent.read_file("/tmp/cp-tree/up/sub/b.bin") == (tree / "sub/b.bin").read_bytes()
    assert (await agent.stat("/tmp/cp-tree/up/sub")).mode == 0o750
    # The upload protocol has no symlink entry: the SDK sends a file link as the file it names.
    assert await agent.read_file("/tmp/cp-tree/up/to-a", follow_links=False) == b"A" * 10
    await agent.symlink("a.txt", "/tmp/cp-tree/up/guest-link")

    await api.call(lambda sdk: cp_from_instance(sdk, INSTANCE, "/tmp/cp-tree/up", tmp_path / "down"))
    down = tmp_path / "down/up"
    assert sorted(str(p.relative_to(down)) for p in down.rglob("*")) == [
        "a.txt", "guest-link", "sub", "sub/b.bin", "to-a"
    ]
    assert (down / "sub/b.bin").read_bytes() == (tree / "sub/b.bin").read_bytes()
    assert os.readlink(down / "guest-link") == "a.txt"
    assert stat.S_IMODE((down / "sub").stat().st_mode) == 0o750


async def test_cp_errors(api: Api, tmp_path: Path) -> None:
    def missing(sdk: Hypeman) -> str:
        with pytest.raises(CopyProtocolError) as info:
            cp_from_instance(sdk, INSTANCE, "/tmp/no/such/path", tmp_path / "out")
        return str(info.value)

    assert (await api.call(missing)).startswith("copy failed")
    (tmp_path / "f").write_bytes(b"x" * 100_000)

    def unwritable(sdk: Hypeman) -> str:
        with pytest.raises(CopyProtocolError) as info:
            cp_to_instance(sdk, INSTANCE, tmp_path / "f", "/proc/version/under-a-file")
        return str(info.value)

    assert (await api.call(unwritable)).startswith("copy failed")
    # The connection is fine afterwards.
    assert (await api.vm.agent.run(["true"])).exit_code == 0


# --- logs ---------------------------------------------------------------------------------------


async def test_logs_tail(api: Api) -> None:
    api.hypeman_log.write_bytes(b"".join(b"op %d\r\n" % i for i in range(500)) + b"op partial")
    hypeman_tail = await api.call(lambda sdk: list(sdk.instances.logs(INSTANCE, source="hypeman", tail=3)))
    assert hypeman_tail == ["op 498", "op 499", "op partial"]

    console_tail = await api.call(lambda sdk: list(sdk.instances.logs(INSTANCE, tail=5)))
    console_text = api.vm.handle.console_log_path.read_text(errors="replace")
    console_lines = [line.rstrip("\r") for line in console_text.split("\n")][:-1]  # complete lines
    # A quiet boot logs only a few lines; the guest may add one meanwhile, so look for a window.
    assert len(console_tail) == min(5, len(console_lines))
    assert any(console_lines[i : i + 5] == console_tail for i in range(len(console_lines))), console_tail
    assert any("HYPEMAN-PROGRAM-START" in line for line in await api.call(
        lambda sdk: list(sdk.instances.logs(INSTANCE, tail=1000))
    ))


async def test_logs_follow_sees_guest_and_appended_lines(api: Api) -> None:
    marker = f"follow-{os.getpid()}-{time.monotonic_ns()}"
    seen: list[str] = []
    done = threading.Event()
    with api.sdk() as sdk:
        stream = await asyncio.to_thread(lambda: sdk.instances.logs(INSTANCE, follow=True, tail=0))

        def read() -> None:
            try:
                for line in stream:
                    seen.append(line)
                    if f"host {marker}" in seen and f"guest {marker}" in seen:
                        return
            except httpx.HTTPError:
                pass  # closed from outside after a failure
            finally:
                done.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            # The guest writes to its serial console (the app log) ...
            await api.vm.agent.run(["sh", "-c", f"echo guest {marker} > /dev/console"])
            # ... and a line appended on the host side (the console file is opened O_APPEND).
            with api.vm.handle.console_log_path.open("a") as console:
                console.write(f"host {marker}\n")
            for _ in range(300):
                if done.is_set():
                    break
                await asyncio.sleep(0.1)
        finally:
            stream.close()
            await asyncio.to_thread(reader.join, 10)
    assert f"guest {marker}" in seen and f"host {marker}" in seen, seen[-20:]
    assert not any(line.endswith("\r") for line in seen)


async def test_logs_errors(api: Api) -> None:
    def errors(sdk: Hypeman) -> list[tuple[int, str]]:
        found = []
        for call in (
            lambda: sdk.instances.logs("unknown"),
            lambda: sdk.instances.logs(INSTANCE, source="vmm"),
            lambda: sdk.instances.logs(INSTANCE, source=cast(Any, "bogus")),
        ):
            try:
                call()
            except (NotFoundError, BadRequestError) as exc:
                found.append((exc.status_code, cast(dict[str, Any], exc.body)["code"]))
        return found

    assert await api.call(errors) == [(404, "not_found"), (404, "log_not_found"), (400, "invalid_request")]
