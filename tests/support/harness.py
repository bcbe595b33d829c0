"""One way for tests to run ``hypemand serve``, and to check what a server leaves behind.

In the spirit of Firecracker's ``Microvm`` fixture: a :class:`Harness` starts servers (VMs are
started through their API), stops them whatever happens, and then reports as problems

* a traceback, or a record at level ERROR or CRITICAL, in a server's log;
* a process left running: one whose command line or working directory lies in a data
  directory of the harness, or a descendant of one of its servers;
* a file left behind in a data directory: temporary files (``*.tmp``, ``*.partial``), a fork's
  staging directory (``snapshots/.fork-*``), an instance directory once every instance has been
  deleted, a snapshot directory that is not a listed snapshot.

At teardown the harness deletes every instance through the API of each server still running
(that is cleanup, and also checks that a delete removes everything), stops the servers, kills
and reports processes left over, and reports files left over.

Every data directory's servers build their VM network (bridge, TAPs, NAT, Caddy) in a network
namespace of their own, ``hmt-<random>``, made by the first server and removed by :meth:`finish`
once its servers and VMs are gone: nothing of the project ever lands in the root namespace, and
two data directories never share a bridge. Where namespaces cannot be made (no root), the
servers run QEMU's user-mode networking.

Log lines a test provokes on purpose are accepted only through :class:`LogAllowance` (the
``server_log_allows`` marker): a list of regular expressions, each naming one expected record.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from hypeman import Hypeman

from tests.support.net import free_port

REPO = Path(__file__).resolve().parent.parent.parent
SHARED_SYSTEM_DIR = Path(os.environ.get("HYPEMAND_SYSTEM_DIR", "/var/lib/hypemand/system"))

SERVER_ARGV = [sys.executable, "-m", "hypemand.cli.main", "serve"]
TOKEN_ARGV = [sys.executable, "-m", "hypemand.cli.main", "token"]
START_TIMEOUT = 60.0
CLEANUP_TIMEOUT = 120.0

MARKER = "server_log_allows"

# A log record starts with the server's format ("<date> <time> LEVEL name: ...") or uvicorn's
# ("LEVEL:     ..."); every other line continues the record above it (e.g. a traceback).
RECORD_START = re.compile(
    r"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+) |(?P<uvlevel>[A-Z]+):\s)"
)
BAD_LEVELS = {"ERROR", "CRITICAL"}
TRACEBACK = "Traceback (most recent call last)"
LEFTOVER_FILE = re.compile(r"(\.tmp|\.partial)$")


# ---- the server process ---------------------------------------------------------------------


@dataclass
class ServerProcess:
    base_url: str
    token: str
    data_dir: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Stop the server the way a service manager would (SIGTERM, then SIGKILL)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def strict_client(srv: ServerProcess, token: str | None = None, timeout: float | None = None) -> Hypeman:
    """An SDK client that neither retries nor forgives a response off the contract."""
    if timeout is None:
        return Hypeman(base_url=srv.base_url, api_key=token or srv.token, max_retries=0,
                       _strict_response_validation=True)
    return Hypeman(base_url=srv.base_url, api_key=token or srv.token, max_retries=0,
                   _strict_response_validation=True, timeout=timeout)


# The tests' servers may pull only from registries on this machine: a name that points
# elsewhere (the fuzzer makes many) is refused before any lookup leaves it.
LOCAL_REGISTRIES = "127.0.0.1,localhost,[::1]"


def server_environment(namespace: str | None = None) -> dict[str, str]:
    """``namespace``: the server's network namespace; None: user-mode networking."""
    env = dict(os.environ, HYPEMAND_SYSTEM_DIR=str(SHARED_SYSTEM_DIR), PYTHONUNBUFFERED="1",
               HYPEMAND_REGISTRIES=LOCAL_REGISTRIES, CADDY_STOP_ON_SHUTDOWN="true")
    if namespace is None:
        env["HYPEMAND_NETWORK_MODE"] = "user"
        env.pop("HYPEMAND_NETWORK_NAMESPACE", None)
    else:
        env["HYPEMAND_NETWORK_MODE"] = "bridge"
        env["HYPEMAND_NETWORK_NAMESPACE"] = namespace
    return env


