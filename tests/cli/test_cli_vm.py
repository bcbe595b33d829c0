"""The ``hypeman`` executable against a real server and real VMs: push, run, ps, inspect, exec,
cp, logs, stats, wait, rm; a second instance through pull -> run -> stop -> start -> rm; a
``docker save`` archive pushed; standby/restore, snapshots and fork.

One instance (``web``, from ``vm_env``) serves most tests; it prints ``tick N`` every second.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import select
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from tests.cli.conftest import (
    HYPEMAN,
    INSTANCE_NAME,
    SMALL,
    Result,
    VmEnv,
    assert_clean,
    assert_ok,
    assert_one_line_error,
)
from tests.support.oci import run as run_tool
from tests.support.registry import run_registry

pytestmark = pytest.mark.vm


def not_implemented(result: Result) -> bool:
    """True when the server answered 501 for the feature, printed as one clean line (exit 1).

    Standby, restore, snapshots and fork are being built in the server; until a server has them
    the CLI's part is exactly this message. Once the server answers, the tests go on to check the
    real behaviour.
    """
    if "not_implemented" not in result.stderr:
        return False
    assert_one_line_error(result, "not_implemented")
    return True


def test_push_uploads_the_layout_and_waits_until_the_image_is_ready(vm_env: VmEnv) -> None:
    pushed = vm_env.push
    image = pushed.json()  # piped: JSON on stdout, progress on stderr only
    assert image["name"] == "docker.io/demo/busybox:latest" and image["status"] == "ready"
    assert image["size_bytes"] > 0
    assert "pushed docker.io/demo/busybox:latest (sha256:" in pushed.stderr
    assert "demo/busybox:latest: " in pushed.stderr and "/s)" in pushed.stderr  # bytes and speed
    assert "ready (" in pushed.stderr

    listed = vm_env.cli.ok("image", "list").json()
    assert [i["name"] for i in listed] == ["docker.io/demo/busybox:latest"]
    assert vm_env.cli.ok("image", "list", "-q").stdout.split() == ["docker.io/demo/busybox:latest"]
    assert vm_env.cli.ok("image", "get", "docker.io/demo/busybox:latest").json()["status"] == "ready"
    table = vm_env.cli.ok("image", "list", "--format", "table").stdout
    assert table.splitlines()[0].split()[:3] == ["NAME", "STATUS", "SIZE"]

    # Pushing the same image again sends no blob twice (HEAD answers 200) and still ends ready.
    again = vm_env.cli.ok("push", str(vm_env.layout), "demo/busybox:latest")
    assert again.json()["status"] == "ready"


def test_run_shows_create_initializing_running_and_prints_the_instance(vm_env: VmEnv) -> None:
    ran = vm_env.run
    instance = ran.json()
    assert instance["name"] == INSTANCE_NAME and instance["state"] == "Running"
    assert instance["size"] == "256MB" and instance["overlay_size"] == "64MB" and instance["vcpus"] == 1
    assert instance["tags"] == {"team": "cli"} and instance["env"] == {"GREETING": "hello"}
    network = instance["network"]
    assert (network["bandwidth_download"], network["bandwidth_upload"]) == ("100Mbps", "8Mbps")
    assert network["ip"].startswith("10.100.") and network["mac"].startswith("02:00:00:")
    lines = ran.stderr.splitlines()
    created = next(i for i, line in enumerate(lines) if line.startswith(f"{INSTANCE_NAME}: created ("))
    running = lines.index(f"{INSTANCE_NAME}: Running")
    assert created < running
    assert any(line.startswith(f"{INSTANCE_NAME}: Initializing") for line in lines[created:running]), ran


def test_ps_prints_json_when_piped_and_a_table_when_asked(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    listed = cli.ok("ps")
    rows = json.loads(listed.stdout)
    assert [(r["id"], r["name"], r["state"]) for r in rows] == [
        (vm_env.instance_id, INSTANCE_NAME, "Running")]
    assert listed.stderr == ""

    table = cli.ok("ps", "--format", "table").stdout.splitlines()
    assert table[0].split()[:4] == ["INSTANCE", "ID", "NAME", "IMAGE"]
    assert table[1].split()[:4] == [vm_env.instance_id[:12], INSTANCE_NAME, "docker.io/demo/busybox:latest",
                                    "Running"]
    assert table[1].split()[5] == rows[0]["network"]["ip"]  # the VM's address on the bridge
    # Either position of --format: the same columns (their widths follow the rows, and a
    # row's "created" age may have grown a character between the two calls).
    assert cli.ok("--format", "table", "ps").stdout.splitlines()[0].split() == table[0].split()

    assert yaml.safe_load(cli.ok("ps", "--format", "yaml").stdout)[0]["id"] == vm_env.instance_id
    assert cli.ok("ps", "-q").stdout.split() == [vm_env.instance_id]
    assert cli.ok("ps", "-q", "--tag", "team=cli").stdout.split() == [vm_env.instance_id]
    assert cli.ok("ps", "-q", "--tag", "team=other").stdout == ""
    assert cli.ok("ps", "--state", "Stopped").json() == []
    assert vm_env.instance_id in cli.ok("ps", "-a", "-q").stdout.split()


def test_inspect_finds_an_instance_by_id_name_or_id_prefix(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    for query in (vm_env.instance_id, INSTANCE_NAME, vm_env.instance_id[:8]):
        assert cli.ok("inspect", query).json()["id"] == vm_env.instance_id
    assert cli.ok("inspect", INSTANCE_NAME).json()["env"] == {"GREETING": "<hidden: --show-env>"}
    assert cli.ok("inspect", "--show-env", INSTANCE_NAME).json()["env"] == {"GREETING": "hello"}
    fields = cli.ok("inspect", INSTANCE_NAME, "--format", "table").stdout
    assert fields.splitlines()[0].split() == ["FIELD", "VALUE"] and vm_env.instance_id in fields
    assert_one_line_error(cli.run("inspect", "no-such-instance"), "instance not found", "no-such-instance")


def test_exec_passes_output_and_exit_status_through(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    result = cli.run("exec", INSTANCE_NAME, "--", "/bin/sh", "-c", "echo $GREETING; echo err >&2; exit 4")
    assert result.returncode == 4, result
    assert_clean(result)
    assert result.stdout.splitlines() == ["hello", "err"]  # no TTY: stderr merged in order

    # A piped command on stdin (-i): the shell reads it and ends with its own exit.
    piped = cli.run("exec", "-i", INSTANCE_NAME, "/bin/sh", input="echo piped-$((6*7))\nexit 5\n")
    assert piped.returncode == 5, piped
    assert piped.stdout == "piped-42\n", piped

    env_cwd = cli.ok("exec", "-e", "A=b", "--cwd", "/www", INSTANCE_NAME, "sh", "-c", "pwd; echo $A")
    assert env_cwd.stdout.splitlines() == ["/www", "b"]
    assert "root:x:0:0" in cli.ok("exec", INSTANCE_NAME, "cat", "/etc/passwd").stdout


def test_cp_copies_files_and_directories_both_ways(vm_env: VmEnv, tmp_path: Path) -> None:
    cli = vm_env.cli
    payload = os.urandom(300_000)
    local = tmp_path / "payload.bin"
    local.write_bytes(payload)
    sent = cli.ok("cp", str(local), f"{INSTANCE_NAME}:/tmp/cli-payload.bin")
    assert "300.0 kB" in sent.stderr and "/s)" in sent.stderr  # bytes and speed, on stderr
    remote_md5 = cli.ok("exec", INSTANCE_NAME, "md5sum", "/tmp/cli-payload.bin").stdout.split()[0]
    assert remote_md5 == hashlib.md5(payload).hexdigest()

    back = tmp_path / "back.bin"  # a new name: the destination is the file
    cli.ok("cp", f"{vm_env.instance_id[:10]}:/tmp/cli-payload.bin", str(back))
    assert back.read_bytes() == payload

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("a\n")
    (tree / "b.txt").write_text("b\n")
    cli.ok("cp", "-a", str(tree), f"{INSTANCE_NAME}:/tmp/")  # an existing directory: copied inside
    listing = cli.ok("exec", INSTANCE_NAME, "find", "/tmp/tree", "-type", "f").stdout.split()
    assert sorted(listing) == ["/tmp/tree/b.txt", "/tmp/tree/sub/a.txt"]
    into = tmp_path / "into"
    into.mkdir()
    cli.ok("cp", f"{INSTANCE_NAME}:/tmp/tree", str(into))
    assert (into / "tree" / "sub" / "a.txt").read_text() == "a\n"
    assert (into / "tree" / "b.txt").read_text() == "b\n"

    assert_one_line_error(cli.run("cp", f"{INSTANCE_NAME}:/no/such/file", str(tmp_path / "x")),
                          "no such file or directory in the instance")
    assert_one_line_error(cli.run("cp", str(local), str(tmp_path / "y")), "exactly one of the two paths")


def _tick(line: str) -> int | None:
    parts = line.split()
    return int(parts[1]) if len(parts) == 2 and parts[0] == "tick" and parts[1].isdigit() else None


def test_logs_tail_source_and_follow(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    lines = cli.ok("logs", INSTANCE_NAME, "--tail", "100000").stdout.splitlines()
    assert "service-up" in lines
    ticks = [t for t in map(_tick, lines) if t is not None]
    assert ticks, lines
    last = cli.ok("logs", INSTANCE_NAME, "--tail", "3").stdout.splitlines()
    assert len(last) == 3
    operations = cli.ok("logs", "-s", "hypeman", INSTANCE_NAME).stdout
    assert "create" in operations

    # -f: lines keep coming after the tail; Ctrl-C (SIGINT) ends it quietly with status 130.
    follower = subprocess.Popen([str(HYPEMAN), "logs", "-f", "--tail", "1", INSTANCE_NAME],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env=cli.environment())
    try:
        seen: list[int] = []
        buffer = b""
        assert follower.stdout is not None
        deadline = time.monotonic() + 60
        while len(seen) < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([follower.stdout], [], [], 1)
            if not ready:
                continue
            chunk = os.read(follower.stdout.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            seen += [t for t in (_tick(c.decode()) for c in complete) if t is not None]
        assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] > seen[0], seen
        follower.send_signal(signal.SIGINT)
        _, stderr = follower.communicate(timeout=20)
        assert follower.returncode == 130 and b"Traceback" not in stderr, stderr
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


def test_stats_and_wait(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    stats = cli.ok("stats", INSTANCE_NAME).json()
    assert stats["instance_id"] == vm_env.instance_id
    assert stats["allocated_vcpus"] == 1 and stats["allocated_memory_bytes"] == 256 << 20
    assert "268.4 MB" in cli.ok("stats", INSTANCE_NAME, "--format", "table").stdout

    waited = cli.ok("wait", INSTANCE_NAME, "--state", "Running", "--timeout", "5s").json()
    assert waited["state"] == "Running" and waited["timed_out"] is False
    timed_out = cli.run("wait", INSTANCE_NAME, "--state", "Stopped", "--timeout", "1s")
    assert timed_out.returncode == 1 and timed_out.json()["timed_out"] is True, timed_out


def test_rm_refuses_a_running_instance_without_force(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    refused = cli.run("rm", INSTANCE_NAME)
    assert_one_line_error(refused, f"instance {INSTANCE_NAME}", "is Running", "rm -f")
    assert refused.json() == []
    assert cli.ok("ps", "-q").stdout.split() == [vm_env.instance_id]
    assert_one_line_error(cli.run("rm"), "--all")


def test_pull_run_stop_start_and_rm_a_second_instance(vm_env: VmEnv, tmp_path: Path) -> None:
    """The image comes from a registry the server pulls from: ``run`` finds it missing (404),
    asks for a pull and shows it, then creates; the instance is stopped, started and removed."""
    cli = vm_env.cli
    with run_registry(tmp_path / "registry") as registry:
        for tag in ("v2", "v3"):
            run_tool("skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
                     f"oci:{vm_env.layout}:latest", f"docker://{registry.host}/demo/busybox:{tag}")
        pulled = cli.ok("pull", f"{registry.host}/demo/busybox:v3")
        image = pulled.json()
        assert image["name"] == f"{registry.host}/demo/busybox:v3" and image["status"] == "ready"
        assert "ready (" in pulled.stderr and "MB)" in pulled.stderr

        ran = cli.ok("run", "--name", "second", *SMALL, f"{registry.host}/demo/busybox:v2",
                     "--format", "table")
    second_id = ran.stdout.strip()  # table format: just the id, as the Go CLI prints
    assert len(second_id) == 24 and second_id.isalnum(), ran
    phases = ran.stderr.splitlines()
    assert phases[0] == f"{registry.host}/demo/busybox:v2: requesting a pull", ran
    assert any(line.startswith(f"{registry.host}/demo/busybox:v2: ready (") for line in phases), ran
    assert phases[-1] == "second: Running", ran

    stopped = cli.ok("stop", "second").json()
    assert stopped["state"] == "Stopped" and stopped["id"] == second_id
    assert_one_line_error(cli.run("exec", "second", "true"), "second")  # the exec upgrade is refused
    assert cli.ok("ps", "--state", "Stopped", "-q").stdout.split() == [second_id]
    assert cli.ok("rm", "second").json() == [second_id]  # a stopped instance needs no -f

    again = cli.ok("run", "-d", "--name", "third", *SMALL, "docker.io/demo/busybox:latest").json()
    assert again["state"] in ("Created", "Initializing", "Running")
    cli.ok("stop", "third")
    started = cli.ok("start", "third").json()
    assert started["state"] in ("Initializing", "Running")
    assert cli.ok("wait", "third", "--state", "Running", "--timeout", "120s").json()["state"] == "Running"
    assert cli.ok("exec", "third", "echo", "again").stdout == "again\n"
    assert_one_line_error(cli.run("rm", "third"), "is Running")
    assert cli.ok("rm", "-f", "third").json() == [again["id"]]
    remaining = cli.ok("ps", "-a", "-q").stdout.split()
    assert second_id not in remaining and again["id"] not in remaining


def docker_save_archive(layout: Path, destination: Path, repo_tag: str) -> Path:
    """The demo layout rewritten in the older ``docker save`` format: manifest.json,
    ``<id>.json`` config and uncompressed ``<id>/layer.tar`` layers."""
    blobs = layout / "blobs" / "sha256"
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_bytes())
    config = (blobs / manifest["config"]["digest"][7:]).read_bytes()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    members: dict[str, bytes] = {config_name: config}
    layers = []
    for layer in manifest["layers"]:
        data = gzip.decompress((blobs / layer["digest"][7:]).read_bytes())
        name = f"{hashlib.sha256(data).hexdigest()}/layer.tar"
        members[name] = data
        layers.append(name)
    members["manifest.json"] = json.dumps([{"Config": config_name, "RepoTags": [repo_tag],
                                            "Layers": layers}]).encode()
    with tarfile.open(destination, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return destination


def test_push_a_docker_save_archive_under_the_name_it_records(vm_env: VmEnv, tmp_path: Path) -> None:
    archive = docker_save_archive(vm_env.layout, tmp_path / "saved.tar", "team/saved:v1")
    pushed = vm_env.cli.ok("push", str(archive))
    assert pushed.json()["name"] == "docker.io/team/saved:v1" and pushed.json()["status"] == "ready"
    assert_one_line_error(vm_env.cli.run("push", str(tmp_path)), "not an OCI image layout")


def test_push_an_oci_layout_packed_in_a_tar(vm_env: VmEnv, tmp_path: Path) -> None:
    """As ``docker save`` writes since Docker 25: the layout's files in one tar."""
    packed = tmp_path / "layout.tar"
    with tarfile.open(packed, "w") as archive:
        for path in sorted(vm_env.layout.rglob("*")):
            archive.add(path, arcname=str(path.relative_to(vm_env.layout)), recursive=False)
    # The layout names its image only "latest": no full name to push it under.
    assert_one_line_error(vm_env.cli.run("push", str(packed)), "records no image name")
    pushed = vm_env.cli.ok("push", f"{packed}:latest", "team/packed:v1")  # PATH:NAME picks the image
    assert pushed.json()["name"] == "docker.io/team/packed:v1" and pushed.json()["status"] == "ready"


