"""Faults around standby, stored snapshots, compression and fork, through a real `hypemand serve`
process and the official SDK in strict mode.

* Disk full: a snapshot whose copy fills the server's file system (a loop-mounted ext4) fails in
  the ``{code, message}`` shape, the source keeps running, nothing partial remains, and a
  snapshot succeeds once there is room again.
* SIGKILL: the server is killed while it puts a VM in standby, copies a Running source into a
  snapshot, forks, or compresses, at blind delays and at moments observed on disk (a copy's
  temporary file, a fork's staging directory, a fork's new VMM), then started again on the same
  data directory. Whatever phase the kill hit, :func:`check_world` must hold: no half-made
  snapshot or fork, the source in exactly one true state with its processes, memory and files
  intact, no QEMU the server does not list.
* Corrupt files: truncated or altered snapshot files are refused at restore and at fork (409
  ``snapshot_corrupt``) and nothing is started or left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypeman import APIStatusError, ConflictError, Hypeman
from hypeman.lib.exec import exec as sdk_exec

from hypemand.images import demo
from hypemand.savedvm.sparse import copy_sparse, data_extents
from tests.support.harness import Harness, ServerProcess, shared_harness, strict_client
from tests.support.smallfs import fill, mounted_ext4

pytestmark = pytest.mark.vm

# The source: a counting process (see test_snapshots.py) and memory worth copying: FILL_MB of
# guest tmpfs made of one random MiB repeated, so that a copy takes a moment while zstd (which
# finds the repeats) still gets through it.
SOURCE_NAME = "source"
SOURCE_SHAPE = {"size": "512MB", "overlay_size": "64MB", "vcpus": 1}
COUNTER = {
    "entrypoint": ["/bin/sh", "-c"],
    "cmd": ["i=0; while true; do i=$((i+1)); echo $i >/tmp/c.new; mv /tmp/c.new /tmp/count; sleep 0.1; done"],
}
FILL_MB = 128


def fill_script(megabytes: int) -> str:
    return f"""set -e
