"""Facts about the host that the QEMU backend needs: binary, version, acceleration, TSC rate.

Acceleration is decided by *running* a guest, never by the presence of ``/dev/kvm``: on PVM hosts
(``/dev/kvm`` backed by Pagetable-based Virtual Machine) KVM accepts VMs but can only run PVM guest
kernels at useful speed; a stock kernel crawls and never finishes booting. The probe guest is
15 bytes of real-mode code at the reset vector of a 64 KiB ``-bios`` image: it counts a register
down from 20 million and then writes to an ``isa-debug-exit`` port, which makes QEMU exit with
status 85. Hardware KVM runs the loop natively (~20 ms); TCG translates it (~0.2 s); PVM emulates
it instruction by instruction (~1.4 µs each, about 30 s), so a 2 s deadline separates them. When
``/dev/kvm`` cannot be opened there is no probe at all. The result is cached on disk, keyed by host
kernel release and QEMU version.

The TSC rate matters for microvm under TCG: the guest's TSC *is* the host's (QEMU's TCG ``rdtsc``
reads the host counter), microvm has neither HPET nor ACPI PM timer to calibrate against, and
calibration against the PIT fails often enough to hang boots. So we pass ``tsc_early_khz``. The
rate is measured directly: ``rdtsc`` (6 bytes of machine code called through ctypes) against
``CLOCK_MONOTONIC_RAW`` over 50 ms, each end bracketed by the clock and the best of 20 samples
kept. That needs neither dmesg (often restricted) nor CPUID leaves 0x15/0x40000010 (zero on these
hosts). The fallback is the kernel's ``tsc: Detected/Refined ... MHz`` line from dmesg, then
``cpu MHz`` from /proc/cpuinfo (the kernel's cpu_khz, equal to tsc_khz on hosts with a
constant TSC and no APERF/MPERF).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import mmap
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from hypemand.errors import DependencyMissing
from hypemand.fsutil import write_model_atomic
from hypemand.hypervisor.base import Accel

log = logging.getLogger(__name__)

QEMU_BINARY_NAME = "qemu-system-x86_64"
BINARY_SEARCH_DIRS = (Path("/usr/bin"), Path("/usr/local/bin"))
_VERSION_RE = re.compile(r"QEMU emulator version (\d+\.\d+\.\d+)")

PROBE_TIMEOUT_SECONDS = 2.0
PROBE_LOOP_ITERATIONS = 20_000_000
PROBE_EXIT_VALUE = 0x2A
PROBE_EXPECTED_STATUS = (PROBE_EXIT_VALUE << 1) | 1  # isa-debug-exit: (value << 1) | 1
KVM_CPU = "host,-arch-capabilities"  # plain "host" aborts on PVM: "failed to set MSR 0x10a"
TCG_CPU = "max"


def find_qemu_binary(configured: Path | None = None) -> Path:
    """``configured`` (the settings' HYPEMAND_QEMU), else /usr/bin, /usr/local/bin, then PATH."""
    if configured is not None:
        if configured.is_file() and os.access(configured, os.X_OK):
            return configured
        raise DependencyMissing(f"HYPEMAND_QEMU={configured} is not an executable file")
    for directory in BINARY_SEARCH_DIRS:
        candidate = directory / QEMU_BINARY_NAME
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(QEMU_BINARY_NAME)
    if found:
        return Path(found)
    raise DependencyMissing(
        f"{QEMU_BINARY_NAME} not found (looked in /usr/bin, /usr/local/bin and PATH); "
        "install it: apt-get install --no-install-recommends qemu-system-x86"
    )


def parse_qemu_version(output: str) -> str:
    match = _VERSION_RE.search(output)
    if match is None:
        raise DependencyMissing(f"cannot parse the QEMU version from: {output.strip()[:200]!r}")
    return match.group(1)


# (resolved path, st_dev, st_ino, st_size, st_mtime_ns): changes when the file is replaced
# (package upgrade: new inode) or rewritten in place (size/mtime), or a symlink is repointed.
BinaryIdentity = tuple[str, int, int, int, int]

# binary as given -> (identity it had when asked, its version). One entry per binary path, so
# upgrades replace entries instead of piling up.
_versions: dict[Path, tuple[BinaryIdentity, str]] = {}


def binary_identity(binary: Path) -> BinaryIdentity:
    resolved = binary.resolve()
    st = resolved.stat()
    return (str(resolved), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def qemu_version(binary: Path) -> str:
    """``X.Y.Z`` of ``binary``, cached per file identity rather than per process: a QEMU
    upgraded under a running server is noticed at the next call (one ``stat``), so launch
    records name the version actually launched. Blocking (runs ``--version`` when the binary
    is new or changed): call it from a thread in async code."""
    try:
        identity = binary_identity(binary)
    except OSError as exc:
        raise DependencyMissing(f"cannot find {binary}: {exc}") from exc
    cached = _versions.get(binary)
    if cached is not None and cached[0] == identity:
        return cached[1]
    try:
        result = subprocess.run(
            [identity[0], "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DependencyMissing(f"cannot run {binary}: {exc}") from exc
    version = parse_qemu_version(result.stdout)
    # Replaced while it ran: the answer may belong to either file, so it is not cached.
    with contextlib.suppress(OSError):
        if binary_identity(binary) == identity:
            _versions[binary] = (identity, version)
    return version


# --- TSC -----------------------------------------------------------------------------------

# rdtsc; shl rdx, 32; or rax, rdx; ret
_RDTSC_CODE = bytes([0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3])


def _sample_tsc(rdtsc: Callable[[], int]) -> tuple[int, int]:
    """(clock ns, TSC) read as close together as possible: best of 20 by bracket width."""
    best: tuple[int, int, int] | None = None
    for _ in range(20):
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
        ticks = rdtsc()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
        if best is None or after - before < best[0]:
            best = (after - before, (before + after) // 2, ticks)
    assert best is not None
    return best[1], best[2]


def _measure_tsc_khz(window_seconds: float = 0.05) -> int | None:
    if os.uname().machine != "x86_64":
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:  # W^X policy (SELinux execmem and the like)
        return None
    try:
        page.write(_RDTSC_CODE)
        code_buffer = ctypes.c_char.from_buffer(page)
        rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(code_buffer))
        start_ns, start_ticks = _sample_tsc(rdtsc)
        time.sleep(window_seconds)
        end_ns, end_ticks = _sample_tsc(rdtsc)
        del rdtsc, code_buffer  # release the buffer export before the mmap closes
    finally:
        page.close()
    if end_ns <= start_ns or end_ticks <= start_ticks:
        return None
    return round((end_ticks - start_ticks) * 1_000_000 / (end_ns - start_ns))


def _tsc_khz_from_dmesg() -> int | None:
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    refined = re.findall(r"tsc: Refined TSC clocksource calibration: ([\d.]+) MHz", out)
    detected = re.findall(r"tsc: Detected ([\d.]+) MHz", out)
    values = refined or detected
    return round(float(values[-1]) * 1000) if values else None


def _tsc_khz_from_cpuinfo() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    if not flags or "constant_tsc" not in flags.group(1).split():
        return None
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.MULTILINE)
    return round(float(mhz.group(1)) * 1000) if mhz else None


@functools.cache
def host_tsc_khz() -> int | None:
    """The host TSC rate in kHz, or None if no method worked (then the option is left out).

    Blocking at the first call (a 50 ms measurement, perhaps ``dmesg``), cached afterwards: async
    code calls it through ``asyncio.to_thread``."""
    for method in (_measure_tsc_khz, _tsc_khz_from_dmesg, _tsc_khz_from_cpuinfo):
        value = method()
        # Anything outside 100 MHz .. 10 GHz is a failed measurement, not a CPU.
        if value is not None and 100_000 <= value <= 10_000_000:
            return value
    return None


# --- acceleration probe ----------------------------------------------------------------------


def probe_bios_image(iterations: int = PROBE_LOOP_ITERATIONS) -> bytes:
    """A 64 KiB firmware image whose reset vector busy-loops, then exits QEMU with status 85."""
    code = (
        bytes([0x66, 0xB9])  # mov ecx, imm32 (operand-size prefix: we are in 16-bit real mode)
        + iterations.to_bytes(4, "little")
        + bytes([0x66, 0x49])  # dec ecx
        + bytes([0x75, 0xFC])  # jnz back to dec
        + bytes([0xB0, PROBE_EXIT_VALUE])  # mov al, 0x2a
        + bytes([0xE6, 0xF4])  # out 0xf4, al  -> isa-debug-exit
        + bytes([0xF4])  # hlt
    )
    image = bytearray(b"\xf4" * 0x10000)  # QEMU wants a multiple of 64 KiB; pad with hlt
    image[0xFFF0 : 0xFFF0 + len(code)] = code  # the reset vector is 16 bytes below 1 MiB
    return bytes(image)


class ProbeResult(BaseModel):
    accel: Accel
    ok: bool
    seconds: float
    detail: str


async def run_probe_guest(
    binary: Path,
    accel: Accel,
    timeout: float = PROBE_TIMEOUT_SECONDS,  # noqa: ASYNC109 - the probe's verdict, not a cancellation
    iterations: int = PROBE_LOOP_ITERATIONS,
) -> ProbeResult:
    """Run the probe guest under ``accel``; ok if it reached its exit port within ``timeout``."""
    with tempfile.TemporaryDirectory(prefix="hypemand-accel-probe-") as tmp:
        bios = Path(tmp) / "probe.bin"
        bios.write_bytes(probe_bios_image(iterations))
        cpu = KVM_CPU if accel is Accel.KVM else TCG_CPU
        argv = [
            str(binary), "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-M", "microvm,x-option-roms=off", "-accel", accel.value, "-cpu", cpu, "-m", "16M",
            "-bios", str(bios), "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]  # fmt: skip
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            return ProbeResult(
                accel=accel,
                ok=False,
                seconds=time.monotonic() - started,
                detail=f"no exit within {timeout} s",
            )
        seconds = time.monotonic() - started
        ok = proc.returncode == PROBE_EXPECTED_STATUS
        detail = f"exit status {proc.returncode}"
        if not ok and output:
            detail += ": " + output.decode(errors="replace").strip()[-300:]
        return ProbeResult(accel=accel, ok=ok, seconds=seconds, detail=detail)


class AccelDecision(BaseModel):
    """``qemu-accel.json``: the cached probe result."""

    accel: Accel
    reason: str
    host_kernel: str
    qemu_version: str
    probed_at: datetime


def _kvm_openable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


async def probe_acceleration(
    binary: Path, cache_file: Path | None = None, *, use_cache: bool = True, forced: Accel | None = None
) -> AccelDecision:
    """Decide kvm or tcg for this host. Cached in ``cache_file`` (keyed by host kernel + QEMU
    version; see ``HypervisorStatePaths.accel_decision``)."""
    version = await asyncio.to_thread(qemu_version, binary)
    host_kernel = os.uname().release
    if forced is not None:
        return AccelDecision(
            accel=forced,
            reason="forced by the settings (HYPEMAND_ACCEL)",
            host_kernel=host_kernel,
            qemu_version=version,
            probed_at=datetime.now(UTC),
        )
    if use_cache and cache_file is not None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            cached = AccelDecision.model_validate_json(await asyncio.to_thread(cache_file.read_bytes))
            if cached.host_kernel == host_kernel and cached.qemu_version == version:
                return cached

    if not _kvm_openable():
        decision = AccelDecision(
            accel=Accel.TCG,
            reason="/dev/kvm cannot be opened",
            host_kernel=host_kernel,
            qemu_version=version,
            probed_at=datetime.now(UTC),
        )
    else:
        result = await run_probe_guest(binary, Accel.KVM)
        decision = AccelDecision(
            accel=Accel.KVM if result.ok else Accel.TCG,
            reason=f"KVM probe guest {'finished' if result.ok else 'failed'} in {result.seconds:.2f} s "
            f"({result.detail})",
            host_kernel=host_kernel,
            qemu_version=version,
            probed_at=datetime.now(UTC),
        )
    log.info("acceleration: %s (%s)", decision.accel, decision.reason)
    if cache_file is not None:
        await asyncio.to_thread(write_model_atomic, cache_file, decision)
    return decision
