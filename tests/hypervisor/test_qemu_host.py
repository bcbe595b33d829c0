"""Host facts: QEMU binary and version, TSC rate, acceleration probe (real QEMU runs)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from hypemand.errors import DependencyMissing
from hypemand.hypervisor import qemu_host
from hypemand.hypervisor.base import Accel, HypervisorStatePaths
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.hypervisor.qemu_host import (
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


def test_missing_binary_is_a_dependency_error(tmp_path: Path) -> None:
    with pytest.raises(DependencyMissing, match="HYPEMAND_QEMU"):
        find_qemu_binary(tmp_path / "no-such-qemu")


def test_unparsable_version_is_a_dependency_error(tmp_path: Path) -> None:
    fake = tmp_path / "fake-qemu"
    fake.write_text("#!/bin/sh\necho something else\n")
    fake.chmod(0o755)
    with pytest.raises(DependencyMissing, match="cannot parse"):
        qemu_version(fake)


def write_fake_qemu(path: Path, version: str, runs_log: Path) -> None:
    """A "QEMU" that prints ``version`` and notes each run; installed the way package managers
    upgrade (new file renamed over the old one)."""
    staged = path.with_name(path.name + ".new")
    staged.write_text(f"#!/bin/sh\necho run >> '{runs_log}'\necho 'QEMU emulator version {version} (fake)'\n")
    staged.chmod(0o755)
    os.replace(staged, path)


def test_qemu_version_is_cached_per_binary_file_and_follows_an_upgrade(tmp_path: Path) -> None:
    runs_log = tmp_path / "runs"
    fake = tmp_path / "qemu-system-x86_64"
    write_fake_qemu(fake, "7.2.0", runs_log)
    assert qemu_version(fake) == "7.2.0"
    assert qemu_version(fake) == "7.2.0"
    assert len(runs_log.read_text().splitlines()) == 1  # the second answer came from the cache

    write_fake_qemu(fake, "9.1.2", runs_log)  # upgraded under the running server
    assert qemu_version(fake) == "9.1.2"
    assert QemuHypervisor(binary=fake).version() == "9.1.2"
    assert len(runs_log.read_text().splitlines()) == 2

    # A symlink repointed at another build is a change too.
    other = tmp_path / "qemu-10"
    write_fake_qemu(other, "10.0.0", runs_log)
    link = tmp_path / "qemu-link"
    link.symlink_to(fake)
    assert qemu_version(link) == "9.1.2"
    staged_link = tmp_path / "qemu-link.new"
    staged_link.symlink_to(other)
    os.replace(staged_link, link)
    assert qemu_version(link) == "10.0.0"


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


def assert_consistent_with_the_probe(decision: AccelDecision) -> None:
    """KVM exactly when /dev/kvm opens and the probe guest finished in time (hardware KVM); TCG
    when it cannot be opened or the probe failed (PVM hosts, where stock kernels crawl)."""
    if not qemu_host._kvm_openable():
        assert (decision.accel, decision.reason) == (Accel.TCG, "/dev/kvm cannot be opened")
    elif decision.accel is Accel.KVM:
        assert decision.reason.startswith("KVM probe guest finished"), decision.reason
    else:
        assert decision.accel is Accel.TCG
        assert decision.reason.startswith("KVM probe guest failed"), decision.reason


async def test_acceleration_follows_the_probe_and_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = find_qemu_binary()
    cache = HypervisorStatePaths(tmp_path).accel_decision
    decision = await probe_acceleration(binary, cache)
    assert_consistent_with_the_probe(decision)
    cached = AccelDecision.model_validate_json(cache.read_bytes())
    assert cached == decision
    assert cached.qemu_version == qemu_version(binary)

    async def no_probe(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached decision must be used")

    monkeypatch.setattr(qemu_host, "run_probe_guest", no_probe)
    assert (await probe_acceleration(binary, cache)).probed_at == decision.probed_at


async def test_cache_for_another_qemu_version_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = find_qemu_binary()
    cache = HypervisorStatePaths(tmp_path).accel_decision
    actual = await probe_acceleration(binary, cache)
    # The stale entry says the opposite of this host's answer, so using it would show.
    opposite = Accel.TCG if actual.accel is Accel.KVM else Accel.KVM
    stale = actual.model_copy(update={"accel": opposite, "qemu_version": "0.0.1"})
    cache.write_text(stale.model_dump_json())
    decided = await probe_acceleration(binary, cache)
    assert decided.accel is actual.accel
    assert decided.qemu_version == qemu_version(binary)


async def test_accel_can_be_forced() -> None:
    decision = await probe_acceleration(find_qemu_binary(), None, forced=Accel.KVM)
    assert decision.accel is Accel.KVM
    assert "forced" in decision.reason