head -c 1048576 /dev/urandom > /dev/shm/seed
i=0; while [ $i -lt {megabytes} ]; do cat /dev/shm/seed; i=$((i+1)); done > /dev/shm/fill
echo in-memory > /dev/shm/marker
md5sum /dev/shm/seed | cut -c1-32
"""


PREPARE = "mkdir -p /data && echo on-disk > /data/note && sync\n" + fill_script(FILL_MB)
# Everything a guest that came back must still have: a counter that goes on, its hostname, a
# file on disk and, in tmpfs (guest RAM only), a marker and the filled memory.
FACTS = """a=$(cat /tmp/count); i=0
while [ "$(cat /tmp/count)" = "$a" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "$a $(cat /tmp/count)"
hostname
cat /data/note /dev/shm/marker
md5sum /dev/shm/seed | cut -c1-32
head -c 1048576 /dev/shm/fill | md5sum | cut -c1-32
tail -c 1048576 /dev/shm/fill | md5sum | cut -c1-32
"""
ZSTD_1 = {"enabled": True, "algorithm": "zstd", "level": 1}
ZSTD_19 = {"enabled": True, "algorithm": "zstd", "level": 19}
# A restored VM is Running at once; Initializing after a restart means it never will be.
SETTLE = "10s"


# ---- helpers ------------------------------------------------------------------------------------


def sh(sdk: Hypeman, instance: str, script: str) -> str:
    result = sdk_exec(sdk, instance, ["/bin/sh", "-c", script])
    assert result.exit_code == 0, result
    return result.output.decode()


def qemu_processes(root: Path) -> dict[int, str]:
    """QEMU processes whose working directory is under ``root``: pid -> that directory (a
    directory deleted under a live process counts too)."""
    prefix = str(root.resolve()) + os.sep
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv0 = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0]
            cwd = os.readlink(f"/proc/{entry}/cwd").removesuffix(" (deleted)")
        except OSError:
            continue
        if b"qemu-system" in argv0 and cwd.startswith(prefix):
            found[int(entry)] = cwd
    return found


def instance_qemus(data: Path) -> dict[int, str]:
    """QEMU processes running in an instance directory of ``data``: pid -> instance id."""
    guests = str((data / "guests").resolve())
    found = qemu_processes(data).items()
    return {pid: Path(cwd).name for pid, cwd in found if str(Path(cwd).parent) == guests}


def flip_byte_in_data(path: Path, start: int) -> tuple[int, int]:
    """Flip a non-zero byte of the first data page at or after ``start`` (found with SEEK_DATA,
    so a sparse file is never read through its holes). Returns (offset, original byte)."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        offset = start
        while offset < size:
            offset = os.lseek(fd, offset, os.SEEK_DATA)
            page = os.pread(fd, 4096, offset)
            nonzero = next((i for i, byte in enumerate(page) if byte), None)
            if nonzero is not None:
                at = offset + nonzero
                os.pwrite(fd, bytes([page[nonzero] ^ 0xFF]), at)
                os.fsync(fd)
                return at, page[nonzero]
            offset += 4096
        raise AssertionError(f"{path}: no non-zero data after offset {start}")
    finally:
        os.close(fd)


def put_byte(path: Path, offset: int, value: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([value]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def identity(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return info.st_ino, info.st_size, info.st_mtime_ns


def api_body(error: APIStatusError) -> dict[str, object]:
    body = error.body
    assert isinstance(body, dict), body
    return body


# ---- disk full ------------------------------------------------------------------------------------


@dataclass
class Crowded:
    """A server whose data directory is a small ext4 file system, with one Running instance
    whose RAM file holds ~100 MiB of touched memory."""

    server: ServerProcess
    mountpoint: Path
    data: Path
    source: str

    def fill_disk(self) -> Path:
        """Leave room for the instance to go on, but not for a copy of its RAM (whose blocks
        are reserved in full: the copy needs as much as the RAM it holds data in)."""
        memory = self.data / "guests" / self.source / "memory.ram"
        touched = sum(length for _, length in data_extents(memory))
        return fill(self.mountpoint, leave=touched // 2)


@pytest.fixture(scope="class")
def crowded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crowded]:
    root = tmp_path_factory.mktemp("crowded")
    # The harness (deletes, stops, checks) finishes before the file system is unmounted.
    with mounted_ext4(root / "fs", 640) as mountpoint, shared_harness(root / "harness", request.node) as hm:
        data = mountpoint / "data"
        server = hm.start(data)
        demo.install(server.base_url, server.token, wait_seconds=300)
        with strict_client(server) as sdk:
            # An idle program: nothing in the guest writes while the disk is full.
            source = sdk.instances.create(
                name="crowded", image=demo.DEMO_NAME, size="256MB", overlay_size="64MB", vcpus=1,
                entrypoint=["/bin/sh", "-c"], cmd=["while true; do sleep 3600; done"],
            )
            assert sdk.instances.wait(source.id, state="Running", api_timeout="120s").state == "Running"
            sh(sdk, source.id, fill_script(96))
        yield Crowded(server, mountpoint, data, source.id)


def _http(conn: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 exchange on an open connection: (status, headers, body); status 0 when the
    server had closed the connection."""
    try:
        conn.sendall(request)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = conn.recv(65536)
            if not chunk:
                return 0, {}, b""
            received += chunk
    except (ConnectionResetError, BrokenPipeError):
        return 0, {}, b""
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        body += conn.recv(65536)
    return int(lines[0].split()[1]), headers, body


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a loop file system needs root")
class TestDiskFull:
    def test_a_snapshot_that_fills_the_disk_fails_and_the_source_runs_on(self, crowded: Crowded) -> None:
        with strict_client(crowded.server) as sdk:
            filler = crowded.fill_disk()
            try:
                with pytest.raises(APIStatusError) as full:
                    sdk.instances.snapshots.create(crowded.source, kind="Standby", name="too-big")
            finally:
                filler.unlink()
            body = api_body(full.value)
            # A full disk is 507 insufficient_storage (before: 500 vmm_error or internal_error).
            assert (full.value.status_code, body.get("code")) == (507, "insufficient_storage"), body
            assert isinstance(body.get("message"), str) and body["message"], body
            # The same client (and connection) goes on: the source still runs, nothing is left.
            assert sdk.instances.get(crowded.source).state == "Running", crowded.server.log()[-4000:]
            assert sh(sdk, crowded.source, "cat /dev/shm/marker").strip() == "in-memory"
            assert list((crowded.data / "snapshots").iterdir()) == []
            assert sdk.snapshots.list() == []

            # With room again, a snapshot succeeds.
            snapshot = sdk.instances.snapshots.create(crowded.source, kind="Standby", name="fits")
            assert [s.id for s in sdk.snapshots.list()] == [snapshot.id]
            assert sdk.instances.get(crowded.source).state == "Running"
            assert sh(sdk, crowded.source, "cat /dev/shm/marker").strip() == "in-memory"
            sdk.snapshots.delete(snapshot.id)
            assert list((crowded.data / "snapshots").iterdir()) == []

    def test_the_connection_that_got_the_error_serves_the_next_request(self, crowded: Crowded) -> None:
        """An unexpected error's answer must not end the keep-alive connection unannounced: a
        client sends its next request on it at once (this failed as a reset by peer while the
        500 handler re-raised and uvicorn closed the connection; fixed in 608f2d3)."""
        payload = json.dumps({"kind": "Standby", "name": "too-big-again"}).encode()
        request = (
            f"POST /instances/{crowded.source}/snapshots HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {crowded.server.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        filler = crowded.fill_disk()
        try:
            with socket.create_connection(("127.0.0.1", crowded.server.port), timeout=120) as conn:
                status, headers, body = _http(conn, request)
                assert (status, json.loads(body)["code"]) == (507, "insufficient_storage"), (status, body)
                time.sleep(0.5)  # part of the test: a server that closes the connection has done so
                if headers.get("connection", "").lower() != "close":
                    # Not announced as closing: the connection serves the next request.
                    again, _, _ = _http(conn, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    assert again == 200, f"the server dropped the keep-alive connection after its {status}"
        finally:
            filler.unlink()
        with strict_client(crowded.server) as sdk:
            assert sdk.instances.get(crowded.source).state == "Running"
            assert sdk.snapshots.list() == []


# ---- the rig: one server on one data directory, killed and started again ------------------------


@dataclass
class Rig:
    harness: Harness
    data: Path
    server: ServerProcess
    starts: int = 1
    source: str = ""
    seed: str = ""
    probes: int = 0
    journal: list[str] = field(default_factory=list)

    def client(self) -> Hypeman:
        return strict_client(self.server)

    def log(self) -> str:
        return self.server.log()[-6000:]

    def restart(self) -> None:
        self.starts += 1
        self.server = self.harness.start(self.data)

    def note(self, line: str) -> None:
        self.journal.append(line)
        print(line)

    def facts(self, sdk: Hypeman, instance: str, hostname: str) -> None:
        """The guest came back, not a new boot: its counter goes on, and its hostname, disk file
        and RAM-only tmpfs content are all there."""
        out = sh(sdk, instance, FACTS).split()
        counts, rest = out[:2], out[2:]
        assert int(counts[1]) > int(counts[0]), f"the counter stands still in {instance}: {out}"
        assert rest == [hostname, "on-disk", "in-memory", self.seed, self.seed, self.seed], (instance, out)


@pytest.fixture(scope="module")
def module_rig(module_harness: Harness) -> Rig:
    """The harness deletes every instance, stops the server and checks what is left at the end."""
    server = module_harness.start()
    demo.install(server.base_url, server.token, wait_seconds=300)
    return Rig(module_harness, server.data_dir, server)


@pytest.fixture
def rig(module_rig: Rig) -> Iterator[Rig]:
    """The module's rig. A QEMU in an instance directory that the (restarted) server does not
    list is left behind: each test fails on one, and it is killed by PID so that failures do
    not cascade."""
    yield module_rig
    listed: set[str] = set()
    with contextlib.suppress(Exception), module_rig.client() as sdk:
        listed = {i.id for i in sdk.instances.list()}
    left = []
    for pid, cwd in qemu_processes(module_rig.data).items():
        if Path(cwd).name not in listed:
            left.append(f"pid {pid} in {cwd}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"QEMUs the server does not list were left running (killed now): {left}"


def ensure_source(rig: Rig) -> None:
    """Only the source, Running with its prepared memory (made once); no snapshots. Whatever
    an earlier failed test left is removed, so that failures do not cascade."""
    with rig.client() as sdk:
        for snapshot in sdk.snapshots.list():
            sdk.snapshots.delete(snapshot.id)
        for instance in sdk.instances.list():
            if instance.id != rig.source:
                sdk.instances.delete(instance.id)
        if rig.source:
            state = sdk.instances.get(rig.source).state
            if state == "Standby":
                sdk.instances.restore(rig.source)
                state = sdk.instances.get(rig.source).state
            assert state == "Running", f"the source is {state} between tests\n{rig.log()}"
            return
        created = sdk.instances.create(name=SOURCE_NAME, image=demo.DEMO_NAME, **{**SOURCE_SHAPE, **COUNTER})  # type: ignore[arg-type]
        assert sdk.instances.wait(created.id, state="Running", api_timeout="120s").state == "Running"
        rig.source = created.id
        rig.seed = sh(sdk, created.id, PREPARE).strip()
        rig.facts(sdk, created.id, SOURCE_NAME)


@dataclass
class Round:
    label: str
    outcome: str  # what the interrupted request answered, if it answered before the kill
    observed: bool  # the trigger saw what it waited for
    log: str  # the restarted server's log


Trigger = Callable[[threading.Thread], bool]


def after(seconds: float) -> Trigger:
    def trigger(_: threading.Thread) -> bool:
        time.sleep(seconds)  # the fault's timing: this is when the server is killed
        return True

    return trigger


def when(predicate: Callable[[], bool], *, then: float = 0.0, only_while_running: bool = True) -> Trigger:
    """Kill as soon as ``predicate`` holds (polled every millisecond), or ``then`` seconds later.
    With ``only_while_running``, a request that ends first is killed after its answer."""

    def trigger(thread: threading.Thread) -> bool:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if predicate():
                time.sleep(then)  # the fault's timing: kill this long after the sign
                return True
            if only_while_running and not thread.is_alive():
                return predicate()
            time.sleep(0.001)
        return False

    return trigger


def on_answer(thread: threading.Thread) -> bool:
    """Kill as soon as the request has been answered."""
    thread.join(120)
    return True


def exists(pattern: str, root: Path) -> Callable[[], bool]:
    return lambda: next(iter(root.glob(pattern)), None) is not None


def new_guest(rig: Rig, check: Callable[[Path], bool]) -> Callable[[], bool]:
    """A predicate: some instance directory other than the source's passes ``check``."""

    def predicate() -> bool:
        with contextlib.suppress(OSError):
            return any(p.name != rig.source and check(p) for p in (rig.data / "guests").iterdir())
        return False

    return predicate


def kill_during(rig: Rig, label: str, action: Callable[[Hypeman], object], trigger: Trigger) -> Round:
    """Run ``action`` in a thread, SIGKILL the server when ``trigger`` says, start it again."""
    outcome: list[str] = []

    def run() -> None:
        try:
            with rig.client() as sdk:
                result = action(sdk)
            outcome.append(f"answered: {type(result).__name__}")
        except Exception as exc:
            outcome.append(f"{type(exc).__name__}: {str(exc)[:120]}")

    thread = threading.Thread(target=run, name=f"kill-{label}", daemon=True)
    thread.start()
    observed = trigger(thread)
    rig.server.process.send_signal(signal.SIGKILL)
    rig.server.process.wait()
    thread.join(60)
    assert not thread.is_alive(), f"{label}: the request did not end with the server"
    rig.restart()
    restarted = rig.server.log()
    found = [line.split(": ", 1)[-1] for line in restarted.splitlines()
             if "interrupted" in line or "removing" in line or "orphan" in line]
    round_ = Round(label, outcome[0] if outcome else "(none)", observed, restarted)
    rig.note(f"[{label}] request: {round_.outcome}; observed={observed}; restart: {found}")
    return round_


@dataclass
class World:
    source_state: str
    forks: dict[str, str]  # name -> state found after the restart
    snapshots: dict[str, str | None]  # id -> compression_state found after the restart


def check_world(rig: Rig, *, keep: frozenset[str] = frozenset()) -> World:
    """Everything the restarted server shows is whole and true; then it is probed and cleaned
    up. Afterwards only the source (Running) and the snapshots in ``keep`` remain."""
    data = rig.data
    with rig.client() as sdk:
        instances = sdk.instances.list()
        for instance in instances:
            if instance.state == "Initializing":
                sdk.instances.wait(instance.id, state="Running", api_timeout=SETTLE)
        instances = sdk.instances.list()
        ids = [i.id for i in instances]
        assert len(ids) == len(set(ids)), ids
        by_id = {i.id: i for i in instances}
        states = {i.name: (i.state, i.state_error) for i in instances}
        rig.note(f"    after the restart: {states}")
        assert all(i.state in ("Running", "Standby", "Stopped") for i in instances), f"{states}\n{rig.log()}"

        # The source: never lost, in exactly one true state.
        assert rig.source in by_id, f"the source was lost: {states}\n{rig.log()}"
        source_state = by_id[rig.source].state
        assert source_state in ("Running", "Standby"), f"source is {source_state}\n{rig.log()}"

        # Every instance directory is a listed instance; the disk agrees with each state; a
        # QEMU runs for exactly the Running ones.
        guest_dirs = {p.name for p in (data / "guests").iterdir()}
        assert guest_dirs == set(ids), f"directories without instance: {guest_dirs - set(ids)}\n{rig.log()}"
        qemus = instance_qemus(data)
        running = sorted(i.id for i in instances if i.state == "Running")
        assert sorted(qemus.values()) == running, f"QEMUs {qemus} vs Running {running}\n{rig.log()}"
        for instance in instances:
            directory = data / "guests" / instance.id
            if instance.state == "Standby":
                # Its RAM file raw, or compressed (a resumed standby compression may have ended).
                files = [(directory / n).exists() for n in ("standby.json", "vm.state")]
                memory = memory_files(directory)
                assert all(files) and ("memory.ram" in memory or "memory.ram.extents" in memory), (
                    instance.name, files, memory
                )
                assert instance.has_snapshot
            else:
                both = f"{instance.name} is {instance.state} and Standby"
                assert not (directory / "standby.json").exists(), both
                assert not instance.has_snapshot

        # Every snapshot directory is a listed snapshot: no unfinished copy, no fork staging.
        snapshots = sdk.snapshots.list()
        snapshot_dirs = {p.name for p in (data / "snapshots").iterdir()}
        assert snapshot_dirs == {s.id for s in snapshots}, f"{snapshot_dirs} vs listed\n{rig.log()}"
        found = World(
            source_state=source_state,
            forks={i.name: i.state for i in instances if i.id != rig.source},
            snapshots={s.id: s.compression_state for s in snapshots},
        )

        # The source works: a Standby one restores, and comes back where it was.
        if source_state == "Standby":
            assert sdk.instances.restore(rig.source).state == "Running", rig.log()
        rig.facts(sdk, rig.source, SOURCE_NAME)

        # A fork that exists is a whole one: it runs (or restores) as itself, then goes.
        for instance in instances:
            if instance.id == rig.source:
                continue
            if instance.state == "Standby":
                assert sdk.instances.restore(instance.id).state == "Running", rig.log()
            if instance.state != "Stopped":
                rig.facts(sdk, instance.id, instance.name)
            sdk.instances.delete(instance.id)

        # Every listed snapshot is whole: fetched, forked, and the fork has the source's memory.
        for snapshot in snapshots:
            fetched = sdk.snapshots.get(snapshot.id)  # its compression may move on meanwhile
            assert fetched.id == snapshot.id and fetched.created_at == snapshot.created_at
            assert (fetched.name, fetched.kind, fetched.source_instance_id) == (
                snapshot.name, snapshot.kind, snapshot.source_instance_id
            )
            assert (data / "snapshots" / snapshot.id / "snapshot.json").exists()
            rig.probes += 1
            probe = sdk.snapshots.fork(snapshot.id, name=f"probe-{rig.probes}")
            assert probe.state == "Running", (probe.state, probe.state_error)
            rig.facts(sdk, probe.id, probe.name)
            sdk.instances.delete(probe.id)
            if snapshot.id not in keep:
                sdk.snapshots.delete(snapshot.id)

        assert sorted(instance_qemus(data).values()) == [rig.source]
        assert {p.name for p in (data / "guests").iterdir()} == {rig.source}
        return found


# ---- SIGKILL: snapshot copy, standby, fork, compression -------------------------------------------


def test_killed_during_a_snapshot_copy_of_a_running_source(rig: Rig) -> None:
    """Whatever phase (before the pause, saving the device state, copying RAM, digesting,
    after): the source is Running again, and a snapshot is listed only if it is whole."""
    ensure_source(rig)
    rounds: list[tuple[str, Trigger]] = [
        ("copy+0.05s", after(0.05)), ("copy+0.2s", after(0.2)), ("copy+0.5s", after(0.5)),
        ("copy:mid-RAM-copy", when(exists("snapshots/*/guest/.memory.ram.*.tmp", rig.data))),
    ]
    for index, (label, trigger) in enumerate(rounds):
        def snapshot(sdk: Hypeman, name: str = f"copy-{index}") -> object:
            return sdk.instances.snapshots.create(rig.source, kind="Standby", name=name)

        round_ = kill_during(rig, label, snapshot, trigger)
        world = check_world(rig)
        # A snapshot of a Running source brings it back Running, always.
        assert world.source_state == "Running", (label, round_)
        if label == "copy:mid-RAM-copy":
            assert round_.observed, "the RAM copy was never seen in progress"
            assert "removing unfinished snapshot directory" in round_.log, round_.log[-4000:]
            assert "resuming a VM an interrupted operation left paused" in round_.log, round_.log[-4000:]
            assert world.snapshots == {}


def test_killed_during_standby(rig: Rig) -> None:
    """Killed anywhere in a standby, the instance is Running or Standby, never both, never lost;
    once its standby record is on disk it is Standby."""
    ensure_source(rig)
    recorded = exists(f"guests/{rig.source}/standby.json", rig.data)
    rounds: list[tuple[str, Trigger]] = [
        ("standby+0.01s", after(0.01)), ("standby+0.05s", after(0.05)), ("standby+0.15s", after(0.15)),
        ("standby:record-written", when(recorded, only_while_running=False)),
    ]
    for label, trigger in rounds:
        ensure_source(rig)
        round_ = kill_during(rig, label, lambda sdk: sdk.instances.standby(rig.source), trigger)
        world = check_world(rig)
        if label == "standby:record-written":
            assert round_.observed
            assert world.source_state == "Standby", round_.log[-4000:]


def _fork_phases(rig: Rig) -> list[tuple[str, Trigger]]:
    """Moments of a fork seen on disk, all before the fork's VM runs: its directory being
    copied, and its VMM started (loading the saved state: QMP alone takes longer than the
    millisecond this takes to notice)."""
    return [
        ("copying", when(new_guest(rig, lambda p: not (p / "instance.json").exists()))),
        ("vmm-loading", when(new_guest(rig, lambda p: (p / "vmm.json").exists()))),
    ]


def test_killed_during_a_fork(rig: Rig) -> None:
    """A fork of the Running source (staged under snapshots/.fork-*) and a fork of a stored
    snapshot, killed mid-capture, while the fork's directory is copied and while its VMM loads:
    no staging directory survives the restart, the source is Running, and a listed fork is a
    whole one (it runs as itself: its own hostname, the source's memory and files)."""
    ensure_source(rig)
    rounds = [
        ("fork:mid-capture", when(exists("snapshots/.fork-*/guest/.memory.ram.*.tmp", rig.data))),
        *((f"fork:{label}", trigger) for label, trigger in _fork_phases(rig)),
    ]
    for index, (label, trigger) in enumerate(rounds):
        def fork(sdk: Hypeman, name: str = f"child-{index}") -> object:
            return sdk.instances.fork(rig.source, name=name, from_running=True)

        round_ = kill_during(rig, label, fork, trigger)
        world = check_world(rig)
        assert world.source_state == "Running", (label, round_)
        if not round_.outcome.startswith("answered"):
            # The client never got the fork's id: the restarted server must not keep it.
            assert world.forks == {}, (label, round_.outcome, world.forks)
        if label == "fork:mid-capture":
            assert round_.observed
            assert "removing unfinished snapshot directory .fork-" in round_.log, round_.log[-4000:]
            assert "resuming a VM an interrupted operation left paused" in round_.log, round_.log[-4000:]
            assert world.forks == {}

    with rig.client() as sdk:
        base = sdk.instances.snapshots.create(rig.source, kind="Standby", name="fork-base")
    for index, (label, trigger) in enumerate(_fork_phases(rig)):
        def fork_snapshot(sdk: Hypeman, name: str = f"heir-{index}") -> object:
            return sdk.snapshots.fork(base.id, name=name)

        round_ = kill_during(rig, f"snapshot-fork:{label}", fork_snapshot, trigger)
        world = check_world(rig, keep=frozenset({base.id}))
        assert list(world.snapshots) == [base.id]
        if not round_.outcome.startswith("answered"):
            assert world.forks == {}, (label, round_.outcome, world.forks)
    with rig.client() as sdk:
        sdk.snapshots.delete(base.id)


def test_killed_while_a_fork_takes_its_identity(rig: Rig) -> None:
    """The one moment of a fork left out above: its VM runs, its new identity (RNG reseed, MAC,
    hostname) is not set yet. After the restart it must be a whole fork (or none)."""
    ensure_source(rig)

    def taking_identity(directory: Path) -> bool:
        try:
            record = json.loads((directory / "instance.json").read_bytes())
        except (OSError, ValueError):
            return False
        return bool(record.get("identity_pending")) and record.get("phase") == "running"

    with rig.client() as sdk:
        base = sdk.instances.snapshots.create(rig.source, kind="Standby", name="identity-base")
    round_ = kill_during(
        rig, "snapshot-fork:identity", lambda sdk: sdk.snapshots.fork(base.id, name="newcomer"),
        when(new_guest(rig, taking_identity)),
    )
    assert round_.observed
    assert not round_.outcome.startswith("answered"), round_.outcome
    with rig.client() as sdk:
        # Killed before it answered: the client never got its id, so it is not kept (before,
        # it came back as an instance nobody knew of).
        assert "newcomer" not in [i.name for i in sdk.instances.list()], rig.log()
    assert "removing half-created instance" in round_.log, round_.log[-4000:]
    check_world(rig)


def wait_compression(sdk: Hypeman, snapshot_id: str, limit: float = 180) -> str | None:
    deadline = time.monotonic() + limit
    while (state := sdk.snapshots.get(snapshot_id).compression_state) == "compressing":
        assert time.monotonic() < deadline, "compression never finished"
        time.sleep(0.25)
    return state


def memory_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("memory.ram"))


def test_killed_during_compression(rig: Rig) -> None:
    """A snapshot's compression killed as it starts is resumed by the next server and finishes
    (zstd -1, so that the test can wait for it); one killed right after the snapshot was made is
    resumed, or undone by a fork that preempts it; either way the snapshot forks. An instance's
    own standby killed as its memory's compression starts restores, with
    nothing of the compression left behind. (Killed midway through zstd -19: see the xfail test
    below; any reader waits for the whole of such a compression.)"""
    ensure_source(rig)
    with rig.client() as sdk:
        quick = sdk.instances.snapshots.create(
            rig.source, kind="Standby", name="quick", compression=ZSTD_1  # type: ignore[arg-type]
        )
    assert quick.compression_state == "compressing"
    payload = rig.data / "snapshots" / quick.id / "guest"
    round_ = kill_during(
        rig, "zstd-1:started", lambda sdk: None,
        when(lambda: (payload / "memory.ram.zst.tmp").exists(), only_while_running=False),
    )
    assert round_.observed
    with rig.client() as sdk:
        after_restart = sdk.snapshots.get(quick.id).compression_state
        assert after_restart in ("compressing", "compressed", "none"), after_restart
        finished = wait_compression(sdk, quick.id)
        rig.note(f"    compression after the restart: {after_restart}, then {finished}")
        assert finished in ("compressed", "none"), sdk.snapshots.get(quick.id)
        if finished == "compressed":
            done = sdk.snapshots.get(quick.id)
            assert done.compressed_size_bytes and done.uncompressed_size_bytes
            assert done.compressed_size_bytes < done.uncompressed_size_bytes
            assert memory_files(payload) == ["memory.ram.extents", "memory.ram.zst"]
        else:
            assert memory_files(payload) == ["memory.ram"]
    check_world(rig)  # forks it (expanding the memory), then deletes it

    def snapshot_then_nothing(sdk: Hypeman) -> object:
        return sdk.instances.snapshots.create(
            rig.source, kind="Standby", name="quick-again", compression=ZSTD_1  # type: ignore[arg-type]
        )

    kill_during(rig, "zstd-1:answered", snapshot_then_nothing, on_answer)
    world = check_world(rig)  # forks at once: preempts the resumed compression, or follows it
    assert set(world.snapshots.values()) <= {"compressing", "compressed", "none"}, world.snapshots

    own = rig.data / "guests" / rig.source
    round_ = kill_during(
        rig, "standby-zstd-1:started",
        lambda sdk: sdk.instances.standby(rig.source, compression=ZSTD_1),  # type: ignore[arg-type]
        when(lambda: (own / "memory.ram.zst.tmp").exists(), only_while_running=False),
    )
    assert round_.observed
    world = check_world(rig)  # the restore preempts the resumed compression, or follows it
    assert world.source_state == "Standby"
    assert memory_files(own) == ["memory.ram"]


def producing(path: Path, since_ns: int = 0) -> Callable[[], bool]:
    """``path`` (a compressor's output) has bytes in it, written after ``since_ns``: zstd has
    all its input and is compressing it."""

    def predicate() -> bool:
        try:
            info = path.stat()
        except FileNotFoundError:
            return False
        return info.st_mtime_ns > since_ns and info.st_size > 0

    return predicate


def test_killed_during_zstd_19_compression_a_fork_preempts_the_resumed_job(rig: Rig) -> None:
    """A stored snapshot's zstd -19 compression killed midway is resumed by the next server; a
    fork of the snapshot must then preempt the resumed job and answer within seconds, whatever
    the job was doing (here: compressing, its input all read)."""
    ensure_source(rig)
    with rig.client() as sdk:
        slow = sdk.instances.snapshots.create(
            rig.source, kind="Standby", name="slow", compression=ZSTD_19  # type: ignore[arg-type]
        )
    directory = rig.data / "snapshots" / slow.id
    output = directory / "guest" / "memory.ram.zst.tmp"
    try:
        round_ = kill_during(rig, "zstd-19:midway", lambda sdk: None,
                             when(producing(output), only_while_running=False))
        assert round_.observed
        restarted = time.time_ns()  # the dead server's output is older; the new job writes on
        with rig.client() as sdk:
            assert sdk.snapshots.get(slow.id).compression_state in ("compressing", "compressed", "none")
            resumed = when(producing(output, since_ns=restarted), only_while_running=False)
            assert resumed(threading.current_thread()), "the restarted server did not resume the compression"
            started = time.monotonic()
            fork = sdk.with_options(timeout=10).snapshots.fork(slow.id, name="eager")
            rig.note(f"    the fork answered in {time.monotonic() - started:.1f} s")
            assert fork.state == "Running"
            assert sdk.snapshots.get(slow.id).compression_state == "none"
        check_world(rig)
    finally:
        if directory.exists():
            # The fork still waits for the compression, and a restarted server would resume it:
            # stop the server and remove this test's snapshot while no server runs.
            rig.server.process.send_signal(signal.SIGKILL)
            rig.server.process.wait()
            shutil.rmtree(directory)
            rig.restart()


# ---- corrupt files ----------------------------------------------------------------------------------


def test_corrupt_stored_snapshot_is_refused_at_restore_and_fork(rig: Rig) -> None:
    """Each of: RAM file truncated, a RAM byte flipped, vm.state truncated, a vm.state byte
    flipped. The in-place restore and the fork answer 409 snapshot_corrupt; the target
    instance's own files are untouched and nothing is started or left behind. Put back, the
    snapshot forks and restores again."""
    ensure_source(rig)
    with rig.client() as sdk:
        snapshot = sdk.instances.snapshots.create(rig.source, kind="Standby", name="fragile")
        sdk.instances.standby(rig.source)  # a restore in place needs a source that is not running
    payload = rig.data / "snapshots" / snapshot.id / "guest"
    own = rig.data / "guests" / rig.source
    own_files = {name: identity(own / name) for name in ("vm.state", "memory.ram", "standby.json")}
    backup = rig.harness.root / "backup"

    def truncate(name: str) -> Callable[[], None]:
        path = payload / name
        copy_sparse(path, backup)
        os.truncate(path, path.stat().st_size // 2)
        return lambda: os.replace(backup, path)

    def flip(name: str) -> Callable[[], None]:
        path = payload / name
        offset, byte = flip_byte_in_data(path, path.stat().st_size // 3)
        return lambda: put_byte(path, offset, byte)

    def everything() -> tuple[object, ...]:
        return (sorted(i.id for i in sdk.instances.list()), instance_qemus(rig.data),
                sorted(p.name for p in (rig.data / "guests").iterdir()),
                sorted(p.name for p in (rig.data / "snapshots").iterdir()),
                sorted(p.name for p in payload.iterdir()))

    cases: list[tuple[str, Callable[[], Callable[[], None]]]] = [
        ("memory.ram truncated", lambda: truncate("memory.ram")),
        ("memory.ram byte flipped", lambda: flip("memory.ram")),
        ("vm.state truncated", lambda: truncate("vm.state")),
        ("vm.state byte flipped", lambda: flip("vm.state")),
    ]
    with rig.client() as sdk:
        for label, corrupt in cases:
            before = everything()
            put_back = corrupt()
            with pytest.raises(ConflictError) as at_restore:
                sdk.instances.snapshots.restore(snapshot.id, id=rig.source)
            assert api_body(at_restore.value)["code"] == "snapshot_corrupt", label
            with pytest.raises(ConflictError) as at_fork:
                sdk.snapshots.fork(snapshot.id, name="never")
            assert api_body(at_fork.value)["code"] == "snapshot_corrupt", label
            assert everything() == before, label
            assert sdk.instances.get(rig.source).state == "Standby", label
            assert {name: identity(own / name) for name in own_files} == own_files, label
            put_back()
            rig.note(f"[corrupt] {label}: restore and fork refused: {api_body(at_fork.value)['message']}")

        # Put back, the snapshot is whole again: it forks, and restores in place.
        fork = sdk.snapshots.fork(snapshot.id, name="mended")
        assert fork.state == "Running"
        rig.facts(sdk, fork.id, "mended")
        sdk.instances.delete(fork.id)
        assert sdk.instances.snapshots.restore(snapshot.id, id=rig.source).state == "Running"
        rig.facts(sdk, rig.source, SOURCE_NAME)
        sdk.snapshots.delete(snapshot.id)
    check_world(rig)


def test_corrupt_own_standby_is_refused_and_stays_standby(rig: Rig) -> None:
    """An instance's own standby with a flipped vm.state byte, or a truncated RAM file, is
    refused at restore (409 snapshot_corrupt), starts no QEMU and stays Standby; with the file
    put back it restores where it was."""
    ensure_source(rig)
    own = rig.data / "guests" / rig.source
    memory = own / "memory.ram"
    backup = rig.harness.root / "backup"
    with rig.client() as sdk:
        sdk.instances.standby(rig.source)

        offset, byte = flip_byte_in_data(own / "vm.state", (own / "vm.state").stat().st_size // 2)
        with pytest.raises(ConflictError) as altered:
            sdk.instances.restore(rig.source)
        assert api_body(altered.value)["code"] == "snapshot_corrupt"
        assert sdk.instances.get(rig.source).state == "Standby"
        assert rig.source not in instance_qemus(rig.data).values()
        put_byte(own / "vm.state", offset, byte)

        copy_sparse(memory, backup)
        os.truncate(memory, memory.stat().st_size // 2)
        with pytest.raises(ConflictError) as truncated:
            sdk.instances.restore(rig.source)
        assert api_body(truncated.value)["code"] == "snapshot_corrupt"
        assert sdk.instances.get(rig.source).state == "Standby"
        assert rig.source not in instance_qemus(rig.data).values()
        os.replace(backup, memory)

        assert sdk.instances.restore(rig.source).state == "Running"
        rig.facts(sdk, rig.source, SOURCE_NAME)
    check_world(rig)
