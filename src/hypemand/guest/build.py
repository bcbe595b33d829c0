"""Build the guest binary (init + agent) from the C sources beside this file.

The binary is static so it runs in any image, including ones with no libc. It is stored under
``<system_dir>/guest/<hash>/hypeman-init`` where ``hash`` covers the sources and the compiler,
so it is rebuilt only when one of them changes, and an old build stays for VMs that use it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from hypemand.errors import DependencyMissing, DomainError
from hypemand.fsutil import fsync_dir

SOURCE_DIR = Path(__file__).parent / "init"
BINARY_NAME = "hypeman-init"
CFLAGS = ["-static", "-Os", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-D_GNU_SOURCE"]


class GuestBuildError(DomainError):
    """The C compiler rejected the guest sources (a broken toolchain or a source bug)."""

    code = "guest_build_failed"


def find_compiler() -> list[str]:
    """musl-gcc gives a small static binary; plain gcc -static (glibc) also works."""
    for candidate in ("musl-gcc", "gcc"):
        path = shutil.which(candidate)
        if path:
            return [path]
    raise DependencyMissing("no C compiler: install musl-tools (or gcc and libc6-dev)")


def _sources() -> list[Path]:
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".c", ".h"))


def source_hash(compiler: list[str]) -> str:
    digest = hashlib.sha256()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=False).stdout
    digest.update(" ".join([*compiler, *CFLAGS, version]).encode())
    for source in _sources():
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_guest_binary(system_dir: Path) -> Path:
    """Return the path of the guest binary, compiling it if its inputs changed."""
    compiler = find_compiler()
    version = source_hash(compiler)
    target = system_dir / "guest" / version / BINARY_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    c_files = [str(p) for p in _sources() if p.suffix == ".c"]
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / BINARY_NAME
        result = subprocess.run(
            [*compiler, *CFLAGS, "-I", str(SOURCE_DIR), "-o", str(out), *c_files],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise GuestBuildError(f"compiling the guest binary failed:\n{result.stderr}")
        subprocess.run(["strip", str(out)], check=False, capture_output=True)
        out.chmod(0o755)
        out.replace(target)
    fsync_dir(target.parent)
    return target
