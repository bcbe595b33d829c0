"""The VMM supervisor ("shim"): a tiny static C program that starts one QEMU, waits for it and
writes ``vmm-exit.json`` when it ends (see ``vmm_shim.c`` beside this file for what it does).

VMMs outlive the server, so the server cannot be the one that sees a VMM's exit status; the shim
lives exactly as long as its VMM. It is C rather than Python for its cost per VM: ~100 KB of
memory and ~1 ms added to a launch.

Built with the host's compiler on first use and stored under the backend's state directory as
``vmm-shim/<hash>/hypeman-vmm-shim``, the hash covering the sources, flags and compiler: a changed
source gets a new binary, and the old one stays for the supervisors still running it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from hypemand.errors import DomainError
from hypemand.fsutil import fsync_dir
from hypemand.guest.build import find_compiler
from hypemand.hypervisor.base import HypervisorStatePaths

SOURCE_DIR = Path(__file__).parent
CFLAGS = ["-static", "-Os", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-D_GNU_SOURCE"]


class ShimBuildError(DomainError):
    """The C compiler rejected the supervisor's source (a broken toolchain or a source bug)."""

    code = "vmm_shim_build_failed"


def _sources() -> list[Path]:
    return sorted(path for path in SOURCE_DIR.iterdir() if path.suffix == ".c")


@functools.cache
def _build_version() -> str:
    """Hash of compiler, flags and sources; computed once per process (it runs the compiler)."""
    compiler = find_compiler()
    digest = hashlib.sha256()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=False).stdout
    digest.update(" ".join([*compiler, *CFLAGS, version]).encode())
    for source in _sources():
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def ensure_vmm_shim(state: HypervisorStatePaths) -> Path:
    """The supervisor binary, compiled first if these sources were never built here. Blocking
    (runs the compiler, ~0.2 s, once per source change): async code calls it in a thread.
    Concurrent builders (two servers, test sessions) each compile and rename; the last one wins
    with identical content."""
    target = state.vmm_shim(_build_version())
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=".build-")
    os.close(fd)
    try:
        result = subprocess.run(
            [*find_compiler(), *CFLAGS, "-o", partial, *map(str, _sources())],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise ShimBuildError(f"compiling the VMM supervisor failed:\n{result.stderr}")
        subprocess.run(["strip", partial], check=False, capture_output=True)
        os.chmod(partial, 0o755)
        with open(partial, "rb") as binary:
            os.fsync(binary.fileno())
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    fsync_dir(target.parent)
    return target
