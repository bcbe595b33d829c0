"""Process identity and pidfd-based waiting, with plain processes (no QEMU)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from hypemand.hypervisor.process import ProcessRecord, ProcessWatch, process_start_time


def start_sleep(directory: Path, seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", str(seconds)], cwd=directory, start_new_session=True)


async def test_many_waiters_all_see_the_exit(tmp_path: Path) -> None:
    child = start_sleep(tmp_path, 1)
    try:
        record = ProcessRecord.for_child(child.pid, tmp_path, "p1", "sleep")
        watch = ProcessWatch.open(record, child=child)
        assert watch is not None
        assert watch.is_alive()
        assert await watch.wait(0.05) is False  # still sleeping
        results = await asyncio.gather(watch.wait(30), watch.wait(30), watch.wait(30))
        assert results == [True, True, True]
        assert not watch.is_alive()
        assert child.returncode == 0  # reaped
        watch.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


async def test_signal_goes_to_the_verified_process(tmp_path: Path) -> None:
    child = start_sleep(tmp_path, 60)
    try:
        record = ProcessRecord.for_child(child.pid, tmp_path, "p2", "sleep")
        watch = ProcessWatch.open(record, child=child)
        assert watch is not None
        watch.send_signal(9)
        assert await watch.wait(30)
        assert child.returncode == -9
        watch.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_record_mismatches(tmp_path: Path) -> None:
    child = start_sleep(tmp_path, 60)
    try:
        record = ProcessRecord.for_child(child.pid, tmp_path, "p3", "sleep")
        assert record.mismatch() is None
        assert record.start_time == process_start_time(child.pid)
        assert "reused" in (record.model_copy(update={"start_time": record.start_time + 1}).mismatch() or "")
        assert "boot" in (record.model_copy(update={"boot_id": "x"}).mismatch() or "")
        assert "directory" in (record.model_copy(update={"directory": tmp_path / "other"}).mismatch() or "")
        assert ProcessWatch.open(record.model_copy(update={"start_time": record.start_time + 1})) is None
        child.kill()
        child.wait()
        assert record.mismatch() is not None
        assert ProcessWatch.open(record) is None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
