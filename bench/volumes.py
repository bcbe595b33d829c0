"""Volumes: ``POST /volumes/from-archive`` against doing the same by hand.

    .venv/bin/python -m bench.volumes [--runs 3] [--mib 256]

from-archive: a tar.gz of a dataset (``--mib`` of content: half incompressible random files of
8 MiB, half 16 KiB text files; ``tar czf`` at gzip's default level) sent to a real
``hypemand serve`` with the official SDK (the file streamed with its length), against
``tar xzf`` into a directory plus ``mke2fs -d`` of that directory into a sparse file of the same
size with the same options, in the same run, alternating, medians. MB/s is the content's bytes
over the wall time; the ratio is server / by hand (1.0: the server costs nothing over the tools).

Every server this bench starts is ended by PID, also on failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.instances import Server

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=256, help="content of the dataset in MiB")
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