def namespaces_supported() -> bool:
    return os.geteuid() == 0 and Path("/var/run/netns").parent.exists() and bool(shutil.which("ip"))


def remove_namespace(name: str) -> None:
    """Remove a namespace a test server made (with what is left in it: TAPs, the bridge)."""
    if Path("/var/run/netns", name).exists():
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=30)


def launch(argv: Sequence[str], data_dir: Path, log_path: Path, port: int | None = None,
           namespace: str | None = None, env: Mapping[str, str] | None = None) -> ServerProcess:
    """Run ``argv --port P --data-dir D --log-level info``, wait for /health, mint a token.
    ``env``: variables added to the server's environment (a test-only setting, say)."""
    port = port or free_port()
    env = {**server_environment(namespace), **(env or {})}
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [*argv, "--port", str(port), "--data-dir", str(data_dir), "--log-level", "info"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        _await_health(process, base_url, log_path)
        token = subprocess.run(
            [*TOKEN_ARGV, "--data-dir", str(data_dir)],
            check=True, capture_output=True, text=True, env=env,
        ).stdout.strip()
    except BaseException:
        # Not handed to anyone yet (a failed start, an interrupted test run): ended here.
        if process.poll() is None:
            process.kill()
        process.wait()
        raise
    return ServerProcess(base_url, token, data_dir, port, process, log_path)


def _await_health(process: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log_path.read_text(errors='replace')}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not answer /health:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.1)  # a poll of /health, not a wait for a guest


# ---- what the log says ------------------------------------------------------------------------


def log_problems(text: str) -> list[str]:
    """The records of ``text`` that are problems: level ERROR or CRITICAL, or holding a traceback.
    Each is returned whole (its first line and the lines continuing it)."""
    records: list[list[str]] = []
    for line in text.splitlines():
        if RECORD_START.match(line) or not records:
            records.append([line])
        else:
            records[-1].append(line)
    problems = []
    for lines in records:
        found = RECORD_START.match(lines[0])
        level = (found.group("level") or found.group("uvlevel")) if found else None
        block = "\n".join(lines)
        if level in BAD_LEVELS or TRACEBACK in block:
            problems.append(block)
    return problems


@dataclass(frozen=True)
class LogAllowance:
    """Log records a test provokes on purpose: each pattern (``re.search``) accepts the problem
    records it matches, and only those."""

    patterns: tuple[str, ...] = ()

    @classmethod
    def of(cls, node: pytest.Item | pytest.Collector) -> LogAllowance:
        patterns: list[str] = []
        for marker in node.iter_markers(MARKER):
            if not marker.args or not all(isinstance(p, str) and p.strip() for p in marker.args):
                raise pytest.UsageError(f"{MARKER} needs one or more non-empty patterns ({node.nodeid})")
            patterns.extend(marker.args)
        return cls(tuple(patterns))

    def __add__(self, other: LogAllowance) -> LogAllowance:
        return LogAllowance(self.patterns + other.patterns)

    def unexpected(self, problems: Iterable[str]) -> list[str]:
        return [p for p in problems if not any(re.search(pattern, p) for pattern in self.patterns)]


# ---- processes --------------------------------------------------------------------------------


KILL_WAIT_SECONDS = 10.0  # a hang guard: a SIGKILLed process ends in milliseconds


@dataclass(frozen=True)
class Proc:
    pid: int
    start_time: str  # field 22 of /proc/<pid>/stat: tells a reused pid apart
    command: str


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of ``pid``, or None once it is gone (or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), fields[19]


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def descendants(root: int) -> list[Proc]:
    parents: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None:
            parents.setdefault(stat[0], []).append(pid)
            starts[pid] = stat[1]
    found: list[Proc] = []
    todo = list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(Proc(pid, starts[pid], _command(pid)))
        todo.extend(parents.get(pid, []))
    return found


