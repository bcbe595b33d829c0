"""Log rotation without a VM: the head of a log a writer holds open for appending (as QEMU holds
the console) is cut into ``<log>.1`` without losing or repeating a byte; copies shift and the
oldest is dropped; the rotator rotates only what is over the limit, leaves an instance in the
middle of an operation for the next pass, and keeps the console scanner and the record's boot
offset right, so that no marker of the running boot is lost."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hypemand.guest.markers import GuestExit
from hypemand.hypervisor.base import Board
from hypemand.instances import logrotate
from hypemand.instances.console import ConsoleScanner
from hypemand.instances.live import LiveInstance
from hypemand.instances.logrotate import LogRotator, rotate_file
from hypemand.instances.logtail import RotationLedger, rotated_name
from hypemand.instances.models import InstanceRecord
from hypemand.instances.records import load_record
from hypemand.layout import InstancePaths

NOW = datetime(2026, 12, 7, tzinfo=UTC)
LIMIT = 256 << 10


def numbered(first: int, count: int) -> bytes:
    return b"".join(b"line %08d\n" % i for i in range(first, first + count))


def the_whole_log(path: Path, max_files: int) -> bytes:
    """Every copy, oldest first, then the log itself: what was written, if nothing was lost."""
    copies = [rotated_name(path, n) for n in range(max_files, 0, -1)]
    return b"".join(copy.read_bytes() for copy in copies if copy.exists()) + path.read_bytes()


@pytest.fixture
def appender(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A log and a descriptor open on it for appending, kept open as QEMU keeps its console."""
    path = tmp_path / "app.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        yield path, fd
    finally:
        os.close(fd)


def test_the_head_is_cut_into_the_copy_and_the_writer_goes_on_at_the_end(appender: tuple[Path, int]) -> None:
    path, fd = appender
    os.write(fd, numbered(0, 50_000))  # 700 kB
    ledger = RotationLedger()
    rotation = rotate_file(path, 1, ledger)
    assert rotation is not None and rotation.copy == rotated_name(path, 1)
    assert rotation.removed > 0 and rotation.removed % 4096 == 0
    assert path.stat().st_size < 4096  # only the last partial block stays
    assert ledger.cuts_since(path, 0) == [rotation.removed]
    os.write(fd, numbered(50_000, 10))
    assert the_whole_log(path, 1) == numbered(0, 50_010)
    assert not path.with_name("app.log.1.partial").exists()


def test_nothing_is_lost_or_repeated_while_a_writer_appends_during_rotations(
    appender: tuple[Path, int],
) -> None:
    path, fd = appender
    stop = threading.Event()
    written = [0]

    def write() -> None:
        while not stop.is_set():
            os.write(fd, numbered(written[0], 100))
            written[0] += 100

    writer = threading.Thread(target=write)
    writer.start()
    try:
        rotations = 0
        while rotations < 8:
            if path.stat().st_size > LIMIT and rotate_file(path, 10, RotationLedger()) is not None:
                rotations += 1
    finally:
        stop.set()
        writer.join()
    assert rotated_name(path, 8).exists() and not rotated_name(path, 9).exists()
    assert the_whole_log(path, 10) == numbered(0, written[0])


def test_copies_shift_and_the_oldest_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "vmm.log"
    parts = [numbered(i * 10_000, 10_000) for i in range(3)]
    for part in parts:
        with path.open("ab") as log:
            log.write(part)
        assert rotate_file(path, 2) is not None
    assert not rotated_name(path, 3).exists()
    # What is kept is the end of what was written, whole; the first part's copy was dropped.
    kept = the_whole_log(path, 2)
    assert b"".join(parts).endswith(kept) and b"line 00009000" not in kept
    assert b"line 00019000" in rotated_name(path, 2).read_bytes()
    assert b"line 00029000" in rotated_name(path, 1).read_bytes()


