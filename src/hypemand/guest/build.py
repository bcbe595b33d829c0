"""Build the guest binary (init + agent) from the C sources beside this file.

The binary is static so it runs in any image, including ones with no libc. It is stored under
``<system_dir>/guest/<hash>/hypeman-init`` (``SystemPaths.guest_binary``) where ``hash`` covers
the sources and the compiler (see ``hypemand.cbuild``), so it is rebuilt only when one of them
changes, and an old build stays for VMs that use it.
"""

from __future__ import annotations

from pathlib import Path

from hypemand.cbuild import build_version, compile_static, find_compiler
from hypemand.errors import DomainError
from hypemand.layout import SystemPaths

SOURCE_DIR = Path(__file__).parent / "init"

__all__ = ["SOURCE_DIR", "GuestBuildError", "build_guest_binary", "find_compiler", "source_hash"]


class GuestBuildError(DomainError):
    """The C compiler rejected the guest sources (a broken toolchain or a source bug)."""

    code = "guest_build_failed"


def _sources() -> list[Path]:
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".c", ".h"))


def source_hash(compiler: list[str]) -> str:
    return build_version(compiler, _sources())


def build_guest_binary(system: SystemPaths) -> Path:
    """Return the path of the guest binary, compiling it if its inputs changed."""
    compiler = find_compiler()
    target = system.guest_binary(source_hash(compiler))
    if not target.exists():
        compile_static(compiler, _sources(), target, GuestBuildError, "the guest binary")
    return target
