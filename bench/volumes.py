"""Volumes: ``POST /volumes/from-archive`` against doing the same by hand; a volume's disk I/O in the guest.

    .venv/bin/python -m bench.volumes [--only archive|io] [--runs 3] [--mib 256] [--io-runs 5] [--io-mib 128]

1. from-archive: a tar.gz of a dataset (``--mib`` of content: half incompressible random files of
8 MiB, half 16 KiB text files; ``tar czf`` at gzip's default level) sent to a real
``hypemand serve`` with the official SDK (the file streamed with its length), against
``tar xzf`` into a directory plus ``mke2fs -d`` of that directory into a sparse file of the same
size with the same options, in the same run, alternating, medians. MB/s is the content's bytes
over the wall time; the ratio is server / by hand (1.0: the server costs nothing over the tools).

2. I/O in the guest: one VM of the demo image (512 MiB, 1 vCPU, a 1 GiB overlay) created with the
SDK with a new 2 GiB volume attached read-write at ``/data``; through exec, ``dd if=/dev/zero
bs=1M count=--io-mib conv=fsync`` to ``/data/f`` (the volume: ext4 on its own virtio disk) and
to ``/bench/f`` (the VM's own disk: the root is overlayfs, its upper dir on the ext4 overlay
disk; ``/tmp`` is a directory there too, not a tmpfs), then ``sync``, ``drop_caches`` and
``dd of=/dev/null bs=1M`` of the file. Timed inside the guest with ``/proc/uptime`` (10 ms
steps) around each dd, so the exec round trip is not counted. Volume and overlay alternate, one
untimed run of each first, the file removed after each run; medians. The ratio is volume /
overlay (1.0 or more: the volume is not slower).

Every server this bench starts is ended by PID, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from hypeman import Hypeman
from hypeman.lib.exec import exec as sdk_exec

from bench.instances import Server, terminate_as_exit
from hypemand.images import demo

MIB = 1 << 20
VOLUME_GB = 1
MKE2FS = ["mke2fs", "-q", "-F", "-t", "ext4", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1"]


def make_dataset(root: Path, mib: int) -> int:
    """Half random 8 MiB files, half 16 KiB text files; returns the content's bytes."""
    total = 0
    for index in range(mib // 2 // 8):
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "blobs" / f"blob-{index}.bin").write_bytes(os.urandom(8 * MIB))
        total += 8 * MIB
    line = b"the quick brown fox jumps over the lazy dog 0123456789\n"
    text = (line * (16384 // len(line) + 1))[:16384]
    for index in range(mib // 2 * 64):
        directory = root / "text" / f"d{index // 256}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"f{index}.txt").write_bytes(text)
        total += len(text)
    return total


def by_hand(archive: Path, work: Path) -> float:
    tree, disk = work / "tree", work / "disk.raw"
    tree.mkdir()
    started = time.perf_counter()
    subprocess.run(["tar", "xzf", str(archive), "-C", str(tree)], check=True)
    with disk.open("wb") as file:
        file.truncate(VOLUME_GB << 30)
    subprocess.run([*MKE2FS, "-d", str(tree), str(disk)], check=True)
    elapsed = time.perf_counter() - started
    shutil.rmtree(tree)
    disk.unlink()
    return elapsed


def through_server(server: Server, archive: Path, run: int) -> float:
    with server.client() as sdk, archive.open("rb") as body:
        started = time.perf_counter()
        volume = sdk.volumes.create_from_archive(body, name=f"bench-{run}", size_gb=VOLUME_GB)
        elapsed = time.perf_counter() - started
        sdk.volumes.delete(volume.id)
    return elapsed


def archive_bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-volumes-") as tmp:
        where = Path(tmp)
        content = make_dataset(where / "dataset", args.mib)
        archive = where / "dataset.tar.gz"
        subprocess.run(["tar", "czf", str(archive), "-C", str(where / "dataset"), "."], check=True)
        print(f"dataset: {content / 1e6:.0f} MB of content, archive {archive.stat().st_size / 1e6:.0f} MB")
        server = Server.start(where / "data", where / "server.log")
        try:
            hand: list[float] = []
            api: list[float] = []
            through_server(server, archive, -1)  # warm: the first request imports and starts things
            for run in range(args.runs):
                work = where / f"hand-{run}"
                work.mkdir()
                hand.append(by_hand(archive, work))
                api.append(through_server(server, archive, run))
        finally:
            server.stop()
    hand_rate = content / statistics.median(hand) / 1e6
    api_rate = content / statistics.median(api) / 1e6
    print(f"tar xzf + mke2fs -d by hand: median {statistics.median(hand):.2f} s  {hand_rate:6.1f} MB/s  "
          f"(runs: {', '.join(f'{t:.2f}' for t in hand)})")
    print(f"POST /volumes/from-archive:  median {statistics.median(api):.2f} s  {api_rate:6.1f} MB/s  "
          f"(runs: {', '.join(f'{t:.2f}' for t in api)})")
    print(f"ratio server / by hand (MB/s): {api_rate / hand_rate:.2f}")


# ---- 2. sequential I/O in the guest: a volume against the VM's own overlay disk ------------------

IO_SHAPE: dict[str, Any] = {
    "size": "512MB", "overlay_size": "1GB", "vcpus": 1, "network": {"enabled": False},
    "entrypoint": ["/bin/sh", "-c"], "cmd": ["while true; do sleep 3600; done"],
}  # fmt: skip
TARGETS = {"volume": "/data/f", "overlay": "/bench/f"}
IO_TIMEOUT = 600


def guest_sh(client: Hypeman, instance: str, script: str) -> str:
    result = sdk_exec(client, instance, ["/bin/sh", "-c", script], timeout=IO_TIMEOUT)
    output = result.output.decode(errors="replace")
    if result.exit_code != 0:
        raise RuntimeError(f"guest command failed ({result.exit_code}): {script}\n{output}")
    return output


def io_run(client: Hypeman, instance: str, path: str, mib: int) -> tuple[float, float]:
    """(write seconds, read seconds) of ``mib`` MiB to and from ``path``, timed in the guest."""
    script = f"""set -e
mkdir -p "$(dirname {path})"; rm -f {path}; sync; echo 3 > /proc/sys/vm/drop_caches
read a _ < /proc/uptime
dd if=/dev/zero of={path} bs=1M count={mib} conv=fsync 2>/dev/null
read b _ < /proc/uptime
sync; echo 3 > /proc/sys/vm/drop_caches
read c _ < /proc/uptime
dd if={path} of=/dev/null bs=1M 2>/dev/null
read d _ < /proc/uptime
size=$(wc -c < {path}); rm -f {path}; sync
echo "$a $b $c $d $size"
"""
    a, b, c, d, size = guest_sh(client, instance, script).split()
    if int(size) != mib * MIB:
        raise RuntimeError(f"{path}: wrote {size} bytes, not {mib * MIB}")
    return float(b) - float(a), float(d) - float(c)


def io_bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-volumes-io-") as tmp:
        where = Path(tmp)
        server = Server.start(where / "data", where / "server.log")
        instance_id: str | None = None
        volume_id: str | None = None
        try:
            server.install_demo()
            with server.client() as client:
                volume_id = client.volumes.create(name="bench-io", size_gb=2).id
                instance_id = client.instances.create(
                    name="bench-io", image=demo.DEMO_NAME, **IO_SHAPE,
                    volumes=[{"volume_id": volume_id, "mount_path": "/data", "readonly": False}],
                ).id  # fmt: skip
                waited = client.instances.wait(instance_id, state="Running", api_timeout="180s")
                if waited.state != "Running":
                    raise RuntimeError(f"bench-io is {waited.state}, not Running: {waited.state_error}")
                mounts = guest_sh(client, instance_id, "grep -E ' (/|/data) ' /proc/mounts")
                print("guest mounts:\n  " + "\n  ".join(mounts.strip().splitlines()))
                results: dict[str, dict[str, list[float]]] = {
                    target: {"write": [], "read": []} for target in TARGETS
                }  # fmt: skip
                for path in TARGETS.values():  # untimed: first writes allocate the host's sparse files
                    io_run(client, instance_id, path, args.io_mib)
                for run in range(args.io_runs):
                    order = list(TARGETS) if run % 2 == 0 else list(reversed(TARGETS))
                    for target in order:
                        write, read = io_run(client, instance_id, TARGETS[target], args.io_mib)
                        results[target]["write"].append(write)
                        results[target]["read"].append(read)
        finally:
            if instance_id is not None or volume_id is not None:
                with contextlib.suppress(Exception), server.client() as client:
                    if instance_id is not None:
                        client.instances.delete(instance_id)
                    if volume_id is not None:
                        client.volumes.delete(volume_id)
            server.shutdown()
    megabytes = args.io_mib * MIB / 1e6
    print(f"sequential I/O in the guest, {args.io_mib} MiB, bs=1M, medians of {args.io_runs} (s per run)")
    print(f"{'':9} {'write MB/s':>10} {'read MB/s':>10}  runs write / read")
    rates: dict[str, dict[str, float]] = {}
    for target in TARGETS:
        rates[target] = {op: megabytes / statistics.median(times) for op, times in results[target].items()}
        runs = "  ".join(
            f"{w:.2f}/{r:.2f}" for w, r in zip(results[target]["write"], results[target]["read"], strict=True)
        )
        print(f"{target:9} {rates[target]['write']:10.1f} {rates[target]['read']:10.1f}  {runs}")
    print(f"{'ratio':9} {rates['volume']['write'] / rates['overlay']['write']:10.2f} "
          f"{rates['volume']['read'] / rates['overlay']['read']:10.2f}  (volume / overlay)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["archive", "io"], help="run one part (default: both)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=256, help="content of the dataset in MiB")
    parser.add_argument("--io-runs", type=int, default=5, help="runs of each target in the I/O part")
    parser.add_argument("--io-mib", type=int, default=128, help="file size in MiB for the I/O part")
    args = parser.parse_args()
    with terminate_as_exit():
        if args.only in (None, "archive"):
            archive_bench(args)
        if args.only in (None, "io"):
            io_bench(args)


if __name__ == "__main__":
    main()
