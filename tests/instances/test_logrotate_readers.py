"""Reading a log across its rotations (the engine of ``GET /instances/{id}/logs``): a follower
neither repeats nor loses a line when the head it was reading is cut away, wherever it stood;
the tail of a log just rotated reaches back into the copy, joining the line the cut split."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from hypemand.instances import logrotate
from hypemand.instances.logrotate import rotate_file
from hypemand.instances.logtail import LogFollower, RotationLedger, open_log

LINE = "line %08d"


def numbered(first: int, count: int) -> bytes:
    return b"".join(b"line %08d\n" % i for i in range(first, first + count))


def expected(first: int, count: int) -> list[str]:
    return [LINE % i for i in range(first, first + count)]


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as log:
        log.write(data)


def follower(path: Path, ledger: RotationLedger, offset: int = 0) -> LogFollower:
    # Reads of 64 KiB at most, so that a follower can stand in the middle of a head being cut.
    return LogFollower(path, path.open("rb", buffering=0), offset, read_limit=64 << 10, ledger=ledger)


def read_all(reader: LogFollower) -> list[str]:
    lines: list[str] = []
    while batch := reader.read_new():
        lines += batch
    return lines


@pytest.mark.parametrize("collapse", [True, False], ids=["collapse", "copy-truncate"])
def test_a_follower_in_the_middle_of_the_cut_head_reads_its_rest_from_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collapse: bool
) -> None:
    if not collapse:
        monkeypatch.setattr(logrotate, "collapse_head", lambda fd, length: False)
    path = tmp_path / "app.log"
    path.write_bytes(numbered(0, 30_000))
    ledger = RotationLedger()
    reader = follower(path, ledger, offset=len(numbered(0, 1000)))
    try:
        first = reader.read_new()  # one bounded read: it stands in the middle of the head
        assert first[0] == LINE % 1000 and len(first) < 29_000
        assert rotate_file(path, 1, ledger) is not None
        append(path, numbered(30_000, 10))
        assert first + read_all(reader) == expected(1000, 29_010)
    finally:
        reader.close()


def test_a_follower_past_the_cut_moves_down_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(numbered(0, 30_000))
    ledger = RotationLedger()
    reader = follower(path, ledger, offset=path.stat().st_size)
    try:
        assert read_all(reader) == []
        rotation = rotate_file(path, 1, ledger)
        assert rotation is not None and 0 < path.stat().st_size < 4096
        append(path, numbered(30_000, 3))
        assert read_all(reader) == expected(30_000, 3)
    finally:
        reader.close()


def test_a_follower_two_rotations_behind_reads_both_copies(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(numbered(0, 30_000))
    ledger = RotationLedger()
    reader = follower(path, ledger, offset=len(numbered(0, 10)))
    try:
        assert rotate_file(path, 2, ledger) is not None
        append(path, numbered(30_000, 30_000))
        assert rotate_file(path, 2, ledger) is not None
        append(path, numbered(60_000, 5))
        assert read_all(reader) == expected(10, 60_000 - 10 + 5)
    finally:
        reader.close()


def test_a_follower_behind_the_copies_kept_loses_only_what_was_dropped(tmp_path: Path) -> None:
    """One copy kept and two rotations missed: the first cut's rest is gone; what follows is
    read once, in order, from a whole line on."""
    path = tmp_path / "app.log"
    path.write_bytes(numbered(0, 30_000))
    ledger = RotationLedger()
    reader = follower(path, ledger, offset=0)
    try:
        assert rotate_file(path, 1, ledger) is not None
        append(path, numbered(30_000, 30_000))
        assert rotate_file(path, 1, ledger) is not None
        append(path, numbered(60_000, 5))
        lines = read_all(reader)
        assert lines[-5:] == expected(60_000, 5)
        whole = [line for line in lines if len(line) == len(LINE % 0)]
        first = int(whole[1].split()[1])
        assert whole[1:] == expected(first, 60_005 - first)
        assert first <= 30_000
    finally:
        reader.close()


def test_following_while_a_writer_appends_and_the_log_is_rotated_again_and_again(tmp_path: Path) -> None:
    """The SSE route's loop (read_new in one thread) against QEMU's (appends in another) and
    the rotator's (a third): the lines followed are exactly the lines written."""
    path = tmp_path / "app.log"
    path.write_bytes(b"")
    ledger = RotationLedger()
    reader = follower(path, ledger)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    stop = threading.Event()
    written = [0]

    def write() -> None:
        while not stop.is_set():
            os.write(fd, numbered(written[0], 50))
            written[0] += 50

    def rotate() -> None:
        rotations = 0
        while rotations < 10:
            if path.stat().st_size > 256 << 10 and rotate_file(path, 1, ledger) is not None:
                rotations += 1
        stop.set()

    followed: list[str] = []
    threads = [threading.Thread(target=write), threading.Thread(target=rotate)]
    for thread in threads:
        thread.start()
    try:
        while not stop.is_set():
            followed += reader.read_new()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        os.close(fd)
    followed += read_all(reader)
    reader.close()
    assert ledger.generation(path) == 10
    assert followed == expected(0, written[0])


def test_the_tail_of_a_log_just_rotated_reaches_into_the_copy(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(numbered(0, 30_000))
    ledger = RotationLedger()
    assert rotate_file(path, 1, ledger) is not None
    kept = path.read_bytes()
    assert not kept.startswith(b"line")  # the cut split a line between the copy and the log
    lines, _ = open_log(path, 1000, follow=False, ledger=ledger)
    assert lines == expected(29_000, 1000)
    lines, _ = open_log(path, 3, follow=False, ledger=ledger)
    assert lines == expected(29_997, 3)


def test_following_from_a_tail_whose_last_line_began_in_the_copy(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_bytes(numbered(0, 3000) + b"an unfinished line " + b"x" * 8000)
    ledger = RotationLedger()
    assert rotate_file(path, 1, ledger) is not None
    assert b"\n" not in path.read_bytes()
    lines, reader = open_log(path, 2, follow=True, ledger=ledger)
    assert reader is not None
    try:
        assert lines == expected(2998, 2)
        append(path, b" ends here\n" + numbered(3000, 1))
        assert read_all(reader) == ["an unfinished line " + "x" * 8000 + " ends here", LINE % 3000]
    finally:
        reader.close()
