"""The console scanner without a VM: it finds markers in what is appended, in bounded memory
however long a line without a newline grows, and follows its console across a rotation."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from hypemand.guest.markers import GuestExit
from hypemand.instances.console import MAX_PARTIAL_BYTES, READ_CHUNK, ConsoleScanner

EXIT_LINE = b'HYPEMAN-EXIT code=3 message="done"\n'


def grow_without_newlines(path: Path, size: int) -> None:
    """Extend the file to ``size`` bytes with a hole: NUL bytes, read back at memory speed."""
    with path.open("r+b") as file:
        file.truncate(size)


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as file:
        file.write(data)


async def test_a_200_mb_line_without_newline_is_scanned_in_bounded_memory(tmp_path: Path) -> None:
    """A progress bar redrawn with carriage returns for 200 MB, scanned every 10 MB (as state
    reads do while it grows): the scanner keeps only a small tail of the line, and the marker
    the guest prints at its end is found."""
    console = tmp_path / "app.log"
    console.write_bytes(b"boot\nHYPEMAN-PROGRAM-START ts=1.25\n")
    scanner = ConsoleScanner(console, 0)
    start = console.stat().st_size
    tracemalloc.start()
    try:
        for step in range(1, 21):
            grow_without_newlines(console, start + step * (10 << 20))
            markers = await scanner.scan()
            assert markers.exit is None
        append(console, b"\rprogress 100% " + EXIT_LINE)
        markers = await scanner.scan()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert markers.program_start_ts == 1.25
    assert markers.exit == GuestExit(code=3, message="done")
    assert scanner.offset == console.stat().st_size
    # A few read chunks (1 MiB) at most; holding the line would take 200 MB.
    assert peak < 8 << 20, f"peak {peak >> 20} MiB"


async def test_a_marker_at_the_end_of_a_line_longer_than_the_kept_tail(tmp_path: Path) -> None:
    console = tmp_path / "app.log"
    console.write_bytes(b"")
    scanner = ConsoleScanner(console, 0)
    append(console, b"=" * (3 * MAX_PARTIAL_BYTES))
    assert (await scanner.scan()).agent_ready_ts is None
    append(console, b"=" * (3 * MAX_PARTIAL_BYTES) + b"HYPEMAN-AGENT-READY ts=7.5\r\n")
    assert (await scanner.scan()).agent_ready_ts == 7.5


async def test_a_marker_written_in_two_pieces_is_found_once_whole(tmp_path: Path) -> None:
    console = tmp_path / "app.log"
    console.write_bytes(b"earlier output\n")
    scanner = ConsoleScanner(console, 0)
    append(console, b"HYPEMAN-EXIT code=1")
    assert (await scanner.scan()).exit is None  # no message yet: not a whole marker
    append(console, b' message="late"\n')
    assert (await scanner.scan()).exit == GuestExit(code=1, message="late")


async def test_markers_across_read_chunks_and_the_last_of_each_kind_wins(tmp_path: Path) -> None:
    console = tmp_path / "app.log"
    filler = b"y\n" * (READ_CHUNK // 2 - 10)  # the next marker straddles the first chunk's end
    console.write_bytes(
        b"HYPEMAN-PROGRAM-START ts=1\n" + filler + b"HYPEMAN-PROGRAM-START ts=2\n"
        + filler + b"program says HYPEMAN-AGENT-READY ts=3\n" + b"y" * READ_CHUNK
    )
    markers = await ConsoleScanner(console, 0).scan()
    assert (markers.program_start_ts, markers.agent_ready_ts) == (2.0, 3.0)


async def test_only_what_follows_the_offset_is_this_boots(tmp_path: Path) -> None:
    console = tmp_path / "app.log"
    console.write_bytes(EXIT_LINE)
    scanner = ConsoleScanner(console, len(EXIT_LINE))
    assert (await scanner.scan()).exit is None


async def test_rebase_after_the_head_was_cut(tmp_path: Path) -> None:
    """A collapse cut bytes the scanner had read: its offset moves down by as many."""
    console = tmp_path / "app.log"
    head = b"HYPEMAN-PROGRAM-START ts=4\n" + b"x" * 8000 + b"\n"
    console.write_bytes(head + b"tail of the line")
    scanner = ConsoleScanner(console, 0)
    async with scanner.hold() as markers:
        assert markers.program_start_ts == 4.0
        copy = tmp_path / "app.log.1"
        copy.write_bytes(head)
        console.write_bytes(b"tail of the line")
        scanner.rebase(len(head), copy)
    assert scanner.offset == len(b"tail of the line")
    append(console, b" " + EXIT_LINE)
    markers = await scanner.scan()
    assert markers.program_start_ts == 4.0 and markers.exit == GuestExit(code=3, message="done")


async def test_rebase_reads_from_the_copy_what_it_had_not_scanned(tmp_path: Path) -> None:
    """A copy-then-truncate took bytes the scanner had not reached (written after its last
    scan): they are scanned from the copy, so their marker is not lost."""
    console = tmp_path / "app.log"
    console.write_bytes(b"boot\n")
    scanner = ConsoleScanner(console, 0)
    await scanner.scan()
    append(console, b"HYPEMAN-AGENT-READY ts=9\nhalf a li")
    copy = tmp_path / "app.log.1"
    copy.write_bytes(console.read_bytes())
    removed = copy.stat().st_size
    console.write_bytes(b"ne HYPEMAN-PROGRAM-START ts=10\n")
    scanner.rebase(removed, copy)
    assert scanner.offset == 0
    markers = await scanner.scan()
    assert (markers.agent_ready_ts, markers.program_start_ts) == (9.0, 10.0)