def test_standby_and_restore(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    standby = cli.run("standby", INSTANCE_NAME)
    if not_implemented(standby):
        return
    assert_ok(standby)
    assert standby.json()["state"] == "Standby"
    assert cli.ok("ps", "--state", "Standby", "-q").stdout.split() == [vm_env.instance_id]
    assert_one_line_error(cli.run("exec", INSTANCE_NAME, "true"))
    restored = cli.ok("restore", INSTANCE_NAME).json()
    assert restored["state"] == "Running"
    assert cli.ok("exec", INSTANCE_NAME, "echo", "awake").stdout == "awake\n"


def test_snapshot_create_list_get_fork_and_delete(vm_env: VmEnv) -> None:
    cli = vm_env.cli
    created = cli.run("snapshot", "create", INSTANCE_NAME, "--name", "cli-snap", "--compression-enabled",
                      "--compression-algorithm", "zstd", "--wait")
    if not_implemented(created):
        assert not_implemented(cli.run("snapshot", "list"))
        assert not_implemented(cli.run("fork", INSTANCE_NAME, "web-copy", "--from-running"))
        return
    assert_ok(created)
    snapshot = created.json()
    assert snapshot["name"] == "cli-snap" and snapshot["source_instance_id"] == vm_env.instance_id
    assert snapshot["compression_state"] == "compressed", created
    assert "compressed (" in created.stderr
    assert cli.ok("snapshot", "list", "-q").stdout.split() == [snapshot["id"]]
    of_web = cli.ok("snapshot", "list", "--source-instance", INSTANCE_NAME).json()
    assert [s["name"] for s in of_web] == ["cli-snap"]
    assert cli.ok("snapshot", "get", "cli-snap").json()["id"] == snapshot["id"]
    assert cli.ok("snapshot", "list", "--format", "table").stdout.splitlines()[0].split()[:3] == [
        "SNAPSHOT", "ID", "NAME"]
    assert cli.ok("ps", "-q").stdout.split() == [vm_env.instance_id]  # the source runs on

    forked = cli.ok("snapshot", "fork", "cli-snap", "from-snap").json()
    assert forked["name"] == "from-snap" and forked["state"] in ("Initializing", "Running")
    cli.ok("wait", "from-snap", "--state", "Running", "--timeout", "120s")
    assert cli.ok("exec", "from-snap", "sh", "-c", "echo $GREETING").stdout == "hello\n"
    cli.ok("rm", "-f", "from-snap")

    copy = cli.ok("fork", INSTANCE_NAME, "web-copy", "--from-running", "--target-state", "Stopped").json()
    assert copy["name"] == "web-copy" and copy["state"] == "Stopped"
    cli.ok("rm", "web-copy")
    assert cli.ok("snapshot", "delete", "cli-snap").json() == [snapshot["id"]]
    assert cli.ok("snapshot", "list").json() == []
    assert cli.ok("exec", INSTANCE_NAME, "echo", "still-here").stdout == "still-here\n"
