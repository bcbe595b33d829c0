"""Building the project's small static C programs (the guest's init and agent, the VMM
supervisor) with the host's compiler, each stored under a name derived from its inputs.

A build is versioned by a hash of the compiler (path and version), the flags and every source,
so it is rebuilt only when one of them changes, and an old build stays for the processes (VMs,
supervisors) that still run it. Blocking: async code calls these in a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from hypemand.errors import DependencyMissing, DomainError
from hypemand.fsutil import fsync_dir

CFLAGS = ["-static", "-Os", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-D_GNU_SOURCE"]


def find_compiler() -> list[str]:
    """musl-gcc gives a small static binary; plain gcc -static (glibc) also works."""
    for candidate in ("musl-gcc", "gcc"):
        path = shutil.which(candidate)
        if path:
            return [path]
    raise DependencyMissing("no C compiler: install musl-tools (or gcc and libc6-dev)")


def build_version(compiler: list[str], sources: list[Path]) -> str:
    """The hash naming a build of ``sources`` with ``compiler`` and :data:`CFLAGS`."""
    digest = hashlib.sha256()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=False).stdout
    digest.update(" ".join([*compiler, *CFLAGS, version]).encode())
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def compile_static(
    compiler: list[str], sources: list[Path], target: Path, failure: type[DomainError], what: str
) -> None:
    """Compile the ``.c`` files of ``sources`` (headers found beside them) into ``target``,
    stripped, executable and durable. Concurrent builders each compile and rename: the last one
    wins with identical content. A compiler error raises ``failure`` naming ``what``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    c_files = [str(path) for path in sources if path.suffix == ".c"]
    includes = sorted({str(path.parent) for path in sources})
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=".build-")
    os.close(fd)
    try:
        result = subprocess.run(
            [*compiler, *CFLAGS, *(f"-I{include}" for include in includes), "-o", partial, *c_files],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise failure(f"compiling {what} failed:\n{result.stderr}")
        subprocess.run(["strip", partial], check=False, capture_output=True)
        os.chmod(partial, 0o755)
        with open(partial, "rb") as binary:
            os.fsync(binary.fileno())
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    fsync_dir(target.parent)
