"""Standby, restore, snapshots, fork and compression through the API, against bare QEMU by hand.

    .venv/bin/python -m bench.snapshots [--quick] [--runs 5] [--fs ext4,xfs] [--dir DIR]

One command, one run, for a 256 MiB and a 1 GiB guest, on the data directory's default
filesystem (ext4 here) and on an XFS with reflink that the bench makes on a loop device
(``truncate``, ``losetup``, ``mkfs.xfs -m reflink=1``, ``mount``; always unmounted and
detached at the end). Per filesystem: a real ``hypemand serve`` driven through the official SDK
in strict mode, the busybox demo image, and two guests (1 vCPU, no network) whose RAM is
dirtied from inside: ~600 MB in the 1 GiB guest (200 MB from /dev/urandom, 400 MB of copies
of busybox) and 160 MB in the 256 MiB one (60 + 100), in a tmpfs mounted for it.

Measured, runs alternated with their bare counterpart, medians:

- standby (API call) and restore -> Running (API call, and /wait if it was not yet Running),
  against a bare QEMU running the same VM: the instance's own ``qemu-config.json`` argv in a
  scratch directory with copies of its RAM file, disks and saved state. Bare standby is
  ``migrate-set-capabilities x-ignore-shared`` + ``stop`` + ``migrate exec:cat > f`` + ``quit``
  (until the process is gone); bare restore is a relaunch with ``-incoming defer``, the
  capability, ``migrate-incoming``, the wait, ``cont``; and, as the reference for a ``Running``
  that means usable, until its agent answered a HELLO sent as soon as QEMU made the socket and
  set the clock (what hypemand's restore now waits for), with QEMU's CPU time to QMP up, to
  ``cont`` and to the agent's answer. Where hypemand's extra time goes is
  shown by timing its extra steps by hand (fsyncs, the state digest, a record write, an HTTP
  round trip) next to a bare QMP round trip.
- restore -> first exec answered: the restore call, then at once an exec of ``true``, timed
  from the restore's start; against restore -> Running in the same cycle (the difference is
  what a client that got ``Running`` still waits) and a second, steady exec right after. The
  QEMU process's CPU time (``/proc/<pid>/stat``) during the first and the second exec shows
  what the first one spends in the guest (under TCG: translating code paths a fresh QEMU has
  not run yet).
- snapshot create of the Running guest (API time) and the pause the guest sees: the guest's
  program prints a line every 10 ms while /tmp/tick exists; a host thread watches the console
  file grow (1 ms polls): the largest gap while the call runs is the pause (the guest's own
  clocks stop with it, so it cannot time it itself). Against ``cp --sparse=always
  --reflink=never`` of the RAM file (and its fsync; on XFS also ``cp --reflink=always``).
- fork -> Running of a stored snapshot (source in Standby), ten forks: the data directory's
  growth from before the snapshot was taken (``du``; on XFS the filesystem's used bytes after a
  syncfs, since ``du`` counts a shared extent in every file) after one fork and after ten,
  against one fork's own files (``du`` of its directory: what it would cost with its own
  copies); and the forks' QEMU PSS (``/proc/<pid>/smaps_rollup``) summed, against the running
  count times one fork's PSS measured while it ran alone.
  At most 4 x cpu-count vCPUs run at once (the server's admission): the forks past that many
  are forked to Standby (their disk counts, their memory cannot).
- N concurrent forks of one snapshot (the 256 MiB guest's, source in Standby), N = 1, 4, 8:
  N threads call fork -> Running at once, each timed from its own call; p50 and p95 over all
  the forks of all runs per N. With them, the CPU time each fork costs: its QEMU's when the
  fork answers, and the server process's over the batch divided by N. N forks at once cannot
  end sooner than N x that CPU / the cores, whatever the server does.
- compression: a zstd-1 snapshot, from the create call to ``compression_state=compressed``
  (polled every 20 ms), and what a fork of it pays over a fork of a raw snapshot (the
  expansion), against ``zstd -1 -T0`` and ``zstd -1 -T0 --long=27`` (+ fsync, as our codec
  fsyncs) and ``zstd -d --long=27`` on the same RAM file; and ``verify_file`` (the digest check
  restore and fork run) on it, as a share of fork -> Running.

Targets (issues 8 and 13): standby <= 1.2x bare and 1 GiB within 1.5x of 256 MiB; restore ->
Running <= 1.2x bare; restore -> first exec answered within 20 ms of restore -> Running; fork ->
Running <= restore + 100 ms; p95 of 8 concurrent forks within 2x of one fork's median; ten forks
< 2x the disk of one; the pause of a Running snapshot <= a sparse copy of its RAM file on ext4
and nearly flat (1 GiB within 1.5x of 256 MiB) on XFS; the codec at least as fast as ``zstd -1
-T0`` with at least the ratio of ``--long=27``. Every server and QEMU started here is ended by
PID, also on failure. The load average is printed at the start and the end: the figures are only
as quiet as the machine was.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from hypeman import Hypeman
from hypeman.lib.exec import exec as sdk_exec

from bench.instances import Server, kill_pids, median, qemu_pids, terminate_as_exit, timed, vmm_pid
from hypemand.fsutil import write_atomic
from hypemand.guest import protocol as agent_protocol
from hypemand.images import demo
from hypemand.savedvm.digest import file_digest, verify_file

MB = 1_000_000
MIB = 1 << 20
CORES = os.cpu_count() or 1
# The program: quiet, but a line every 10 ms on the console while /tmp/tick exists. Only shell
# builtins (read -t on a FIFO nobody writes is the sleep), so the loop forks nothing.
TICKER = (
    "mkfifo /tmp/.hold; exec 3<>/tmp/.hold; i=0; while :; do if [ -e /tmp/tick ]; then "
    'i=$((i+1)); echo "tick $i"; read -t 0.01 -u 3 x; else read -t 0.2 -u 3 x; fi; done'
)
BUSYBOX_MB = 19.8  # ten copies of the guest's /bin/busybox (1,982,256 bytes) in one file


@dataclass(frozen=True)
class GuestSize:
    label: str  # also in instance names: lowercase and digits
    size: str
    random_mb: int
    copies_mb: int


SIZES = (GuestSize("256m", "256MB", 60, 100), GuestSize("1g", "1GB", 200, 400))
QUICK_SIZES = (GuestSize("256m", "256MB", 40, 60), GuestSize("1g", "1GB", 100, 200))
FANOUT = (1, 4, 8)  # concurrent forks of one snapshot
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Params:
    runs: int = 5
    cycles: int = 15  # standby/restore pairs: cheap, and the noisiest figures here
    compression_runs: int = 3
    forks: int = 10
    verify_runs: int = 3
    fanout_runs: int = 5  # batches per N of concurrent forks
    sizes: tuple[GuestSize, ...] = SIZES


@dataclass
class Results:
    samples: dict[str, list[float]] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def med(self, key: str) -> float:
        return median(self.samples.get(key, []))

    def paired_diff(self, key: str, reference: str) -> float:
        """The median of the same-run differences key - reference."""
        pairs = zip(self.samples.get(key, []), self.samples.get(reference, []), strict=False)
        return median([a - b for a, b in pairs])

    def paired(self, key: str, reference: str) -> float:
        """The median of the same-run ratios key / reference."""
        pairs = zip(self.samples.get(key, []), self.samples.get(reference, []), strict=False)
        return median([a / b for a, b in pairs])

    def last_ms(self, key: str) -> str:
        return f"{self.samples[key][-1] * 1000:.0f}"

    def pct(self, key: str, fraction: float) -> float:
        """Nearest-rank percentile of the samples of ``key``."""
        values = sorted(self.samples.get(key, []))
        if not values:
            return float("nan")
        return values[min(len(values) - 1, max(0, round(fraction * len(values) + 0.5) - 1))]


# ---- bare QEMU, by hand ----------------------------------------------------------------------------


class Qmp:
    """A minimal synchronous QMP client: what a person scripting QEMU by hand would write."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        self._sock = sock
        self._file = sock.makefile("rb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self._file.readline()
            if not line:
                raise EOFError("QMP closed")
            message: dict[str, Any] = json.loads(line)
            if "event" not in message:
                return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {command}: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}