def processes_in(directory: Path) -> list[Proc]:
    """Processes whose command line names a path in ``directory`` or whose working directory is
    in it (QEMU runs in its VM's directory). The test process itself is left out."""
    root = str(directory.resolve())
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        command = _command(pid)
        in_command = any(arg == root or arg.startswith(root + "/") or f"={root}/" in arg
                         or f",{root}/" in arg for arg in command.split())
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        if in_command or cwd == root or cwd.startswith(root + "/"):
            stat = _stat(pid)
            if stat is not None:
                found.append(Proc(pid, stat[1], command))
    return found


def still_running(proc: Proc) -> bool:
    stat = _stat(proc.pid)
    return stat is not None and stat[1] == proc.start_time


def kill(procs: Iterable[Proc]) -> None:
    """SIGKILL each of ``procs`` that is still that very process, and wait until each has ended
    (a SIGKILL is delivered, not done, when ``kill`` returns: a check right after saw it alive)."""
    sent = []
    for proc in procs:
        if still_running(proc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
                sent.append(proc)
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    while any(still_running(proc) for proc in sent) and time.monotonic() < deadline:
        time.sleep(0.01)


# ---- files ------------------------------------------------------------------------------------


def leftover_files(data_dir: Path, instances_deleted: bool, snapshot_ids: set[str] | None) -> list[str]:
    """Files and directories of ``data_dir`` nothing should have left there (see the module)."""
    found: list[str] = []
    if not data_dir.exists():
        return found
    for path in sorted(data_dir.rglob("*")):
        relative = path.relative_to(data_dir)
        if LEFTOVER_FILE.search(path.name):
            found.append(f"temporary file {relative}")
        elif relative.parent == Path("snapshots") and path.name.startswith(".fork-"):
            found.append(f"fork staging directory {relative}")
    guests = data_dir / "guests"
    if instances_deleted and guests.exists():
        found += [f"instance directory {p.relative_to(data_dir)} with every instance deleted"
                  for p in sorted(guests.iterdir())]
    snapshots = data_dir / "snapshots"
    if snapshot_ids is not None and snapshots.exists():
        found += [f"snapshot directory {p.relative_to(data_dir)} that is not a listed snapshot"
                  for p in sorted(snapshots.iterdir())
                  if p.name not in snapshot_ids and not p.name.startswith(".fork-")]
    return found


# ---- the harness ------------------------------------------------------------------------------


@dataclass
class _Started:
    server: ServerProcess
    checked: int = 0  # log offset up to which problems were already reported (or accepted)
    children: list[Proc] = field(default_factory=list)  # seen while it ran


class Harness:
    """Starts servers under ``root`` and answers for them at :meth:`finish`.

    ``allowance`` is what every check of this harness accepts in the logs (a module's or a
    test's ``server_log_allows``); :meth:`check_new_log` may add a test's own.
    """

    argv: Sequence[str] = SERVER_ARGV

    def __init__(self, root: Path, allowance: LogAllowance = LogAllowance(), *,
                 network: str = "bridge") -> None:
        """``network``: "bridge" (each data directory's own namespace) or "user"."""
        self.root = root
        self.allowance = allowance
        self.started: list[_Started] = []
        self.finished = False
        self.bridge = network == "bridge" and namespaces_supported()
        self.namespaces: dict[Path, str] = {}  # data dir -> its servers' network namespace

    def namespace_of(self, data_dir: Path) -> str | None:
        """The network namespace of ``data_dir``'s servers (None: user-mode networking)."""
        if not self.bridge:
            return None
        return self.namespaces.setdefault(data_dir, f"hmt-{secrets.token_hex(4)}")

    # -- starting -------------------------------------------------------------------------------

    def start(self, data_dir: Path | None = None, *, port: int | None = None,
              log_path: Path | None = None, env: Mapping[str, str] | None = None) -> ServerProcess:
        """A server on ``data_dir`` (default ``<root>/data``); a data directory used before by
        this harness is a restart. Its log is ``<root>/server-<n>.log`` unless given; ``env``
        adds to its environment."""
        self.root.mkdir(parents=True, exist_ok=True)
        data_dir = data_dir or self.root / "data"
        log_path = log_path or self.root / f"server-{len(self.started) + 1}.log"
        before = log_path.stat().st_size if log_path.exists() else 0
        server = launch(self.argv, data_dir, log_path, port, self.namespace_of(data_dir), env)
        self.started.append(_Started(server, checked=before))
        return server

    def client(self, server: ServerProcess, token: str | None = None) -> Hypeman:
        return strict_client(server, token)

    @property
    def data_dirs(self) -> list[Path]:
        return list(dict.fromkeys(s.server.data_dir for s in self.started))

    # -- checking -------------------------------------------------------------------------------

    def check_new_log(self, extra: LogAllowance = LogAllowance()) -> list[str]:
        """Problems logged since the last check, by any server of this harness (cheap: reads
        only the new part of each log)."""
        allowance = self.allowance + extra
        problems = []
        for started in self.started:
            with started.server.log_path.open("rb") as log:
                log.seek(started.checked)
                text = log.read()
            # Only whole lines: a record being written now is checked next time.
            end = text.rfind(b"\n") + 1
            started.checked += end
            for problem in allowance.unexpected(log_problems(text[:end].decode(errors="replace"))):
                problems.append(f"{started.server.log_path.name}: {problem}")
        return problems

    def finish(self) -> list[str]:
        """Delete every instance, stop every server, then report what was left (see the module).
        Safe to call twice (the second call reports nothing)."""
        if self.finished:
            return []
        self.finished = True
        problems: list[str] = []
        cleaned: dict[Path, set[str] | None] = {}  # data dir -> snapshot ids, once cleaned up
        for started in reversed(self.started):  # the last server of a data directory cleans it
            server = started.server
            if server.running() and server.data_dir not in cleaned:
                snapshots, trouble = self._delete_everything(server)
                problems += trouble
                cleaned[server.data_dir] = snapshots
        for started in self.started:
            if started.server.running():
                started.children = descendants(started.server.process.pid)
            started.server.stop()
        problems += self.check_new_log()
        for data_dir in self.data_dirs:
            left = {p.pid: p for p in processes_in(data_dir)}
            for started in self.started:
                if started.server.data_dir == data_dir:
                    left.update({p.pid: p for p in started.children if still_running(p)})
            if left:
                kill(left.values())
                problems += [f"process left running (killed now): pid {p.pid}: {p.command}"
                             for p in left.values()]
            problems += leftover_files(data_dir, instances_deleted=data_dir in cleaned,
                                       snapshot_ids=cleaned.get(data_dir))
        for namespace in self.namespaces.values():
            remove_namespace(namespace)
        return problems

    def _delete_everything(self, server: ServerProcess) -> tuple[set[str] | None, list[str]]:
        problems = []
        snapshots: set[str] | None = None
        try:
            with strict_client(server, timeout=CLEANUP_TIMEOUT) as client:
                for instance in client.instances.list():
                    try:
                        client.instances.delete(instance.id)
                    except Exception as exc:
                        problems.append(f"cleanup: deleting instance {instance.id} failed: {exc!r}")
                snapshots = {s.id for s in client.snapshots.list()}
        except Exception as exc:
            problems.append(f"cleanup: the server of {server.data_dir} did not answer: {exc!r}")
        return snapshots, problems


def report(problems: list[str], what: str) -> None:
    """Fail the running test (or its teardown) naming every problem."""
    if problems:
        pytest.fail(f"{what}:\n" + "\n".join(f"- {p}" for p in problems), pytrace=False)


# Harnesses shared by several tests (module or package scope): each test's teardown checks their
# logs for problems new since the previous check, so the test that caused one is named.
SHARED: list[Harness] = []


@contextlib.contextmanager
def shared_harness(root: Path, node: pytest.Item | pytest.Collector) -> Iterator[Harness]:
    """A harness for the tests under ``node`` (a module or package), its allowance the node's
    markers; checked whole when the block ends, and by each test for new log problems."""
    shared = Harness(root, LogAllowance.of(node))
    SHARED.append(shared)
    try:
        yield shared
    finally:
        SHARED.remove(shared)
        problems = shared.finish()
    report(problems, f"the servers shared by {node.name} left problems")
