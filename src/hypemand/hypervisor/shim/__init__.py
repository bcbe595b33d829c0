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

import functools
from pathlib import Path

from hypemand.cbuild import build_version, compile_static, find_compiler
from hypemand.errors import DomainError
from hypemand.hypervisor.base import HypervisorStatePaths

SOURCE_DIR = Path(__file__).parent


class ShimBuildError(DomainError):
    """The C compiler rejected the supervisor's source (a broken toolchain or a source bug)."""

    code = "vmm_shim_build_failed"


def _sources() -> list[Path]:
    return sorted(path for path in SOURCE_DIR.iterdir() if path.suffix == ".c")


@functools.cache
def _build_version() -> str:
    """Computed once per process (it runs the compiler)."""
    return build_version(find_compiler(), _sources())


def ensure_vmm_shim(state: HypervisorStatePaths) -> Path:
    """The supervisor binary, compiled first if these sources were never built here. Blocking
    (runs the compiler, ~0.2 s, once per source change): async code calls it in a thread."""
    target = state.vmm_shim(_build_version())
    if not target.exists():
        compile_static(find_compiler(), _sources(), target, ShimBuildError, "the VMM supervisor")
    return target
