"""An instance's whole life through the official SDK in strict mode, against a real server
process and real VMs: create -> Running -> exec -> cp -> stat -> logs -> stats -> stop -> start
(the overlay's data survives) -> delete; a program that ends at once; a server SIGKILLed and
started again while VMs run; concurrent exec sessions; image content pinned while in use."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from hypeman import Hypeman
from hypeman.lib.cp import cp_from_instance, cp_to_instance
from hypeman.lib.exec import exec as sdk_exec

from hypemand.images import demo
from tests.api.conftest import SMALL
from tests.support.harness import Harness, ServerProcess, strict_client
from tests.support.procs import process_running

pytestmark = pytest.mark.vm

SERVICE = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["echo service-up; while true; do sleep 3600; done"]}


def qemu_pids(data_dir: Path) -> list[int]:
    """QEMU processes whose working directory is an instance directory of ``data_dir``."""
    guests = (data_dir / "guests").resolve()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(f"/proc/{entry.name}/cwd").resolve().parent == guests and \
                    b"qemu-system" in (entry / "cmdline").read_bytes().split(b"\0")[0]:  # QEMU, not its shim
                pids.append(int(entry.name))
        except OSError:
            continue
    return sorted(pids)


def test_the_whole_life_of_an_instance(sdk: Hypeman, api: ServerProcess, tmp_path: Path) -> None:
    created = sdk.instances.create(name="life", image=demo.DEMO_NAME, env={"GREETING": "hello"},
                                   tags={"team": "core"}, **SMALL, **SERVICE)  # type: ignore[arg-type]
    assert created.state in ("Initializing", "Running")
    assert created.size == "256MB" and created.overlay_size == "64MB" and created.vcpus == 1
    assert created.hypervisor == "qemu-microvm"
    assert created.network is not None and created.network.ip and created.network.mac

    waited = sdk.instances.wait(created.id, state="Running", api_timeout="90s")
    assert waited.state == "Running" and not waited.timed_out

    # Found by id, by name and by a unique id prefix; listed with its tag.
    assert sdk.instances.get(created.id).state == "Running"
    assert sdk.instances.get("life").id == created.id
    assert sdk.instances.get(created.id[:10]).id == created.id
    assert [i.id for i in sdk.instances.list(tags={"team": "core"})] == [created.id]
    assert sdk.instances.list(tags={"team": "other"}) == []
    assert created.id in [i.id for i in sdk.instances.list(state="Running")]

    result = sdk_exec(sdk, created.id, ["/bin/sh", "-c", "echo $GREETING; echo err >&2; exit 4"])
    assert result.exit_code == 4
    assert b"hello" in result.output and b"err" in result.output

    local = tmp_path / "payload.bin"
    payload = os.urandom(300_000)
    local.write_bytes(payload)
    local.chmod(0o640)
    cp_to_instance(sdk, created.id, local, "/data/payload.bin")
    info = sdk.instances.stat(created.id, path="/data/payload.bin")
    assert info.exists and info.is_file and info.size == len(payload) and info.mode is not None
    assert info.mode & 0o777 == 0o640
    assert not sdk.instances.stat(created.id, path="/no/such/file").exists
    back = tmp_path / "back"
    back.mkdir()
    cp_from_instance(sdk, created.id, "/data/payload.bin", back)
    assert (back / "payload.bin").read_bytes() == payload

    lines = list(sdk.instances.logs(created.id, tail=200))
    assert any("service-up" in line for line in lines)
    ops = list(sdk.instances.logs(created.id, source="hypeman", tail=50))
    assert any("create" in line for line in ops)

    stats = sdk.instances.stats(created.id)
    assert stats.instance_id == created.id and stats.allocated_vcpus == 1
    assert stats.allocated_memory_bytes == 256 << 20
    assert stats.cpu_seconds > 0 and stats.memory_rss_bytes > 0

    stopped = sdk.instances.stop(created.id)
    assert stopped.state == "Stopped"
    assert stopped.stopped_at is not None
    assert stopped.exit_code == 143, stopped  # the program got SIGTERM from init

    restarted = sdk.instances.start(created.id)
    assert restarted.state in ("Initializing", "Running")
    assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"
    kept = sdk_exec(sdk, created.id, ["/bin/sh", "-c", "md5sum /data/payload.bin | cut -d' ' -f1"])
    assert kept.output.decode().strip() == hashlib.md5(payload).hexdigest()
    phases = sdk.instances.get(created.id).phase_durations_ms or {}
    assert {"initializing", "running", "stopped"} <= set(phases)

    sdk.instances.delete(created.id)
    assert created.id not in [i.id for i in sdk.instances.list()]
    assert not (api.data_dir / "guests" / created.id).exists()
    assert not [pid for pid in qemu_pids(api.data_dir) if _cwd_name(pid) == created.id]


def process_alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie: a QEMU whose server died is re-parented to
    init, which reaps it when it gets to it, not when the test looks."""
    return process_running(pid)


def _cwd_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cwd").resolve().name
    except OSError:
        return ""