class BareAgentLink:
    """What a restore that answers only once the guest is usable adds to the bare recipe, by
    hand: dial the agent socket as soon as QEMU makes it and say HELLO; when the guest answers,
    set its clock. In a thread, so that it runs while QEMU loads the state."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.answered_at = float("nan")
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + 30
            while True:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(str(self.path))
                    break
                except OSError:
                    sock.close()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.002)
            self.sock = sock
            decoder = agent_protocol.FrameDecoder(hunting=True)
            nonce = self._hello(padding=False)
            sock.settimeout(1.0)
            while True:
                try:
                    frame = self._next(decoder, lambda f: f.session == agent_protocol.CONTROL_SESSION
                                       and f.type == agent_protocol.Msg.HELLO_ACK)  # fmt: skip
                except TimeoutError:
                    nonce = self._hello(padding=True)  # as the server does: resend, resynchronising
                    continue
                if agent_protocol.decode_hello_ack(frame.payload).nonce == nonce:
                    break
            sock.settimeout(30.0)
            sock.sendall(agent_protocol.set_clock_request(1, time.time_ns()))
            self._next(decoder, lambda f: f.session == 1)
            self.answered_at = time.monotonic()
        except BaseException as exc:  # reported by wait()
            self.error = exc

    def _hello(self, padding: bool) -> int:
        assert self.sock is not None
        nonce = secrets.randbits(63) | 1
        self.sock.sendall((agent_protocol.resync_padding() if padding else b"") + agent_protocol.hello(nonce))
        return nonce

    def _next(
        self, decoder: agent_protocol.FrameDecoder, wanted: Callable[[agent_protocol.Frame], bool]
    ) -> agent_protocol.Frame:
        assert self.sock is not None
        while True:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("the agent socket closed")
            for frame in decoder.feed(data):
                if wanted(frame):
                    return frame

    def wait(self) -> float:
        """When the guest had answered and its clock was set (monotonic seconds)."""
        self._thread.join(60)
        if self.error is not None:
            raise RuntimeError(f"bare agent link: {self.error!r}") from self.error
        if self._thread.is_alive():
            raise RuntimeError("the bare VM's agent did not answer within 60 s")
        return self.answered_at

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class BareVM:
    """The instance's own QEMU command line, run by hand in a scratch directory."""

    def __init__(self, argv: list[str], directory: Path) -> None:
        self.argv = argv[:-2] if argv[-2:] == ["-incoming", "defer"] else argv
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.qmp: Qmp | None = None
        self.agent: BareAgentLink | None = None

    def _wait_migration(self, qmp: Qmp) -> None:
        deadline = time.monotonic() + 120
        while True:
            status = qmp.execute("query-migrate").get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"bare migration {status}")
            time.sleep(0.002)

    def restore(self) -> dict[str, float]:
        for stale in ("qemu.sock", "agent.sock"):
            (self.directory / stale).unlink(missing_ok=True)
        started = time.monotonic()
        with open(self.directory / "vmm.log", "ab") as log:
            self.process = subprocess.Popen(
                [*self.argv, "-incoming", "defer"], cwd=self.directory, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.agent = BareAgentLink(self.directory / "agent.sock")
        self.qmp = qmp = Qmp(self.directory / "qemu.sock")
        qmp_up = time.monotonic() - started
        cpu_up = cpu_seconds(self.process.pid)
        qmp.execute("migrate-set-capabilities", IGNORE_SHARED)
        qmp.execute("migrate-incoming", {"uri": "exec:cat vm.state"})
        self._wait_migration(qmp)
        qmp.execute("cont")
        cont = time.monotonic() - started
        cpu_cont = cpu_seconds(self.process.pid)
        answered = self.agent.wait() - started
        return {"total": cont, "qmp_up": qmp_up, "agent": answered, "cpu_up": cpu_up, "cpu_cont": cpu_cont,
                "cpu_agent": cpu_seconds(self.process.pid)}  # fmt: skip

    def standby(self) -> dict[str, float]:
        assert self.qmp is not None and self.process is not None
        qmp = self.qmp
        started = time.monotonic()
        qmp.execute("migrate-set-capabilities", IGNORE_SHARED)
        qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        qmp.execute("stop")
        stopped = time.monotonic()
        qmp.execute("migrate", {"uri": "exec:cat > vm.state"})
        self._wait_migration(qmp)
        saved = time.monotonic()
        with contextlib.suppress(OSError, EOFError):
            qmp.execute("quit")
        self.process.wait(timeout=30)
        qmp.close()
        # Like the server: the agent link stays until QEMU is gone, so the guest is saved linked.
        if self.agent is not None:
            self.agent.close()
        self.qmp, self.process, self.agent = None, None, None
        done = time.monotonic()
        return {"total": done - started, "migrate": saved - stopped, "quit": done - saved}

    def rtt(self) -> float:
        qmp = self.qmp
        assert qmp is not None
        return timed(lambda: qmp.execute("query-status"))[0]

    def kill(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.process is not None:
            kill_pids([self.process.pid])
            self.process.wait(timeout=10)
            self.process = None


# ---- the guest's console, watched from the host --------------------------------------------------


class ConsoleWatch:
    """Times at which the console file grew, polled every millisecond in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.changes: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = -1
        while not self._stop.is_set():
            try:
                size = os.stat(self.path).st_size
            except FileNotFoundError:
                size = -1
            if size != last:
                self.changes.append(time.monotonic())
                last = size
            time.sleep(0.001)

    def largest_gap(self, start: float, end: float) -> float:
        inside = [t for t in self.changes if start <= t <= end]
        return max((b - a for a, b in itertools.pairwise(inside)), default=float("nan"))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# ---- helpers --------------------------------------------------------------------------------------


def guest_sh(client: Hypeman, instance_id: str, script: str) -> str:
    result = sdk_exec(client, instance_id, ["/bin/sh", "-c", script])
    output = result.output.decode(errors="replace")
    if result.exit_code != 0:
        raise RuntimeError(f"guest command failed ({result.exit_code}): {script}\n{output}")
    return output


def run_true(client: Hypeman, instance_id: str) -> None:
    result = sdk_exec(client, instance_id, ["true"])
    if result.exit_code != 0:
        raise RuntimeError(f"exec true in {instance_id} exited {result.exit_code}")


def du_bytes(path: Path) -> int:
    """Allocated bytes under ``path``; hard links counted once (``du`` does that)."""
    out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def fs_used(path: Path) -> int:
    """The filesystem's used bytes, after a syncfs (XFS allocates lazily; shared extents count once)."""
    subprocess.run(["sync", "-f", str(path)], check=True)
    stat = os.statvfs(path)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time a process has used so far (NaN if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def run(argv: list[str]) -> float:
    return timed(lambda: subprocess.run(argv, check=True, capture_output=True))[0]


def fs_type(path: Path) -> str:
    found = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return found.stdout.strip()


@contextlib.contextmanager
def filesystem(kind: str, base: Path) -> Iterator[Path]:
    """A directory for a whole run: on ``base``'s filesystem, or on a fresh loop-mounted XFS."""
    root = Path(tempfile.mkdtemp(prefix=f"hm-snap-{kind}-", dir=base))
    if kind != "xfs":
        try:
            yield root
        finally:
            kill_pids(qemu_pids(root))
            shutil.rmtree(root, ignore_errors=True)
        return
    if shutil.which("mkfs.xfs") is None:
        raise SystemExit("mkfs.xfs not found: apt-get install -y --no-install-recommends xfsprogs")
    image, mount = root / "xfs.img", root / "m"
    mount.mkdir()
    device = ""
    mounted = False
    try:
        subprocess.run(["truncate", "-s", "8G", str(image)], check=True)
        device = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True,
                                text=True).stdout.strip()
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", device], check=True, capture_output=True)
        subprocess.run(["mount", device, str(mount)], check=True)
        mounted = True
        yield mount
    finally:
        kill_pids(qemu_pids(root))
        if mounted:
            for attempt in range(20):
                if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
                    break
                kill_pids(qemu_pids(root))
                time.sleep(0.5)
                if attempt == 19:
                    print(f"WARNING: {mount} stays busy; lazy unmount", flush=True)
                    subprocess.run(["umount", "-l", str(mount)], check=False)
        if device:
            subprocess.run(["losetup", "-d", device], check=False)
        shutil.rmtree(root, ignore_errors=True)


# ---- one filesystem ----------------------------------------------------------------------------------


@dataclass
class Guest:
    size: GuestSize
    id: str = ""
    fill_s: float = 0.0


class Bench:
    def __init__(self, server: Server, client: Hypeman, root: Path, fs: str, params: Params) -> None:
        self.server, self.client, self.root, self.fs, self.params = server, client, root, fs, params
        self.data = server.data_dir
        self.http = httpx.Client(base_url=server.base_url, timeout=30)

    def guest_dir(self, instance_id: str) -> Path:
        return self.data / "guests" / instance_id

    def snapshot_dir(self, snapshot_id: str) -> Path:
        return self.data / "snapshots" / snapshot_id / "guest"

    # -- preparing the guests

    def make_guest(self, guest: Guest) -> None:
        created = self.client.instances.create(
            name=f"src-{guest.size.label}", image=demo.DEMO_NAME, size=guest.size.size, overlay_size="64MB",
            vcpus=1, network={"enabled": False}, entrypoint=["/bin/sh", "-c"], cmd=[TICKER],
        )  # fmt: skip
        guest.id = created.id
        waited = self.client.instances.wait(created.id, state="Running", api_timeout="300s")
        if waited.state != "Running":
            raise RuntimeError(f"{guest.size.label}: {waited.state} {waited.state_error}")
        copies = max(1, round(guest.size.copies_mb / BUSYBOX_MB))
        script = (
            "mkdir -p /fill && mount -t tmpfs -o size=95% tmpfs /fill && "
            f"dd if=/dev/urandom of=/fill/random bs=1M count={guest.size.random_mb} 2>/dev/null && "
            f"cat {' '.join(['/bin/busybox'] * 10)} > /fill/b0 && "
            f"i=1; while [ $i -lt {copies} ]; do "
            "dd if=/fill/b0 of=/fill/b$i bs=1M 2>/dev/null; i=$((i+1)); done; "
            "sync; free -m | sed -n 2p"
        )
        guest.fill_s, out = timed(lambda: guest_sh(self.client, guest.id, script))
        print(f"  {guest.size.label}: filled in {guest.fill_s:.0f} s; guest `free -m`: {out.split()}",
              flush=True)

    # -- standby and restore against bare QEMU

    def standby_restore(self, guest: Guest, res: Results) -> None:
        directory = self.guest_dir(guest.id)
        scratch = self.root / f"bare-{guest.size.label}"
        (scratch / "logs").mkdir(parents=True)
        for name in ("memory.ram", "vm.state", "overlay.raw", "config.disk"):
            run(["cp", "--sparse=always", "--reflink=auto", str(directory / name), str(scratch / name)])
        argv = json.loads((directory / "qemu-config.json").read_text())["argv"]
        bare = BareVM(argv, scratch)
        try:
            bare.restore()
            self.restore(guest.id)
            res.values["state_bytes"] = (scratch / "vm.state").stat().st_size
            for index in range(self.params.cycles):
                steps: list[tuple[str, Callable[[], None]]] = [
                    ("h_standby", lambda: res.add("h_standby", self.standby(guest.id))),
                    ("b_standby", lambda: self._bare_standby(bare, res)),
                    ("h_restore", lambda: self._restore_then_exec(guest.id, res)),
                    ("b_restore", lambda: self._bare_restore(bare, res)),
                ]
                if index % 2:
                    steps = [steps[1], steps[0], steps[3], steps[2]]
                for _, step in steps:
                    step()
                self._profile(bare, scratch, res)
                print(f"    run {index + 1}: standby {res.last_ms('h_standby')} ms "
                      f"(bare {res.last_ms('b_standby')}), restore -> Running "
                      f"{res.last_ms('h_restore')} ms (bare {res.last_ms('b_restore')}), "
                      f"-> first exec {res.last_ms('h_restore_exec')} ms", flush=True)
        finally:
            bare.kill()
            shutil.rmtree(scratch, ignore_errors=True)

    def _restore_then_exec(self, instance_id: str, res: Results) -> None:
        """Restore, then at once an exec (what a client that got Running does), then another."""
        started = time.monotonic()
        res.add("h_restore", self.restore(instance_id))
        pid = vmm_pid(self.guest_dir(instance_id))
        cpu_before = cpu_seconds(pid)
        run_true(self.client, instance_id)
        res.add("h_restore_exec", time.monotonic() - started)
        cpu_first = cpu_seconds(pid)
        res.add("exec_steady", timed(lambda: run_true(self.client, instance_id))[0])
        res.add("cpu_exec_first", cpu_first - cpu_before)
        res.add("cpu_exec_steady", cpu_seconds(pid) - cpu_first)

    def _bare_standby(self, bare: BareVM, res: Results) -> None:
        parts = bare.standby()
        res.add("b_standby", parts["total"])
        res.add("b_standby_migrate", parts["migrate"])
        res.add("b_standby_quit", parts["quit"])

    def _bare_restore(self, bare: BareVM, res: Results) -> None:
        parts = bare.restore()
        res.add("b_restore", parts["total"])
        res.add("b_qmp_up", parts["qmp_up"])
        res.add("b_restore_agent", parts["agent"])
        res.add("b_cpu_up", parts["cpu_up"])
        res.add("b_cpu_cont", parts["cpu_cont"] - parts["cpu_up"])
        res.add("b_cpu_agent", parts["cpu_agent"] - parts["cpu_cont"])

    def _profile(self, bare: BareVM, scratch: Path, res: Results) -> None:
        """hypemand's extra steps, by hand: what standby and restore add to the bare recipe."""
        res.add("p_qmp_rtt", bare.rtt())
        probe = scratch / "profile.state"
        shutil.copyfile(scratch / "vm.state", probe)

        def fsync_rename() -> None:  # save_state: fsync the state file, rename, fsync the directory
            fsync_path(probe)
            os.replace(probe, scratch / "profile.renamed")
            fsync_path(scratch)

        res.add("p_fsync_state", timed(fsync_rename)[0])
        res.add("p_digest_state", timed(lambda: file_digest(scratch / "profile.renamed"))[0])
        record = json.dumps({"created_at": time.time(), "padding": "x" * 600}).encode()
        res.add("p_record", timed(lambda: write_atomic(scratch / "profile.json", record))[0])
        res.add("p_http", timed(lambda: self.http.get("/health").raise_for_status())[0])
        (scratch / "profile.renamed").unlink()

    def standby(self, instance_id: str) -> float:
        seconds, instance = timed(lambda: self.client.instances.standby(instance_id))
        if instance.state != "Standby":
            raise RuntimeError(f"standby answered {instance.state}")
        return float(seconds)

    def restore(self, instance_id: str) -> float:
        started = time.monotonic()
        instance = self.client.instances.restore(instance_id)
        if instance.state != "Running":
            waited = self.client.instances.wait(instance_id, state="Running", api_timeout="120s")
            if waited.state != "Running":
                raise RuntimeError(f"restore ended {waited.state}")
        return time.monotonic() - started

    # -- snapshot of a Running guest: the pause it sees

    def pause(self, guest: Guest, res: Results) -> None:
        directory = self.guest_dir(guest.id)
        memory = directory / "memory.ram"
        src = str(memory)
        res.values["ram_allocated"] = allocated(memory)
        guest_sh(self.client, guest.id, "touch /tmp/tick")
        watch = ConsoleWatch(directory / "logs" / "app.log")
        target = self.root / "cp-test.ram"
        try:
            time.sleep(1.0)
            for index in range(self.params.runs):

                def snapshot() -> None:
                    before = time.monotonic()
                    time.sleep(0.5)
                    started = time.monotonic()
                    created = self.client.instances.snapshots.create(guest.id, kind="Standby")
                    ended = time.monotonic()
                    time.sleep(0.3)
                    res.add("snap_create", ended - started)
                    res.add("pause", watch.largest_gap(started - 0.02, ended + 0.3))
                    res.add("pause_baseline", watch.largest_gap(before, started))
                    self.client.snapshots.delete(created.id)

                def copies() -> None:
                    res.add("cp_sparse", run(["cp", "--sparse=always", "--reflink=never", src, str(target)]))
                    res.add("cp_fsync", timed(lambda: fsync_path(target))[0])
                    target.unlink()
                    if self.fs == "xfs":
                        res.add("cp_reflink", run(["cp", "--reflink=always", str(memory), str(target)]))
                        target.unlink()

                for step in (snapshot, copies) if index % 2 == 0 else (copies, snapshot):
                    step()
                print(f"    run {index + 1}: snapshot create {res.last_ms('snap_create')} ms, "
                      f"pause seen {res.last_ms('pause')} ms (ticks otherwise "
                      f"<= {res.last_ms('pause_baseline')} ms apart), cp --sparse=always "
                      f"{res.last_ms('cp_sparse')} ms + fsync {res.last_ms('cp_fsync')} ms", flush=True)
        finally:
            watch.close()
            target.unlink(missing_ok=True)
            guest_sh(self.client, guest.id, "rm -f /tmp/tick")

    # -- compression, digest, forks (the source in Standby)

    def stored(self, guest: Guest, res: Results) -> None:
        self.standby(guest.id)
        du_before, used_before = du_bytes(self.data), fs_used(self.data)
        seconds, base = timed(lambda: self.client.instances.snapshots.create(guest.id, kind="Standby"))
        res.values["snap_from_standby"] = seconds
        memory = self.snapshot_dir(base.id) / "memory.ram"
        res.values["snapshot_allocated"] = allocated(memory)
        try:
            self.compression(guest, memory, res)
            digest = json.loads((memory.parent.parent / "snapshot.json").read_text())["digests"]["memory.ram"]
            for _ in range(self.params.verify_runs):
                res.add("verify", timed(lambda: verify_file(memory, digest))[0])
            self.forks(guest, base.id, du_before, used_before, res)
            if guest.size == self.params.sizes[0]:
                self.fanout(guest, base.id, res)
        finally:
            with contextlib.suppress(Exception):
                self.client.snapshots.delete(base.id)

    def compression(self, guest: Guest, raw: Path, res: Results) -> None:
        cli = self.root / "cli"
        cli.mkdir(exist_ok=True)
        out, back = cli / "memory.zst", cli / "memory.back"
        src = str(raw)

        def ours() -> None:
            started = time.monotonic()
            snap = self.client.instances.snapshots.create(
                guest.id, kind="Standby", compression={"enabled": True, "algorithm": "zstd", "level": 1}
            )
            created = time.monotonic()
            while (got := self.client.snapshots.get(snap.id)).compression_state == "compressing":
                if time.monotonic() - started > 600:
                    raise RuntimeError("compression did not finish in 10 minutes")
                time.sleep(0.02)
            done = time.monotonic()
            if got.compression_state != "compressed" or not got.compressed_size_bytes:
                raise RuntimeError(f"compression ended {got.compression_state}: {got.compression_error}")
            res.add("comp_create", created - started)
            res.add("comp_background", done - created)
            res.values["comp_size"] = got.compressed_size_bytes
            name = f"unz-{guest.size.label}-{len(res.samples['comp_create'])}"
            seconds, fork_id = timed(lambda: self.fork(snap.id, name))
            res.add("comp_fork", seconds)
            self.client.instances.delete(fork_id)
            self.client.snapshots.delete(snap.id)

        def theirs() -> None:
            for key, extra in (("zstd1", []), ("zstdlong", ["--long=27"])):
                res.add(key, run(["zstd", "-q", "-f", "-1", "-T0", *extra, src, "-o", str(out)])
                        + timed(lambda: fsync_path(out))[0])
                res.values[f"{key}_size"] = out.stat().st_size
            res.add("zstd_d", run(["zstd", "-q", "-d", "-f", "--long=27", str(out), "-o", str(back)])
                    + timed(lambda: fsync_path(back))[0])
            out.unlink()
            back.unlink()

        for index in range(self.params.compression_runs):
            for step in (ours, theirs) if index % 2 == 0 else (theirs, ours):
                step()
            print(f"    compression run {index + 1}: hypemand zstd-1 {res.last_ms('comp_background')} ms "
                  f"in the background ({res.values['comp_size'] / MB:.0f} MB), zstd -1 -T0 "
                  f"{res.last_ms('zstd1')} ms ({res.values['zstd1_size'] / MB:.0f} MB), --long=27 "
                  f"{res.last_ms('zstdlong')} ms ({res.values['zstdlong_size'] / MB:.0f} MB); "
                  f"fork of it {res.last_ms('comp_fork')} ms", flush=True)
        shutil.rmtree(cli, ignore_errors=True)

    def fork(self, snapshot_id: str, name: str, target: Literal["Running", "Standby"] = "Running") -> str:
        fork = self.client.snapshots.fork(snapshot_id, name=name, target_state=target)
        if target == "Running" and fork.state != "Running":
            waited = self.client.instances.wait(fork.id, state="Running", api_timeout="120s")
            if waited.state != "Running":
                raise RuntimeError(f"fork {name} ended {waited.state}")
        return fork.id

    def forks(self, guest: Guest, snapshot_id: str, du_before: int, used_before: int, res: Results) -> None:
        capacity = (os.cpu_count() or 1) * 4
        running_ids: list[str] = []
        all_ids: list[str] = []
        try:
            for index in range(self.params.forks):
                target: Literal["Running", "Standby"] = "Running"
                if len(running_ids) >= capacity:
                    target = "Standby"
                name = f"f-{guest.size.label}-{index}"
                seconds, fork_id = timed(lambda: self.fork(snapshot_id, name, target))  # noqa: B023
                all_ids.append(fork_id)
                if target == "Running":
                    running_ids.append(fork_id)
                    res.add("fork_running", seconds)
                if index == 0:
                    res.values["fork_alone"] = du_bytes(self.guest_dir(fork_id))
                    res.values["du_1"] = du_bytes(self.data) - du_before
                    res.values["used_1"] = fs_used(self.data) - used_before
                    pid = vmm_pid(self.guest_dir(fork_id))
                    res.values["pss_one"] = pss_bytes(pid) if pid else float("nan")
            res.values["forks"] = len(all_ids)
            res.values["forks_standby"] = len(all_ids) - len(running_ids)
            res.values["forks_running"] = len(running_ids)
            res.values["du_n"] = du_bytes(self.data) - du_before
            res.values["used_n"] = fs_used(self.data) - used_before
            pids = [vmm_pid(self.guest_dir(fork_id)) for fork_id in running_ids]
            res.values["pss_sum"] = sum(pss_bytes(pid) for pid in pids if pid)
            print(f"    {len(all_ids)} forks ({len(running_ids)} Running): fork -> Running median "
                  f"{res.med('fork_running'):.2f} s; disk {res.values['du_1'] / MB:.0f} MB after one, "
                  f"{res.values['du_n'] / MB:.0f} MB after {len(all_ids)}", flush=True)
        finally:
            for fork_id in all_ids:
                with contextlib.suppress(Exception):
                    self.client.instances.delete(fork_id)


    def fanout(self, guest: Guest, snapshot_id: str, res: Results) -> None:
        """N forks of one snapshot at once, each to Running, timed from its own call."""
        for index in range(self.params.fanout_runs):
            for n in FANOUT:
                qemu_cpu: list[float] = []

                def one(slot: int) -> str:
                    name = f"fan-{guest.size.label}-{n}-{index}-{slot}"  # noqa: B023
                    seconds, fork_id = timed(lambda: self.fork(snapshot_id, name))
                    res.add(f"fanout_{n}", seconds)  # noqa: B023
                    qemu_cpu.append(cpu_seconds(vmm_pid(self.guest_dir(fork_id))))  # noqa: B023
                    return str(fork_id)

                server_before = cpu_seconds(self.server.process.pid)
                fork_ids: list[str] = []
                try:
                    with ThreadPoolExecutor(max_workers=n) as pool:
                        fork_ids = list(pool.map(one, range(n)))
                    server_cpu = cpu_seconds(self.server.process.pid) - server_before
                    res.add(f"fanout_{n}_server_cpu", server_cpu / n)
                    res.add(f"fanout_{n}_qemu_cpu", median(qemu_cpu))
                finally:
                    for fork_id in fork_ids:
                        with contextlib.suppress(Exception):
                            self.client.instances.delete(fork_id)
            print(f"    concurrent forks, run {index + 1}: "
                  + ", ".join(f"N={n} slowest {max(res.samples[f'fanout_{n}'][-n:]) * 1000:.0f} ms"
                              for n in FANOUT), flush=True)


def run_filesystem(fs: str, root: Path, params: Params) -> dict[str, Results]:
    server = Server.start(root / "data", root / "server.log")
    results = {size.label: Results() for size in params.sizes}
    try:
        server.install_demo()
        with server.client() as client:
            bench = Bench(server, client, root, fs, params)
            guests = [Guest(size) for size in params.sizes]
            print(f"[{fs}] booting and filling {len(guests)} guests ...", flush=True)
            with ThreadPoolExecutor(max_workers=len(guests)) as pool:
                list(pool.map(bench.make_guest, guests))
            for guest in guests:
                bench.standby(guest.id)
            for guest in guests:
                res = results[guest.size.label]
                res.values["fill_s"] = guest.fill_s
                print(f"[{fs}] {guest.size.label}: standby / restore ...", flush=True)
                bench.standby_restore(guest, res)
                print(f"[{fs}] {guest.size.label}: snapshots of the Running guest ...", flush=True)
                bench.pause(guest, res)
                print(f"[{fs}] {guest.size.label}: compression, digest, forks ...", flush=True)
                bench.stored(guest, res)
            bench.http.close()
    finally:
        server.shutdown()
        kill_pids(qemu_pids(root))
    return results


# ---- report ------------------------------------------------------------------------------------------


def both(r: Results, key: str, reference: str) -> str:
    return f"{r.med(key) / r.med(reference):4.2f}/{r.paired(key, reference):4.2f}"


def fanout_cell(r: Results, n: int) -> str:
    return f"{r.pct(f'fanout_{n}', 0.5) * 1000:4.0f} /{r.pct(f'fanout_{n}', 0.95) * 1000:4.0f}"


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.0f}"


def report(fs: str, where: str, results: dict[str, Results], params: Params) -> list[tuple[str, bool, str]]:
    labels = [size.label for size in params.sizes]
    rows: list[tuple[str, Callable[[Results], str]]] = [
        ("RAM file allocated (MB)", lambda r: f"{r.values.get('ram_allocated', 0) / MB:8.0f}"),
        ("saved device state (KB)", lambda r: f"{r.values.get('state_bytes', 0) / 1000:8.0f}"),
        ("standby, hypemand API (ms)", lambda r: ms(r.med("h_standby"))),
        ("standby, bare x-ignore-shared (ms)", lambda r: ms(r.med("b_standby"))),
        ("  ratio (of medians / paired)",
         lambda r: both(r, "h_standby", "b_standby")),
        ("  bare: migrate / quit+exit (ms)",
         lambda r: f"{r.med('b_standby_migrate') * 1000:4.0f} /{r.med('b_standby_quit') * 1000:3.0f}"),
        ("restore -> Running, hypemand (ms)", lambda r: ms(r.med("h_restore"))),
        ("restore -> cont, bare (ms)", lambda r: ms(r.med("b_restore"))),
        ("  ratio (of medians / paired)",
         lambda r: both(r, "h_restore", "b_restore")),
        ("  bare: spawn -> QMP up (ms)", lambda r: ms(r.med("b_qmp_up"))),
        ("restore -> agent + clock, bare (ms)", lambda r: ms(r.med("b_restore_agent"))),
        ("  hypemand / that (medians / paired)",
         lambda r: both(r, "h_restore", "b_restore_agent")),
        ("  bare QEMU CPU: up/load+cont/agent (ms)",
         lambda r: f"{r.med('b_cpu_up') * 1000:3.0f} /{r.med('b_cpu_cont') * 1000:3.0f} /"
                   f"{r.med('b_cpu_agent') * 1000:3.0f}"),
        ("restore -> first exec answered (ms)", lambda r: ms(r.med("h_restore_exec"))),
        ("  - restore -> Running, paired (ms)",
         lambda r: ms(r.paired_diff("h_restore_exec", "h_restore"))),
        ("  steady exec right after (ms)", lambda r: ms(r.med("exec_steady"))),
        ("  QEMU CPU: first / steady exec (ms)",
         lambda r: f"{r.med('cpu_exec_first') * 1000:4.0f} /{r.med('cpu_exec_steady') * 1000:3.0f}"),
        ("by hand: QMP round trip (ms)", lambda r: f"{r.med('p_qmp_rtt') * 1000:8.1f}"),
        ("by hand: fsync state+rename+dir (ms)", lambda r: f"{r.med('p_fsync_state') * 1000:8.1f}"),
        ("by hand: digest of state file (ms)", lambda r: f"{r.med('p_digest_state') * 1000:8.1f}"),
        ("by hand: atomic record write (ms)", lambda r: f"{r.med('p_record') * 1000:8.1f}"),
        ("by hand: HTTP GET /health (ms)", lambda r: f"{r.med('p_http') * 1000:8.1f}"),
        ("snapshot create, Running (ms)", lambda r: ms(r.med("snap_create"))),
        ("  pause the guest sees (ms)", lambda r: ms(r.med("pause"))),
        ("  tick gaps without snapshot (ms)", lambda r: ms(r.med("pause_baseline"))),
        ("cp --sparse=always RAM file (ms)", lambda r: ms(r.med("cp_sparse"))),
        ("  + its fsync (ms)", lambda r: ms(r.med("cp_fsync"))),
        ("  pause / cp --sparse", lambda r: f"{r.med('pause') / r.med('cp_sparse'):8.2f}"),
        ("  pause / (cp --sparse + fsync)",
         lambda r: f"{r.med('pause') / (r.med('cp_sparse') + r.med('cp_fsync')):8.2f}"),
    ]
    if fs == "xfs":
        rows.append(("cp --reflink=always RAM file (ms)", lambda r: ms(r.med("cp_reflink"))))
    rows += [
        ("snapshot create, Standby (ms)", lambda r: ms(r.values.get("snap_from_standby", float("nan")))),
        ("fork -> Running (ms)", lambda r: ms(r.med("fork_running"))),
        ("  - restore -> Running (ms)", lambda r: ms(r.med("fork_running") - r.med("h_restore"))),
        ("  digest verify of RAM file (ms)", lambda r: ms(r.med("verify"))),
        ("  verify share of fork", lambda r: f"{r.med('verify') / r.med('fork_running'):8.0%}"),
        ("forks made (Running)",
         lambda r: f"{r.values.get('forks', 0):5.0f} ({r.values.get('forks_running', 0):.0f})"),
        ("one fork's own files, du (MB)", lambda r: f"{r.values.get('fork_alone', 0) / MB:8.0f}"),
        ("data dir growth, du: after 1 fork (MB)", lambda r: f"{r.values.get('du_1', 0) / MB:8.0f}"),
        ("  after all forks (MB)", lambda r: f"{r.values.get('du_n', 0) / MB:8.0f}"),
        ("  all forks / one fork's own files",
         lambda r: f"{r.values.get('du_n', 0) / max(1.0, r.values.get('fork_alone', 0)):8.2f}"),
        ("  each fork after the first, du (MB)",
         lambda r: f"{(r.values['du_n'] - r.values['du_1']) / max(1.0, r.values['forks'] - 1) / MB:8.1f}"),
    ]
    if fs == "xfs":
        rows += [
            ("fs used growth: after 1 fork (MB)", lambda r: f"{r.values.get('used_1', 0) / MB:8.1f}"),
            ("  after all forks (MB)", lambda r: f"{r.values.get('used_n', 0) / MB:8.1f}"),
            ("  all forks / one fork's own files",
             lambda r: f"{r.values.get('used_n', 0) / max(1.0, r.values.get('fork_alone', 0)):8.3f}"),
        ]
    rows += [
        ("PSS one fork alone (MB)", lambda r: f"{r.values.get('pss_one', 0) / MB:8.0f}"),
        ("PSS sum, Running forks (MB)", lambda r: f"{r.values.get('pss_sum', 0) / MB:8.0f}"),
        ("  / (count x one)",
         lambda r: f"{r.values.get('pss_sum', 0) / max(1.0, r.values.get('forks_running', 0) * r.values.get('pss_one', 1)):8.2f}"),  # noqa: E501
        ("compression create call (ms)", lambda r: ms(r.med("comp_create"))),
        ("compression, background (s)", lambda r: f"{r.med('comp_background'):8.2f}"),
        ("zstd -1 -T0 + fsync (s)", lambda r: f"{r.med('zstd1'):8.2f}"),
        ("zstd -1 -T0 --long=27 + fsync (s)", lambda r: f"{r.med('zstdlong'):8.2f}"),
        ("  time ours / zstd -1 -T0", lambda r: f"{r.med('comp_background') / r.med('zstd1'):8.2f}"),
        ("size ours / --long=27 / -1 (MB)",
         lambda r: f"{r.values.get('comp_size', 0) / MB:4.0f} /{r.values.get('zstdlong_size', 0) / MB:4.0f} /"
                   f"{r.values.get('zstd1_size', 0) / MB:4.0f}"),
        *[(f"{n} forks at once -> Running p50/p95", lambda r, n=n: fanout_cell(r, n))
          for n in FANOUT],
        ("  p95 of 8 / p50 of 1", lambda r: f"{r.pct('fanout_8', 0.95) / r.pct('fanout_1', 0.5):8.2f}"),
        ("  CPU per fork: QEMU / server, N=1 (ms)",
         lambda r: f"{r.med('fanout_1_qemu_cpu') * 1000:4.0f} /{r.med('fanout_1_server_cpu') * 1000:3.0f}"),
        ("  CPU per fork: QEMU / server, N=8 (ms)",
         lambda r: f"{r.med('fanout_8_qemu_cpu') * 1000:4.0f} /{r.med('fanout_8_server_cpu') * 1000:3.0f}"),
        ("  8 x CPU per fork / cores (ms)",
         lambda r: ms(8 * (r.med("fanout_8_qemu_cpu") + r.med("fanout_8_server_cpu")) / CORES)),
        ("fork of compressed (ms)", lambda r: ms(r.med("comp_fork"))),
        ("  - fork of raw = expansion (ms)", lambda r: ms(r.med("comp_fork") - r.med("fork_running"))),
        ("zstd -d --long=27 + fsync (ms)", lambda r: ms(r.med("zstd_d"))),
        ("guest fill time (s)", lambda r: f"{r.values.get('fill_s', 0):8.0f}"),
    ]
    print(f"\n=== {fs} ({where}); medians of alternating runs: {params.cycles} standby/restore, "
          f"{params.runs} snapshot, {params.compression_runs} compression ===")
    print(f"{'':40}" + "".join(f"{label:>10}" for label in labels))
    for title, cell in rows:
        cells = []
        for label in labels:
            try:
                cells.append(f"{cell(results[label]):>10}")
            except (KeyError, ValueError, ZeroDivisionError, TypeError):
                cells.append(f"{'-':>10}")
        print(f"{title:40}" + "".join(cells))

    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append((f"[{fs}] {name}", ok, detail))

    for label in labels:
        r = results[label]
        ratio = r.med("h_standby") / r.med("b_standby")
        check(f"{label} standby <= 1.2x bare", ratio <= 1.2, f"{ratio:.2f}x")
        ratio = r.med("h_restore") / r.med("b_restore")
        check(f"{label} restore -> Running <= 1.2x bare", ratio <= 1.2, f"{ratio:.2f}x")
        ratio = r.med("h_restore") / r.med("b_restore_agent")
        check(f"{label} restore -> Running <= 1.2x bare with agent answered", ratio <= 1.2, f"{ratio:.2f}x")
        extra = r.paired_diff("h_restore_exec", "h_restore")
        check(f"{label} restore -> first exec <= restore -> Running + 20 ms", extra <= 0.02,
              f"+{extra * 1000:.0f} ms")
        extra = r.med("fork_running") - r.med("h_restore")
        check(f"{label} fork -> Running <= restore + 100 ms", extra <= 0.1, f"+{extra * 1000:.0f} ms")
        if r.samples.get("fanout_8"):
            ratio = r.pct("fanout_8", 0.95) / r.pct("fanout_1", 0.5)
            check(f"{label} p95 of 8 concurrent forks <= 2x one fork", ratio <= 2.0, f"{ratio:.2f}x")
        # du counts a reflinked extent in every file that shares it: on XFS the filesystem's
        # used bytes are the disk cost.
        key = "used" if fs == "xfs" else "du"
        disk = r.values.get(f"{key}_n", 0) / max(1.0, r.values.get("fork_alone", 0))
        check(f"{label} {r.values.get('forks', 0):.0f} forks < 2x the disk of one ({key})", disk < 2,
              f"{disk:.3f}x")
        if fs != "xfs":
            ratio = r.med("pause") / r.med("cp_sparse")
            check(f"{label} pause <= cp --sparse=always", ratio <= 1.0, f"{ratio:.2f}x")
        ratio = r.med("comp_background") / r.med("zstd1")
        check(f"{label} codec at least zstd -1 -T0's speed", ratio <= 1.0, f"time {ratio:.2f}x")
        ratio = r.values.get("comp_size", 0) / max(1.0, r.values.get("zstdlong_size", 0))
        check(f"{label} codec at least --long=27's ratio", ratio <= 1.0, f"size {ratio:.2f}x")
    if len(labels) >= 2:
        small, big = results[labels[0]], results[labels[-1]]
        ratio = big.med("h_standby") / small.med("h_standby")
        check("standby 1 GiB within 1.5x of 256 MiB", ratio <= 1.5, f"{ratio:.2f}x")
        if fs == "xfs":
            ratio = big.med("pause") / small.med("pause")
            check("pause nearly flat in RAM size (1 GiB <= 1.5x 256 MiB)", ratio <= 1.5, f"{ratio:.2f}x")
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true",
                        help="2 runs, 1 compression run, 4 forks, 2 fork fan-outs, smaller fills")
    parser.add_argument("--runs", type=int, help="alternating runs for medians (default 5)")
    parser.add_argument("--fs", default="ext4,xfs", help="ext4 (the --dir filesystem), xfs (loop mount)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the run's directories (and the XFS image) go; default $TMPDIR")
    args = parser.parse_args()
    params = Params()
    if args.quick:
        params = Params(runs=2, cycles=3, compression_runs=1, forks=4, verify_runs=2, fanout_runs=2,
                        sizes=QUICK_SIZES)
    if args.runs:
        params.runs = args.runs
    if shutil.which("zstd") is None:
        raise SystemExit("the zstd CLI is needed: apt-get install -y zstd")
    started = time.monotonic()
    load_at_start = load_average()
    print(f"load average at start: {load_at_start} ({CORES} cores)", flush=True)
    done: list[tuple[str, str, dict[str, Results]]] = []
    try:
        with terminate_as_exit():
            for fs in [name.strip() for name in args.fs.split(",") if name.strip()]:
                with filesystem(fs, args.dir) as root:
                    where = f"{fs_type(root)} at {root}"
                    print(f"\n##### {fs}: {where}", flush=True)
                    done.append((fs, where, run_filesystem(fs, root, params)))
    finally:
        checks: list[tuple[str, bool, str]] = []
        for fs, where, results in done:
            checks += report(fs, where, results, params)
        print(f"\n=== targets (issues 8 and 13) === total run time {time.monotonic() - started:.0f} s; "
              f"load average at start {load_at_start}, at end {load_average()}")
        for name, ok, detail in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {name:62} {detail}")
        print("command line:", shlex.join([".venv/bin/python", "-m", "bench.snapshots", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
