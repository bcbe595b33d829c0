"""Host facts: QEMU binary and version, TSC rate, acceleration probe (real QEMU runs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hypemand.errors import DependencyMissing
from hypemand.hypervisor import qemu_host
from hypemand.hypervisor.base import Accel
from hypemand.hypervisor.qemu_host import (
    ACCEL_CACHE_NAME,
    AccelDecision,
    find_qemu_binary,
    host_tsc_khz,
    probe_acceleration,
    qemu_version,
    run_probe_guest,
)


def test_qemu_binary_and_version() -> None:
    binary = find_qemu_binary()
    assert binary.name == "qemu-system-x86_64"
    assert re.fullmatch(r"\d+\.\d+\.\d+", qemu_version(binary))


def test_missing_binary_is_a_dependency_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HYPEMAND_QEMU", str(tmp_path / "no-such-qemu"))
    with pytest.raises(DependencyMissing, match="HYPEMAND_QEMU"):
        find_qemu_binary()


def test_unparsable_version_is_a_dependency_error(tmp_path: Path) -> None:
    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/sh\necho something else\n")
    fake.chmod(0o755)
    with pytest.raises(DependencyMissing, match="cannot parse"):
        qemu_version(fake)


def test_measured_tsc_rate_matches_the_kernels_value() -> None:
    measured = qemu_host._measure_tsc_khz()
    assert measured is not None
    assert host_tsc_khz() is not None
    # /proc/cpuinfo's "cpu MHz" is the kernel's cpu_khz (= tsc_khz with a constant TSC and no
    # APERF/MPERF, as on these hosts); the direct measurement must agree closely.
    reference = qemu_host._tsc_khz_from_cpuinfo() or qemu_host._tsc_khz_from_dmesg()
    if reference is None:
        pytest.skip("no kernel-reported TSC rate to compare with")
    assert abs(measured - reference) / reference < 0.005


async def test_probe_guest_reaches_its_exit_port_under_tcg() -> None:
    # The probe must be able to succeed, or "tcg" below would prove nothing.
    result = await run_probe_guest(find_qemu_binary(), Accel.TCG, timeout=30)
    assert result.ok, result.detail


async def test_probe_guest_times_out_when_too_slow() -> None:
    # Far too many iterations for 0.3 s under TCG: the deadline, not the guest, ends the run.
    result = await run_probe_guest(find_qemu_binary(), Accel.TCG, timeout=0.3, iterations=4_000_000_000)
    assert not result.ok
    assert "no exit" in result.detail


async def test_acceleration_is_tcg_here_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYPEMAND_ACCEL", raising=False)
    binary = find_qemu_binary()
    decision = await probe_acceleration(binary, tmp_path)
    # These hosts are PVM (or have no usable /dev/kvm): stock kernels only run under TCG.
    assert decision.accel is Accel.TCG
    cached = AccelDecision.model_validate_json((tmp_path / ACCEL_CACHE_NAME).read_bytes())
    assert cached.accel is Accel.TCG
    assert cached.qemu_version == qemu_version(binary)

    async def no_probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached decision must be used")

    monkeypatch.setattr(qemu_host, "run_probe_guest", no_probe)
    assert (await probe_acceleration(binary, tmp_path)).probed_at == decision.probed_at


async def test_cache_for_another_qemu_version_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HYPEMAND_ACCEL", raising=False)
    binary = find_qemu_binary()
    stale = (await probe_acceleration(binary, tmp_path)).model_copy(
        update={"accel": Accel.KVM, "qemu_version": "0.0.1"}
    )
    (tmp_path / ACCEL_CACHE_NAME).write_text(stale.model_dump_json())
    assert (await probe_acceleration(binary, tmp_path)).accel is Accel.TCG


async def test_accel_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYPEMAND_ACCEL", "kvm")
    decision = await probe_acceleration(find_qemu_binary(), None)
    assert decision.accel is Accel.KVM
    assert "forced" in decision.reason