def test_a_program_that_exits_at_once_ends_stopped_with_its_exit_code_every_time(sdk: Hypeman) -> None:
    for attempt in range(20):
        name = f"quick-{attempt}"
        created = sdk.instances.create(name=name, image=demo.DEMO_NAME, entrypoint=["/bin/sh", "-c"],
                                       cmd=[f"exit {attempt % 7 + 1}"], **SMALL)  # type: ignore[arg-type]
        waited = sdk.instances.wait(created.id, state="Stopped", api_timeout="90s")
        assert waited.state == "Stopped", (attempt, waited)
        instance = sdk.instances.get(created.id)
        assert instance.exit_code == attempt % 7 + 1, (attempt, instance)
        assert instance.exit_message
        sdk.instances.delete(created.id)


def test_a_missing_command_ends_stopped_with_127(sdk: Hypeman) -> None:
    created = sdk.instances.create(name="nocmd", image=demo.DEMO_NAME, entrypoint=["/no/such/program"],
                                   **SMALL)  # type: ignore[arg-type]
    assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Stopped"
    instance = sdk.instances.get(created.id)
    assert instance.exit_code == 127 and instance.exit_message
    sdk.instances.delete(created.id)


def test_a_vm_killed_outside_the_server_shows_stopped(sdk: Hypeman, api: ServerProcess) -> None:
    created = sdk.instances.create(name="victim", image=demo.DEMO_NAME, **SMALL, **SERVICE)  # type: ignore[arg-type]
    assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"
    (pid,) = [p for p in qemu_pids(api.data_dir) if _cwd_name(p) == created.id]
    os.kill(pid, signal.SIGKILL)
    assert sdk.instances.wait(created.id, state="Stopped", api_timeout="30s").state == "Stopped"
    instance = sdk.instances.get(created.id)
    assert instance.state == "Stopped" and instance.stopped_at is not None
    sdk.instances.delete(created.id)


def test_concurrent_exec_sessions_are_independent(sdk: Hypeman) -> None:
    created = sdk.instances.create(name="busy", image=demo.DEMO_NAME, **SMALL, **SERVICE)  # type: ignore[arg-type]
    assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"

    def run(index: int) -> tuple[int, bytes]:
        script = f"sleep 0.5; echo session-{index}; exit {index}"
        result = sdk_exec(sdk, created.id, ["/bin/sh", "-c", script])
        return result.exit_code, result.output

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(run, range(6)))
    assert results == [(i, f"session-{i}\n".encode()) for i in range(6)]
    sdk.instances.delete(created.id)


def test_logs_follow_streams_new_lines(sdk: Hypeman) -> None:
    created = sdk.instances.create(
        name="ticker", image=demo.DEMO_NAME, entrypoint=["/bin/sh", "-c"],
        cmd=["i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.3; done"], **SMALL,  # type: ignore[arg-type]
    )
    assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"
    seen: list[str] = []
    stream = sdk.instances.logs(created.id, follow=True, tail=1)
    try:
        for line in stream:
            if line.startswith("tick-"):
                seen.append(line)
            if len(seen) >= 4:
                break
    finally:
        stream.response.close()
    numbers = [int(line.split("-")[1]) for line in seen]
    assert numbers == sorted(numbers) and len(set(numbers)) == 4
    sdk.instances.delete(created.id)


def test_an_image_in_use_keeps_its_content_until_the_instance_is_gone(api: ServerProcess) -> None:
    with strict_client(api) as sdk:
        sdk.images.tag(demo.DEMO_NAME, target="docker.io/pinned/busybox:1")
        created = sdk.instances.create(name="pinned", image="docker.io/pinned/busybox:1", **SMALL, **SERVICE)  # type: ignore[arg-type]
        digest = sdk.images.get("docker.io/pinned/busybox:1").digest
        assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"
        sdk.instances.stop(created.id)
        sdk.images.delete("docker.io/pinned/busybox:1")
        # The name is gone, the content stays: the instance starts again on the same disk.
        restarted = sdk.instances.start(created.id)
        assert restarted.image == "docker.io/pinned/busybox:1"
        assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"
        content = api.data_dir / "images" / "content" / digest.removeprefix("sha256:")
        sdk.instances.delete(created.id)
        # Still named by the demo tag: content kept. (Unnamed content is collected; see images tests.)
        assert content.exists()


