"""Instances through the API: create -> Running against bare QEMU's boot-to-init, and GET /instances.

    .venv/bin/python -m bench.instances [--runs 5] [--list-calls 50] [--quick]

A real ``hypemand serve`` process (fresh data directory under $TMPDIR) driven through the
official SDK in strict mode, with the busybox demo image pushed into it.

- create -> Running: ``POST /instances`` (256 MiB, 1 vCPU, no network, a shell loop as the
  program) then ``GET /instances/{id}/wait?state=Running``, against bench/boot.py's bare QEMU
  (same kernel and kernel arguments, a one-line busybox initramfs) booting to its init, in the
  same run, alternating, medians. One untimed create first: the server's first VM start probes
  KVM (about 2 s here) once per data directory, which is not what a create costs afterwards.
- ``GET /instances`` latency with 20 instances: 8 Running (vcpus=1: the server admits at most
  4 x cpu count vCPUs, 8 on these machines) and 12 Stopped (their program exits at once).
  Plain HTTP (keep-alive, the JSON body) and the strict SDK's ``instances.list()``; ``/health``
  is the HTTP floor.

Every server and QEMU this bench starts is ended by PID, also on failure. The helpers here
(server process, strict client, cleanup) are shared with bench/snapshots.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from hypeman import Hypeman

from hypemand.config import default_data_dir, default_system_dir
from hypemand.images import demo

REPO = Path(__file__).resolve().parent.parent
SYSTEM_DIR = Path(os.environ.get("HYPEMAND_SYSTEM_DIR") or default_system_dir(default_data_dir()))
GUEST_SHAPE: dict[str, Any] = {
    "size": "256MB", "overlay_size": "64MB", "vcpus": 1, "network": {"enabled": False},
}  # fmt: skip
IDLE: dict[str, Any] = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["while true; do sleep 3600; done"]}
EXITS: dict[str, Any] = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["exit 0"]}


# ---- a real server and its clean-up (shared with bench/snapshots.py) ------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    base_url: str
    token: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, data_dir: Path, log_path: Path, namespace: str | None = None) -> Server:
        """A server whose VMs are on a bridge in ``namespace`` (one the caller made), or with
        QEMU's user-mode networking for None: a bench never builds anything in the root
        namespace. Caddy, if the bench makes one run, stops with the server."""
        port = free_port()
        env = dict(os.environ, HYPEMAND_SYSTEM_DIR=str(SYSTEM_DIR), PYTHONUNBUFFERED="1",
                   CADDY_STOP_ON_SHUTDOWN="true", HYPEMAND_NETWORK_MODE="bridge" if namespace else "user",
                   HYPEMAND_NETWORK_NAMESPACE=namespace or "")
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "hypemand.cli.main", "serve", "--port", str(port),
                 "--data-dir", str(data_dir), "--log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            )  # fmt: skip
        base_url = f"http://127.0.0.1:{port}"
        server = cls(base_url, "", data_dir, process, log_path)
        try:
            deadline = time.monotonic() + 90
            while True:
                if process.poll() is not None:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"server exited early:\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not answer /health within 90 s")
                time.sleep(0.1)
            server.token = subprocess.run(
                [sys.executable, "-m", "hypemand.cli.main", "token", "--data-dir", str(data_dir)],
                check=True, capture_output=True, text=True, env=env,
            ).stdout.strip()  # fmt: skip
        except BaseException:
            server.stop()
            raise
        return server

    def client(self) -> Hypeman:
        return Hypeman(base_url=self.base_url, api_key=self.token, max_retries=0, timeout=600,
                       _strict_response_validation=True)

    def install_demo(self) -> None:
        demo.install(self.base_url, self.token, wait_seconds=300)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, this server process (by its PID)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def shutdown(self) -> None:
        """Delete every instance and snapshot (the server kills their QEMUs), stop the server,
        then end any QEMU of this data directory that is still alive, by PID."""
        if self.process.poll() is None and self.token:
            with contextlib.suppress(Exception), self.client() as client:
                for instance in client.instances.list():
                    with contextlib.suppress(Exception):
                        client.instances.delete(instance.id)
                for snapshot in client.snapshots.list():
                    with contextlib.suppress(Exception):
                        client.snapshots.delete(snapshot.id)
        self.stop()
        kill_pids(qemu_pids(self.data_dir))


def vmm_pid(instance_dir: Path) -> int | None:
    """The QEMU PID the server recorded for an instance (``vmm.json``), if that process lives."""
    try:
        pid = int(json.loads((instance_dir / "vmm.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None
    return pid if _cwd(pid) == instance_dir.resolve() else None


def _cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def qemu_pids(root: Path) -> list[int]:
    """Processes whose working directory lies inside ``root`` (a directory this bench made):
    the QEMUs of its instances (QEMU runs with cwd = the VM directory), recorded or not."""
    root = root.resolve()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            cwd = _cwd(int(entry))
            if cwd is not None and (cwd == root or root in cwd.parents):
                found.append(int(entry))
    return found


def kill_pids(pids: list[int], timeout: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in pids):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM ends the bench like Ctrl-C, so the clean-up in ``finally`` blocks runs."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(action: Callable[[], Any]) -> tuple[float, Any]:
    started = time.monotonic()
    value = action()
    return time.monotonic() - started, value


# ---- create -> Running ---------------------------------------------------------------------------


def create_running(client: Hypeman, name: str, program: dict[str, Any] = IDLE) -> tuple[str, float, float]:
    """(id, POST /instances seconds, POST + wait Running seconds)."""
    started = time.monotonic()
    created = client.instances.create(name=name, image=demo.DEMO_NAME, **GUEST_SHAPE, **program)
    posted = time.monotonic() - started
    waited = client.instances.wait(created.id, state="Running", api_timeout="180s")
    ready = time.monotonic() - started
    if waited.state != "Running":
        raise RuntimeError(f"instance {name} is {waited.state}, not Running: {waited.state_error}")
    return created.id, posted, ready


async def create_vs_bare(server: Server, runs: int, where: Path) -> dict[str, list[float]]:
    from bench.boot import bare_initramfs, bare_qemu_boot
    from hypemand.system.files import ensure_system_files

    system = ensure_system_files(SYSTEM_DIR)
    initrd = bare_initramfs(where / "bare.cpio")
    results: dict[str, list[float]] = {"bare": [], "post": [], "running": []}
    with server.client() as client:
        # Untimed: the first VM start of a data directory probes KVM once.
        instance_id, _, warm = await asyncio.to_thread(create_running, client, "warm-up")
        await asyncio.to_thread(client.instances.delete, instance_id)
        print(f"warm-up create -> Running {warm:.2f} s (includes the one-time KVM probe)", flush=True)
        for run in range(runs):
            order = ("bare", "hypemand") if run % 2 == 0 else ("hypemand", "bare")
            for who in order:
                if who == "bare":
                    workdir = where / f"bare-{run}"
                    workdir.mkdir()
                    results["bare"].append((await bare_qemu_boot(system, initrd, workdir))["ready_s"])
                else:
                    instance_id, posted, ready = await asyncio.to_thread(
                        create_running, client, f"create-{run}"
                    )
                    results["post"].append(posted)
                    results["running"].append(ready)
                    await asyncio.to_thread(client.instances.delete, instance_id)
            print(f"run {run + 1}/{runs}: bare {results['bare'][-1]:.2f} s, hypemand create -> Running "
                  f"{results['running'][-1]:.2f} s (POST {results['post'][-1]:.2f} s)", flush=True)
    return results


# ---- GET /instances with 20 instances ------------------------------------------------------------


def populate(server: Server, running: int, stopped: int) -> None:
    with server.client() as client:

        def make_stopped(index: int) -> None:
            created = client.instances.create(name=f"stopped-{index}", image=demo.DEMO_NAME,
                                              **GUEST_SHAPE, **EXITS)
            waited = client.instances.wait(created.id, state="Stopped", api_timeout="300s")
            if waited.state != "Stopped":
                raise RuntimeError(f"stopped-{index} is {waited.state}")

        # Boots are CPU-bound on 2 cores: a few at a time is as fast as all at once.
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(make_stopped, range(stopped)))
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda index: create_running(client, f"running-{index}"), range(running)))
        states = [instance.state for instance in client.instances.list()]
        print(f"listed: {states.count('Running')} Running, {states.count('Stopped')} Stopped, "
              f"{len(states)} in all", flush=True)


def list_latency(server: Server, calls: int) -> dict[str, list[float]]:
    headers = {"Authorization": f"Bearer {server.token}"}
    results: dict[str, list[float]] = {"health": [], "http": [], "sdk": []}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as http, \
            server.client() as client:
        http.get("/instances").raise_for_status()  # connection up
        client.instances.list()
        for _ in range(calls):
            results["health"].append(timed(lambda: http.get("/health").raise_for_status())[0])
            results["http"].append(timed(lambda: http.get("/instances").raise_for_status())[0])
            results["sdk"].append(timed(client.instances.list)[0])
    return results


def report(
    create: dict[str, list[float]],
    listing: dict[str, list[float]],
    runs: int,
    calls: int,
    shape: tuple[int, int],
) -> None:
    bare, ours, post = median(create["bare"]), median(create["running"]), median(create["post"])
    ratios = [o / b for o, b in zip(create["running"], create["bare"], strict=True)]
    print(f"\ncreate -> Running, medians of {runs} alternating runs (TCG, microvm, 256 MiB, 1 vCPU)")
    print(f"  bare QEMU, kernel to init                    {bare:7.2f} s")
    print(f"  hypemand POST /instances (answered)          {post:7.2f} s")
    print(f"  hypemand POST + GET /wait?state=Running      {ours:7.2f} s   ratio {ours / bare:.2f} "
          f"(median of per-run ratios {median(ratios):.2f}; aim 1.15)")
    running, stopped = shape
    print(f"\nGET /instances with {running + stopped} instances ({running} Running, {stopped} Stopped), "
          f"{calls} calls each, ms")
    print(f"  {'':34} {'median':>7} {'p90':>7} {'max':>7}")
    for key, label in (("health", "GET /health (HTTP floor)"), ("http", "GET /instances (httpx)"),
                       ("sdk", "SDK instances.list() (strict)")):
        values = sorted(listing[key])
        p90 = values[int(0.9 * (len(values) - 1))]
        print(f"  {label:34} {median(values) * 1000:7.1f} {p90 * 1000:7.1f} {values[-1] * 1000:7.1f}")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--list-calls", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="2 runs, 10 list calls, 4+4 instances")
    args = parser.parse_args()
    runs, calls, running, stopped = args.runs, args.list_calls, 8, 12
    if args.quick:
        runs, calls, running, stopped = 2, 10, 4, 4
    with terminate_as_exit(), tempfile.TemporaryDirectory(prefix="hm-bench-instances-") as tmp:
        where = Path(tmp)
        server = Server.start(where / "data", where / "server.log")
        try:
            await asyncio.to_thread(server.install_demo)
            create = await create_vs_bare(server, runs, where)
            print(f"populating: {stopped} instances that stop at once, {running} Running ...", flush=True)
            started = time.monotonic()
            await asyncio.to_thread(populate, server, running, stopped)
            print(f"  ({time.monotonic() - started:.0f} s)", flush=True)
            listing = await asyncio.to_thread(list_latency, server, calls)
        finally:
            await asyncio.to_thread(server.shutdown)
            kill_pids(qemu_pids(where))
        report(create, listing, runs, calls, (running, stopped))


if __name__ == "__main__":
    asyncio.run(main())
