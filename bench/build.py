"""Builds: a small Dockerfile (3 layer-making steps) built in a builder VM through the API, against
buildah run directly on the host on the same inputs, cold and with a warm layer cache.

    .venv/bin/python -m bench.build [--rounds N] [--cpus N] [--memory-mb N] [--driver overlay|vfs]

One real ``hypemand serve`` with its VM network in a namespace this bench makes (``hmb-<random>``,
removed at the end), the busybox demo image pushed into it; the same image as an OCI layout on
the host (``demo.build_layout`` is reproducible: its manifest is the one the server holds, and
that is checked). The context is a Dockerfile ``FROM docker.io/demo/busybox:latest`` with
``WORKDIR``, ``COPY``, two ``RUN`` and ``ENTRYPOINT``, and one small file. Each round, in an
order that alternates between rounds:

- **VM cold**: ``builds.create`` without a builder (the build gets a scratch layer store) through
  the official SDK (strict), timed from the create to the ``ready`` status on the build's event
  stream (followed from the create on). Where the time went, from the server's timestamps of
  the status events and of the log lines as they were written: queue and intake (to
  ``started_at``), preparing (builder image, base export, source disk), the builder VM's boot
  to its agent running the script, buildah loading the base, ``buildah bud``, the push to an
  OCI layout with the copy out and the VM's end, and the import to ``ready``.
- **VM warm**: the same on a builder that built it once before the rounds (every step cached).
- **host cold / warm**: the build script's own steps with the host's buildah (Debian's, the same
  version as the builder's): ``pull oci:<layout>`` + ``tag``, ``bud --isolation chroot
  --pull-never --layers``, ``push`` to an ``oci:`` directory, in a throwaway ``--root`` and
  ``--runroot`` under a temporary directory (cold: a fresh root each round; warm: one root that
  built it once before the rounds). Each run is in a private mount namespace (``unshare``) with
  a tmpfs over ``/var/lib/containers``: buildah keeps its blob-info cache there whatever
  ``--root`` says, and the host's is not this bench's to write; the storage's overlay mounts
  end with the namespace.

Reported: medians, VM/host ratios (of the medians and paired within a round), the VM's cost
(VM cold - host cold) and its fixed part (the VM path's time outside buildah's pull and bud:
boot, disks, push and copy out, the VM's end, import; the rest is buildah itself running in the
guest, which ``bud`` alone in the VM against on the host shows), and warm-over-cold speedups.
Checked: the cold builds took no step from a cache and the warm ones every step. No target is
judged: the issue asks for the ratios. Every server and QEMU started here is ended
by PID, the namespace removed, every buildah root emptied and deleted, also on failure.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypeman import Hypeman
from tests.builds.support import source_tarball

from bench.instances import Server, kill_pids, qemu_pids, terminate_as_exit
from bench.network import bench_namespace, machine_state
from bench.wake import Samples
from hypemand.images import demo

BASE = "docker.io/demo/busybox:latest"
DOCKERFILE = f"""\
FROM {BASE}
WORKDIR /app
COPY app.txt /app/
RUN echo "built by RUN" > /app/built.txt
RUN wc -c /app/app.txt /app/built.txt > /app/sizes.txt
ENTRYPOINT ["/bin/sh", "-c", "cat /app/sizes.txt"]
"""
STEPS_AFTER_FROM = 5  # each of them "Using cache" when warm
CONTEXT = {"Dockerfile": DOCKERFILE, "app.txt": "a file of the build context\n" * 64}
USING_CACHE = "--> Using cache"
BUILD_TIMEOUT = 900

# The VM's phases: each ends where the next line (or status) begins; names as printed.
VM_PHASES = (
    ("queue", "queue and intake (create -> started_at)"),
    ("prepare", "prepare: builder image, base export, source disk"),
    ("boot", "builder VM boot to its agent running the script"),
    ("load", "buildah pull + tag of the base"),
    ("bud", "buildah bud"),
    ("push", "push to an OCI layout, copy out, VM ended"),
    ("import", "import to ready"),
)
VM_MARKS = {  # the log's lines (runner.py, service.py) that start a phase
    "==> starting the builder VM": "boot",
    "==> loading base image": "load",
    "==> building": "bud",
    "==> exporting the image": "push",
    "==> importing the image": "import",
}

# The builder's own steps (builds/runner.py BUILD_SCRIPT), on the host; each step stamps its start.
HOST_SCRIPT = r"""
set -eu
mount -t tmpfs -o size=64m hm-bench-build /var/lib/containers
B="buildah --storage-driver $DRIVER --root $ROOT/storage --runroot $ROOT/run"
echo "==> load $(date +%s.%N)"
id=$($B pull --quiet "oci:$LAYOUT:latest")
$B tag "$id" "$BASE"
echo "==> bud $(date +%s.%N)"
cd "$CONTEXT"
$B bud --isolation chroot --pull-never --layers -f Dockerfile -t localhost/hm-bench-result:latest .
echo "==> push $(date +%s.%N)"
rm -rf "$OUTPUT"
$B push --quiet localhost/hm-bench-result:latest "oci:$OUTPUT:latest"
echo "==> end $(date +%s.%N)"
"""
HOST_CLEAN = r"""
mount -t tmpfs -o size=64m hm-bench-build /var/lib/containers
B="buildah --storage-driver $DRIVER --root $ROOT/storage --runroot $ROOT/run"
$B rm -a
$B rmi -a -f
"""
HOST_PHASES = (("load", "buildah pull + tag of the base"), ("bud", "buildah bud"),
               ("push", "push to an OCI layout"))


@dataclass
class Inputs:
    source: bytes  # the context as the API takes it
    context: Path  # the same, unpacked, for the host
    layout: Path  # the base image as an OCI layout
    scratch: Path  # where the host's roots and outputs go
    driver: str


# ---- the builder VM, through the API -------------------------------------------------------------


def vm_build(client: Hypeman, inputs: Inputs, spec: dict[str, Any], builder_id: str | None,
             samples: Samples | None, arm: str) -> int:
    """One build through the API until ready; its total and phases into ``samples`` (None: untimed).
    Returns how many steps were taken from the cache."""
    extra: dict[str, Any] = {"builder_id": builder_id} if builder_id else {}
    started = time.time()
    build = client.builds.create(source=("context.tar.gz", inputs.source), timeout_seconds=BUILD_TIMEOUT,
                                 **spec, **extra)
    stamps: dict[str, float] = {}
    live = False  # lines before the stream's first status are a replay: their time is the replay's
    cached = 0
    ended = started
    for event in client.builds.events(build.id, follow=True):
        if event.type == "status":
            live = True
            if event.status in ("ready", "failed", "cancelled"):
                ended = time.time()
                stamps["end"] = event.timestamp.timestamp()
        elif event.type == "log" and event.content:
            cached += event.content.startswith(USING_CACHE)
            for text, phase in VM_MARKS.items():
                if event.content.startswith(text):
                    stamps[phase] = event.timestamp.timestamp() if live else math.nan
    done = client.builds.get(build.id)
    if done.status != "ready" or done.started_at is None:
        raise RuntimeError(f"build {build.id} ended {done.status}: {done.error}")
    if samples is not None:
        samples.add(arm, ended - started)
        stamps["queue"], stamps["prepare"] = started, done.started_at.timestamp()
        # A build without a builder loads no base in the VM (they come unpacked): no "load".
        order = [phase for phase, _ in VM_PHASES if phase in stamps] + ["end"]
        for phase, following in itertools.pairwise(order):
            took = stamps.get(following, math.nan) - stamps.get(phase, math.nan)
            if not math.isnan(took):  # a phase whose start was replayed, not seen live, is left out
                samples.add(f"{arm}.{phase}", took)
        in_buildah = stamps.get("push", math.nan) - stamps.get("load", stamps.get("bud", math.nan))
        if not math.isnan(in_buildah):
            samples.add(f"{arm}.outside", ended - started - in_buildah)
    return cached


# ---- buildah on the host ---------------------------------------------------------------------------


def host_run(script: str, inputs: Inputs, root: Path, check: bool = True) -> str:
    env = dict(os.environ, DRIVER=inputs.driver, ROOT=str(root), LAYOUT=str(inputs.layout), BASE=BASE,
               CONTEXT=str(inputs.context), OUTPUT=str(root / "out"), TMPDIR=str(root / "tmp"))
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    # A session of its own: whatever ends this (a timeout, Ctrl-C) ends buildah too, by group.
    process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=BUILD_TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if check and process.returncode != 0:
        raise RuntimeError(f"host buildah failed ({process.returncode}):\n{out[-3000:]}{err[-3000:]}")
    return out


def host_build(inputs: Inputs, root: Path, samples: Samples | None, arm: str) -> int:
    started = time.time()
    out = host_run(HOST_SCRIPT, inputs, root)
    ended = time.time()
    stamps = {line.split()[1]: float(line.split()[2]) for line in out.splitlines() if line.startswith("==> ")}
    if samples is not None:
        samples.add(arm, ended - started)
        for (phase, _), following in zip(HOST_PHASES, ["bud", "push", "end"], strict=True):
            samples.add(f"{arm}.{phase}", stamps[following] - stamps[phase])
    return sum(line.startswith(USING_CACHE) for line in out.splitlines())


def remove_root(inputs: Inputs, root: Path) -> None:
    """Empty a buildah root with buildah itself, then delete it."""
    if (root / "storage").exists():
        host_run(HOST_CLEAN, inputs, root, check=False)
    shutil.rmtree(root, ignore_errors=True)


# ---- the run ---------------------------------------------------------------------------------------


def prepare_inputs(where: Path, driver: str) -> Inputs:
    context = where / "context"
    context.mkdir()
    for name, text in CONTEXT.items():
        (context / name).write_text(text)
    layout = demo.build_layout(where / "demo")
    return Inputs(source_tarball(dict(CONTEXT)), context, layout, where / "host", driver)


def one_round(client: Hypeman, inputs: Inputs, spec: dict[str, Any], builder_id: str, warm_root: Path,
              index: int, order: list[str], samples: Samples, cache_hits: dict[str, list[int]]) -> None:
    for arm in order:
        if arm == "vm_cold":
            hits = vm_build(client, inputs, spec, None, samples, arm)
        elif arm == "vm_warm":
            hits = vm_build(client, inputs, spec, builder_id, samples, arm)
        elif arm == "host_warm":
            hits = host_build(inputs, warm_root, samples, arm)
        else:
            cold_root = inputs.scratch / f"cold-{index}"
            try:
                hits = host_build(inputs, cold_root, samples, arm)
            finally:
                remove_root(inputs, cold_root)
        cache_hits.setdefault(arm, []).append(hits)


def run(where: Path, args: argparse.Namespace, samples: Samples, cache_hits: dict[str, list[int]]) -> None:
    spec: dict[str, Any] = {k: v for k, v in (("cpus", args.cpus), ("memory_mb", args.memory_mb)) if v}
    inputs = prepare_inputs(where, args.driver)
    warm_root = inputs.scratch / "warm"
    server: Server | None = None
    try:
        with bench_namespace() as namespace:
            try:
                print(f"server: bridge in namespace {namespace} ...", flush=True)
                server = Server.start(where / "data", where / "server.log", namespace)
                server.install_demo()
                with server.client() as client:
                    held = client.images.get(BASE).digest
                    if held != demo.layout_manifest_digest(inputs.layout):
                        raise RuntimeError(f"the server's {BASE} ({held}) is not the host's layout")
                    builder = client.builders.create(name="bench", disk_size_gb=4)
                    print("warming: one build on the builder (imports the builder image), one on the host",
                          flush=True)
                    vm_build(client, inputs, spec, builder.id, None, "warm-up")
                    host_build(inputs, warm_root, None, "warm-up")
                    arms = ["vm_cold", "host_cold", "vm_warm", "host_warm"]
                    for index in range(args.rounds):
                        order = arms if index % 2 == 0 else arms[::-1]
                        one_round(client, inputs, spec, builder.id, warm_root, index, order, samples,
                                  cache_hits)
                        print(f"  round {index + 1}/{args.rounds}: " + ", ".join(
                            f"{arm} {samples.values[arm][-1]:.1f} s" for arm in arms), flush=True)
            finally:
                if server is not None:
                    server.shutdown()  # deletes any builder VM left, stops it, ends QEMUs by PID
                kill_pids(qemu_pids(where))
    finally:
        remove_root(inputs, warm_root)
        kill_pids(qemu_pids(where))


def report(samples: Samples, rounds: int, cache_hits: dict[str, list[int]]) -> list[tuple[str, bool, str]]:
    def row(title: str, value: str) -> None:
        print(f"  {title:62} {value}")

    def s(key: str) -> str:
        return f"{samples.med(key):8.2f}"

    def ratio(key: str, reference: str) -> str:
        of_medians = samples.med(key) / samples.med(reference)
        return f"{of_medians:8.2f} / {samples.paired(key, reference, True):.2f}"

    print("\n=== build of a 3-layer Dockerfile: builder VM vs buildah on the host, "
          f"medians of {rounds} rounds ===")
    if not all(samples.values.get(arm) for arm in ("vm_cold", "vm_warm", "host_cold", "host_warm")):
        return []
    for arm, title in (("vm_cold", "VM cold (no builder: a scratch layer store)"),
                       ("vm_warm", "VM warm (a builder that built it before)")):
        row(f"{title}, create -> ready, s", s(arm))
        for phase, name in VM_PHASES:
            if samples.values.get(f"{arm}.{phase}"):
                row(f"  {name}", s(f"{arm}.{phase}"))
    for arm, title in (("host_cold", "host cold (a fresh buildah root)"),
                       ("host_warm", "host warm (a root that built it before)")):
        row(f"{title}, s", s(arm))
        for phase, name in HOST_PHASES:
            row(f"  {name}", s(f"{arm}.{phase}"))
    print("  ratios (of medians / paired within a round):")
    row("VM / host, cold", ratio("vm_cold", "host_cold"))
    row("VM / host, warm", ratio("vm_warm", "host_warm"))
    row("buildah bud alone, VM / host, cold", ratio("vm_cold.bud", "host_cold.bud"))
    row("buildah bud alone, VM / host, warm", ratio("vm_warm.bud", "host_warm.bud"))
    row("the VM's cost: VM cold - host cold, s (of medians / paired)",
        f"{samples.med('vm_cold') - samples.med('host_cold'):8.2f} / "
        f"{samples.paired('vm_cold', 'host_cold', False):.2f}")
    # The rest is buildah itself running slower in the guest (TCG here), the bud ratios above.
    row("  its fixed part, all but buildah pull + bud, s: cold / warm",
        f"{samples.med('vm_cold.outside'):8.2f} / {samples.med('vm_warm.outside'):.2f}")
    row("warm-over-cold speedup in the VM (cold / warm)", ratio("vm_cold", "vm_warm"))
    row("warm-over-cold speedup on the host (cold / warm)", ratio("host_cold", "host_warm"))
    checks = []
    for arm in ("vm_cold", "host_cold"):
        hits = cache_hits.get(arm, [])
        checks.append((f"{arm}: no step from a cache", not any(hits), f"cached steps per build {hits}"))
    for arm in ("vm_warm", "host_warm"):
        hits = cache_hits.get(arm, [])
        checks.append((f"{arm}: every step from the cache", all(h == STEPS_AFTER_FROM for h in hits),
                       f"cached steps per build {hits} (of {STEPS_AFTER_FROM})"))
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the four builds (default 5)")
    parser.add_argument("--cpus", type=int, help="the builder VM's vCPUs (default: the API's, 2)")
    parser.add_argument("--memory-mb", type=int, help="the builder VM's memory (default: the API's, 2048)")
    parser.add_argument("--driver", choices=["overlay", "vfs"], default="overlay",
                        help="the host buildah's storage driver (the VM's is overlay)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench.build needs root: a network namespace, and buildah's mounts on the host")
    for tool in ("buildah", "unshare", "umoci", "skopeo"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench.build needs {tool}")
    started = time.monotonic()
    at_start = machine_state()
    print(f"at start: {at_start}; host buildah storage driver: {args.driver}", flush=True)
    samples = Samples()
    cache_hits: dict[str, list[int]] = {}
    checks: list[tuple[str, bool, str]] = []
    try:
        # buildah names an image pulled from an OCI layout by the layout's path, so the path must
        # be a valid image name: tempfile's random names ("-_x") are not always.
        scratch = Path("/var/tmp") / f"hm-bench-build-{secrets.token_hex(6)}"
        scratch.mkdir(mode=0o700)
        try:
            with terminate_as_exit():
                run(scratch, args, samples, cache_hits)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        checks = report(samples, args.rounds, cache_hits)
        print(f"\n=== checks === total run time {time.monotonic() - started:.0f} s; at start: {at_start}; "
              f"at end: {machine_state()}")
        for name, ok, detail in checks:
            print(f"  {'PASS' if ok else 'FAIL'}  {name:40} {detail}")
        print("command line:", shlex.join([".venv/bin/python", "-m", "bench.build", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