def test_server_killed_and_started_again_finds_every_vm_in_its_true_state(harness: Harness) -> None:
    server = harness.start()
    data = server.data_dir
    demo.install(server.base_url, server.token, wait_seconds=300)
    with strict_client(server) as sdk:
        running = sdk.instances.create(name="keeps-running", image=demo.DEMO_NAME, **SMALL, **SERVICE)  # type: ignore[arg-type]
        ending = sdk.instances.create(name="ends", image=demo.DEMO_NAME, entrypoint=["/bin/sh", "-c"],
                                      cmd=["sleep 2; exit 9"], **SMALL)  # type: ignore[arg-type]
        assert sdk.instances.wait(running.id, state="Running", api_timeout="90s").state == "Running"
        sdk_exec(sdk, running.id, ["/bin/sh", "-c", "echo kept > /tmp/marker"])
    pids_before = qemu_pids(data)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    # "ends" finishes while no server watches: its QEMU ends once the guest powers off.
    deadline = time.monotonic() + 60
    while any(_cwd_name(pid) == ending.id for pid in qemu_pids(data)):
        assert time.monotonic() < deadline, "the guest of 'ends' did not power off"
        time.sleep(0.1)
    server = harness.start(data, port=server.port)
    with strict_client(server) as sdk:
        by_name = {i.name: i for i in sdk.instances.list()}
        assert set(by_name) == {"keeps-running", "ends"}
        assert by_name["keeps-running"].state == "Running"
        assert by_name["ends"].state == "Stopped" and by_name["ends"].exit_code == 9
        assert qemu_pids(data) == [p for p in pids_before if _cwd_name(p) == running.id]
        marker = sdk_exec(sdk, running.id, ["/bin/cat", "/tmp/marker"])
        assert marker.output == b"kept\n"
        sdk.instances.delete(running.id)
        sdk.instances.delete(ending.id)
    assert qemu_pids(data) == []


def test_ttl_expired_instances_are_deleted(sdk: Hypeman, api: ServerProcess) -> None:
    created = sdk.instances.create(name="brief", image=demo.DEMO_NAME, ttl="3s", **SMALL, **SERVICE)  # type: ignore[arg-type]
    assert created.expires_at is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and created.id in [i.id for i in sdk.instances.list()]:
        time.sleep(0.5)
    assert created.id not in [i.id for i in sdk.instances.list()]
    assert not (api.data_dir / "guests" / created.id).exists()


def test_patch_merges_env_and_sets_expiry(sdk: Hypeman) -> None:
    created = sdk.instances.create(name="patched", image=demo.DEMO_NAME, env={"A": "1"}, **SMALL, **SERVICE)  # type: ignore[arg-type]
    updated = sdk.instances.update(created.id, env={"B": "2"}, ttl="1h")
    assert updated.env == {"A": "1", "B": "2"}
    assert updated.expires_at is not None
    cleared = sdk.instances.update(created.id, ttl="0s")
    assert cleared.expires_at is None
    sdk.instances.delete(created.id)


def test_delete_with_graceful_shutdown_lets_the_program_end(sdk: Hypeman, api: ServerProcess) -> None:
    created = sdk.instances.create(name="graceful", image=demo.DEMO_NAME, **SMALL, **SERVICE)  # type: ignore[arg-type]
    assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"
    sdk.instances.delete(created.id, graceful_shutdown=True)
    assert not (api.data_dir / "guests" / created.id).exists()


def test_list_reads_do_not_wait_for_a_slow_mutation(sdk: Hypeman, api: ServerProcess) -> None:
    """A stop holds the instance's lock for the guest's grace period; reads go on meanwhile. The
    stop writes "stop requested" to the operations log after taking the lock and "stop: <how>"
    before releasing it: a list that answers between the two ran while the lock was held."""
    created = sdk.instances.create(
        name="stubborn", image=demo.DEMO_NAME, entrypoint=["/bin/sh", "-c"],
        cmd=["trap '' TERM; while true; do sleep 1; done"], **SMALL,  # type: ignore[arg-type]
    )
    assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"

    def operations() -> list[str]:
        return [line for line in sdk.instances.logs(created.id, source="hypeman", tail=20) if "stop" in line]

    stopping = threading.Thread(target=lambda: sdk.instances.stop(created.id))
    stopping.start()
    try:
        deadline = time.monotonic() + 30
        while not any("stop requested" in line for line in operations()):
            assert time.monotonic() < deadline, "the stop never began"
        listed = httpx.get(f"{api.base_url}/instances", headers={"Authorization": f"Bearer {api.token}"},
                           timeout=30)
        assert listed.status_code == 200
        assert created.id in [item["id"] for item in json.loads(listed.text)]
        still_locked = operations()
        assert not any("stop: " in line for line in still_locked), (
            f"the stop finished before the list answered, so this proves nothing: {still_locked}"
        )
    finally:
        stopping.join(60)
    assert any("stop: " in line for line in operations())
    assert sdk.instances.get(created.id).state == "Stopped"
    sdk.instances.delete(created.id)


def test_a_vmm_the_last_server_never_recorded_is_ended_at_start(harness: Harness) -> None:
    """The crash window between spawning QEMU and writing vmm.json: the next server finds the
    unrecorded QEMU, ends it, and shows the instance Stopped, never running twice."""
    server = harness.start()
    data = server.data_dir
    demo.install(server.base_url, server.token, wait_seconds=300)
    with strict_client(server) as sdk:
        created = sdk.instances.create(name="unrecorded", image=demo.DEMO_NAME, **SMALL, **SERVICE)  # type: ignore[arg-type]
    (pid,) = [p for p in qemu_pids(data) if _cwd_name(p) == created.id]
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    (data / "guests" / created.id / "vmm.json").unlink()
    server = harness.start(data, port=server.port)
    assert not process_alive(pid), "the unrecorded QEMU was ended"
    assert "orphan" in server.log()
    with strict_client(server) as sdk:
        assert sdk.instances.get(created.id).state == "Stopped"
        sdk.instances.delete(created.id)