def test_without_collapse_the_log_is_copied_then_truncated(
    appender: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a file system that cannot collapse (tmpfs) the rotation is a copy and a truncation:
    the whole log goes to the copy and the writer goes on at the start of the empty file."""
    monkeypatch.setattr(logrotate, "collapse_head", lambda fd, length: False)
    path, fd = appender
    os.write(fd, numbered(0, 20_000))
    ledger = RotationLedger()
    rotation = rotate_file(path, 1, ledger)
    assert rotation is not None and rotation.removed == len(numbered(0, 20_000))
    assert path.stat().st_size == 0
    os.write(fd, numbered(20_000, 5))
    assert path.read_bytes() == numbered(20_000, 5)
    assert the_whole_log(path, 1) == numbered(0, 20_005)
    assert ledger.cuts_since(path, 0) == [rotation.removed]


def test_a_log_that_is_gone_is_not_rotated(tmp_path: Path) -> None:
    assert rotate_file(tmp_path / "missing.log", 1) is None
    assert list(tmp_path.iterdir()) == []


# ---- the rotator over instances ------------------------------------------------------------


def instance(directory: Path, console: bytes, console_offset: int = 0) -> LiveInstance:
    directory.mkdir()
    paths = InstancePaths(directory)
    paths.console_log.parent.mkdir()
    paths.console_log.write_bytes(console)
    record = InstanceRecord(
        id=directory.name, name=directory.name, image="img", image_digest="sha256:" + "0" * 64,
        platform="linux/amd64", board=Board.QEMU_MICROVM, vcpus=1, memory_bytes=256 << 20,
        overlay_bytes=64 << 20, mac="02:00:00:00:00:01", created_at=NOW, phase_since=NOW,
        console_offset=console_offset,
    )
    live = LiveInstance(record=record, paths=paths)
    live.scanner = ConsoleScanner(paths.console_log, console_offset)
    return live


def rotator(*lives: LiveInstance, interval: float = 60.0) -> LogRotator:
    return LogRotator(lambda: lives, max_size=LIMIT, max_files=1, interval=interval, ledger=RotationLedger())


PREVIOUS_BOOT = b'HYPEMAN-PROGRAM-START ts=1\nHYPEMAN-EXIT code=9 message="old boot"\n'
THIS_BOOT = b"HYPEMAN-AGENT-READY ts=2\nHYPEMAN-PROGRAM-START ts=3\n"


async def test_the_console_keeps_this_boots_markers_and_both_offsets_follow(tmp_path: Path) -> None:
    """The boot began at an offset past a previous boot; its markers and half a megabyte of
    output (not yet scanned) are rotated away. The scanner still knows the markers, reads on
    from the right place, and the record's boot offset moved to the start of the file."""
    live = instance(tmp_path / "a", PREVIOUS_BOOT, console_offset=len(PREVIOUS_BOOT))
    with live.paths.console_log.open("ab") as console:
        console.write(THIS_BOOT + numbered(0, 40_000))
    rotations = await rotator(live).rotate_due()
    assert [r.path.name for r in rotations] == ["app.log"]
    assert live.record.console_offset == 0
    stored = load_record(live.paths.record)
    assert stored is not None and stored.console_offset == 0
    scanner = live.scanner
    assert scanner is not None and scanner.offset == live.paths.console_log.stat().st_size
    with live.paths.console_log.open("ab") as console:
        console.write(b'HYPEMAN-EXIT code=0 message="finished"\n')
    markers = await scanner.scan()
    assert (markers.agent_ready_ts, markers.program_start_ts) == (2.0, 3.0)
    assert markers.exit == GuestExit(code=0, message="finished")


async def test_a_boot_offset_past_the_cut_moves_down_by_the_bytes_cut(tmp_path: Path) -> None:
    earlier = numbered(0, 40_000)
    live = instance(tmp_path / "a", earlier + THIS_BOOT, console_offset=len(earlier))
    [rotation] = await rotator(live).rotate_due()
    assert live.record.console_offset == len(earlier) - rotation.removed
    console = live.paths.console_log.read_bytes()
    assert console[live.record.console_offset :] == THIS_BOOT


async def test_only_logs_over_the_limit_are_rotated_the_other_logs_too(tmp_path: Path) -> None:
    live = instance(tmp_path / "a", b"short console\n")
    live.paths.vmm_log.write_bytes(numbered(0, 30_000))
    live.paths.operations_log.write_bytes(numbered(0, 30_000))
    rotations = await rotator(live).rotate_due()
    assert sorted(r.path.name for r in rotations) == ["hypeman.log", "vmm.log"]
    assert live.paths.console_log.read_bytes() == b"short console\n"
    assert not rotated_name(live.paths.console_log, 1).exists()
    assert live.record.console_offset == 0


async def test_an_instance_in_an_operation_waits_for_the_next_pass(tmp_path: Path) -> None:
    busy = instance(tmp_path / "busy", numbered(0, 30_000))
    deleted = instance(tmp_path / "deleted", numbered(0, 30_000))
    deleted.deleted = True
    rotation = rotator(busy, deleted)
    async with busy.lock:
        assert await rotation.rotate_due() == []
    assert busy.paths.console_log.stat().st_size == len(numbered(0, 30_000))
    assert [r.path.parent.parent.name for r in await rotation.rotate_due()] == ["busy"]
    assert deleted.paths.console_log.stat().st_size == len(numbered(0, 30_000))


async def test_the_rotator_runs_every_interval_until_closed(tmp_path: Path) -> None:
    live = instance(tmp_path / "a", b"")
    rotation = rotator(live, interval=0.02)
    rotation.start()
    try:
        for round_ in range(3):
            with live.paths.console_log.open("ab") as console:
                console.write(numbered(round_ * 30_000, 30_000))
            async with asyncio.timeout(10):
                while live.paths.console_log.stat().st_size > LIMIT:  # noqa: ASYNC110 - a file to poll
                    await asyncio.sleep(0.01)
    finally:
        await rotation.close()
    assert rotation.ledger.generation(live.paths.console_log) == 3
    with live.paths.console_log.open("ab") as console:
        console.write(numbered(0, 30_000))
    await asyncio.sleep(0.1)  # closed: several intervals pass and nothing is rotated
    assert rotation.ledger.generation(live.paths.console_log) == 3
