"""Guest memory compression, expansion and digests, against the zstd/lz4 CLIs in the same run.

    .venv/bin/python -m bench.compression [--runs 3] [--dir /tmp]

Builds a 1 GiB sparse "guest RAM" file (memory-backend-file style): ~200 MB of random pages,
~300 MB of pages copied from a real binary (qemu-system-x86_64) scattered across the file, and
~100 MB of zero pages written as data; the rest are holes. Runs alternate hypemand and the CLIs
(in reverse order every other run) so that load drift hits both alike; ratios are taken within
a run, then the median is printed. Besides wall time, the CPU time (all threads, or the CLI
child) is shown: on a shared machine it is the steadier measure of the work done.
The CLIs run file to file like hypeman's native codec path; hypemand fsyncs its output, so the
CLI rows include an fsync of their output too.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypemand.savedvm.codec import Compression, compress_memory, expand_memory
from hypemand.savedvm.digest import PageDigest, digest_with, file_digest
from hypemand.savedvm.sparse import PAGE_SIZE, NonZeroPages, allocated_bytes

MB = 1_000_000
GIB = 1 << 30
ZSTD_FAST, ZSTD_LONG, ZSTD_D = "zstd -1 -T0", "zstd -1 -T0 --long=27", "zstd -d --long=27"
XXH3 = "xxh3-128 (file_digest)"


def real_binary() -> bytes:
    for candidate in ("/usr/bin/qemu-system-x86_64", shutil.which("qemu-system-x86_64"), sys.executable):
        if candidate and Path(candidate).is_file() and Path(candidate).stat().st_size > 4 * MB:
            data = Path(candidate).read_bytes()
            return data[: len(data) - len(data) % PAGE_SIZE]
    raise SystemExit("no binary of 4 MB or more to take pages from (install qemu-system-x86)")


def build_guest_memory(path: Path, seed: int = 7) -> None:
    """Runs of 1-256 pages of each kind, in random order, separated by holes."""
    rng = random.Random(seed)
    binary = real_binary()
    budget = {"random": 200 * MB // PAGE_SIZE, "binary": 300 * MB // PAGE_SIZE, "zero": 100 * MB // PAGE_SIZE}
    hole_pages = GIB // PAGE_SIZE - sum(budget.values())
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, GIB)
        page = 0
        while any(budget.values()):
            kinds = [kind for kind, left in budget.items() if left]
            kind = rng.choices(kinds, weights=[budget[k] for k in kinds])[0]
            pages = min(budget[kind], rng.choice((1, 1, 2, 4, 8, 16, 32, 64, 256)))
            budget[kind] -= pages
            if kind == "random":
                data = rng.randbytes(pages * PAGE_SIZE)
            elif kind == "binary":
                start = rng.randrange(0, len(binary) // PAGE_SIZE - pages) * PAGE_SIZE
                data = binary[start : start + pages * PAGE_SIZE]
            else:
                data = bytes(pages * PAGE_SIZE)
            os.pwrite(fd, data, page * PAGE_SIZE)
            page += pages
            runs_left = max(1.0, sum(budget.values()) / 40)
            gap = min(hole_pages, int(rng.expovariate(1) * hole_pages / runs_left))
            hole_pages -= gap
            page += gap
    finally:
        os.close(fd)


@dataclass
class Sample:
    wall: float
    cpu: float  # this process's threads plus any child process


def cpu_seconds() -> float:
    own, children = os.times(), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.user + own.system + children.ru_utime + children.ru_stime


def measure(*actions: Callable[[], object]) -> Sample:
    wall, cpu = time.perf_counter(), cpu_seconds()
    for action in actions:
        action()
    return Sample(time.perf_counter() - wall, cpu_seconds() - cpu)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


class Results:
    def __init__(self) -> None:
        self.samples: dict[str, list[Sample]] = {}
        self.sizes: dict[str, int] = {}

    def add(self, name: str, sample: Sample, size: int | None = None) -> None:
        self.samples.setdefault(name, []).append(sample)
        if size is not None:
            self.sizes[name] = size

    def median(self, name: str, cpu: bool = False) -> float:
        return statistics.median(s.cpu if cpu else s.wall for s in self.samples[name])

    def same_run_ratio(self, name: str, reference: str | None, cpu: bool = False) -> str:
        if reference is None or reference not in self.samples:
            return "-"
        pairs = zip(self.samples[name], self.samples[reference], strict=True)
        return f"{statistics.median((a.cpu / b.cpu) if cpu else (a.wall / b.wall) for a, b in pairs):.2f}"


def one_run(raw: Path, work: Path, results: Results, reverse: bool) -> None:
    never = threading.Event()
    expanded, cli_out, cli_back = work / "expanded.ram", work / "cli.out", work / "cli.back"

    def ours(name: str, compression: Compression, expand: bool) -> None:
        made = []
        results.add(name, measure(lambda: made.append(compress_memory(raw, compression, never))),
                    made[0].compressed_size)
        if expand:
            results.add(f"expand {name}", measure(lambda: expand_memory(made[0].path, expanded, never)))
            drop(expanded)
        drop(made[0].path, made[0].extent_map)

    def cli(name: str, compress: list[str], decompress: tuple[str, list[str]] | None) -> None:
        if shutil.which(compress[0]) is None:
            return
        sample = measure(lambda: subprocess.run(compress, check=True), lambda: fsync_file(cli_out))
        results.add(name, sample, cli_out.stat().st_size)
        if decompress is not None:
            label, argv = decompress
            sample = measure(lambda: subprocess.run(argv, check=True), lambda: fsync_file(cli_back))
            results.add(label, sample)
            drop(cli_back)
        drop(cli_out)

    src, out, back = str(raw), str(cli_out), str(cli_back)
    steps: list[Callable[[], None]] = [
        lambda: ours("hypemand zstd 1", Compression(algorithm="zstd", level=1), True),
        lambda: cli(ZSTD_FAST, ["zstd", "-q", "-f", "-1", "-T0", src, "-o", out], None),
        lambda: cli(ZSTD_LONG, ["zstd", "-q", "-f", "-1", "-T0", "--long=27", src, "-o", out],
                    (ZSTD_D, ["zstd", "-q", "-d", "-f", "--long=27", out, "-o", back])),
        lambda: ours("hypemand zstd 3", Compression(algorithm="zstd", level=3), False),
        lambda: ours("hypemand lz4 0", Compression(algorithm="lz4", level=0), True),
        lambda: cli("lz4 -1", ["lz4", "-q", "-f", "-1", src, out],
                    ("lz4 -d", ["lz4", "-q", "-d", "-f", out, back])),
        lambda: results.add(XXH3, measure(lambda: file_digest(raw))),
        lambda: results.add("scan only (no hash)", measure(lambda: scan(raw))),
    ]
    try:
        import blake3

        def blake3_digest(threads: int) -> None:
            digest_with(raw, PageDigest(blake3.blake3(max_threads=threads), "blake3"))

        steps.append(lambda: results.add("blake3, max_threads=AUTO",
                                         measure(lambda: blake3_digest(blake3.blake3.AUTO))))
        steps.append(lambda: results.add("blake3, 1 thread", measure(lambda: blake3_digest(1))))
    except ImportError:
        pass  # not a dependency: pip install blake3 to compare
    for step in reversed(steps) if reverse else steps:
        step()


def scan(raw: Path) -> int:
    fd = os.open(raw, os.O_RDONLY)
    try:
        pages = NonZeroPages(fd, os.fstat(fd).st_size, raw)
        for _ in pages:
            pass
        return pages.data_bytes
    finally:
        os.close(fd)


def report(results: Results, runs: int, data: int, nonzero: int) -> None:
    def speeds(name: str) -> str:
        wall = results.median(name)
        return (f"{wall:6.2f}  {results.median(name, cpu=True):6.2f}  "
                f"{GIB / MB / wall:6.0f}  {data / MB / wall:6.0f}")

    columns = f"{'wall s':>6}  {'cpu s':>6}  {'MB/s':>6}  {'data':>6}"
    print(f"\n1 GiB sparse guest memory: {data / MB:.0f} MB written, {nonzero / MB:.0f} MB in non-zero "
          f"pages; medians of {runs} alternating runs.")
    print("MB/s: of the logical size (1 GiB) | of the written data (wall time). Ratios: hypemand / CLI "
          "within each run.")
    print(f"\n{'compress':24} {columns}  {'ratio':>5}  {'wall/-1 -T0':>11}  {'cpu/-1 -T0':>10}  "
          f"{'size/--long=27':>14}")
    for name, size in results.sizes.items():
        long_size = results.sizes.get(ZSTD_LONG)
        vs_size = f"{size / long_size:.2f}" if long_size else "-"
        print(f"{name:24} {speeds(name)}  {GIB / size:5.2f}  {results.same_run_ratio(name, ZSTD_FAST):>11}  "
              f"{results.same_run_ratio(name, ZSTD_FAST, cpu=True):>10}  {vs_size:>14}")
    reference = ZSTD_D if ZSTD_D in results.samples else None
    print(f"\n{'expand / CLI decompress':24} {columns}  {'wall/zstd -d':>12}  {'cpu/zstd -d':>11}")
    for name in results.samples:
        if name.startswith(("expand", "zstd -d", "lz4 -d")):
            print(f"{name:24} {speeds(name)}  {results.same_run_ratio(name, reference):>12}  "
                  f"{results.same_run_ratio(name, reference, cpu=True):>11}")
    print(f"\n{'digest':24} {columns}  {'wall/xxh3':>9}  {'cpu/xxh3':>8}")
    for name in results.samples:
        if name.startswith(("xxh3", "blake3", "scan")):
            print(f"{name:24} {speeds(name)}  {results.same_run_ratio(name, XXH3):>9}  "
                  f"{results.same_run_ratio(name, XXH3, cpu=True):>8}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, help="where the 1 GiB test file goes (default: $TMPDIR)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hm-bench-compress-", dir=args.dir) as tmp:
        work = Path(tmp)
        raw = work / "memory.ram"
        print(f"building {raw} ...", flush=True)
        build_guest_memory(raw)
        results = Results()
        for index in range(args.runs):
            print(f"run {index + 1}/{args.runs} ...", flush=True)
            one_run(raw, work, results, reverse=index % 2 == 1)
        report(results, args.runs, allocated_bytes(raw), scan(raw))


if __name__ == "__main__":
    main()
