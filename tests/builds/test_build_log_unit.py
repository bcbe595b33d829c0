"""The pure parts of a build's run: its log and event stream, the error's tail."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from hypemand.builds import events
from hypemand.builds.events import BuildLog, LineCutter, stream
from hypemand.builds.models import BuildEvent, BuildEventType, BuildStatus
from hypemand.builds.runner import LineTail


def test_a_follower_gets_the_log_so_far_then_every_later_line_once_in_order(tmp_path: Path) -> None:
    async def scenario() -> None:
        log = BuildLog(tmp_path / "logs" / "build.log")
        status = BuildStatus.BUILDING
        await log.append(b"one\ntw")
        events = stream(log, lambda: status, follow=True, heartbeat=0.05)
        first = [await anext(events) for _ in range(2)]  # the replay: one complete line, the status
        assert [(e.type, e.content or e.status) for e in first] == [
            (BuildEventType.LOG, "one"), (BuildEventType.STATUS, BuildStatus.BUILDING)]
        await log.append(b"o\nthree\n")
        seen = [await anext(events) for _ in range(2)]
        assert [e.content for e in seen] == ["two", "three"]
        heartbeat = await anext(events)
        assert heartbeat.type is BuildEventType.HEARTBEAT
        log.status(BuildStatus.READY)
        last = await anext(events)
        assert last.type is BuildEventType.STATUS and last.status is BuildStatus.READY
        with pytest.raises(StopAsyncIteration):
            await anext(events)
        # A later reader replays the file: the same lines.
        replay = [e async for e in stream(log, lambda: BuildStatus.READY, follow=True)]
        assert [e.content for e in replay[:-1]] == ["one", "two", "three"]
        assert replay[-1].status is BuildStatus.READY

    asyncio.run(scenario())


def test_the_error_tail_keeps_the_last_lines_across_chunk_boundaries() -> None:
    tail = LineTail(3)
    for chunk in (b"a\nb", b"\nc\nd\n", b"partial"):
        tail.feed(chunk)
    assert tail.text() == "c\nd\npartial"


# ---- bounds: the log file, a line, a follower's backlog ----------------------------------------


def _contents(events: list[BuildEvent]) -> list[str]:
    return [e.content or "" for e in events if e.type is BuildEventType.LOG]


async def _replayed(log: BuildLog) -> list[BuildEvent]:
    return [e async for e in stream(log, lambda: BuildStatus.READY, follow=False)]


def test_followers_started_anywhere_see_exactly_what_the_file_replays(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random chunks (lines longer than MAX_LINE, chunks ending mid-line or mid-piece, the
    truncation at the cap) with followers joining between appends: each one's replay and
    follow together are the whole file's replay, no line lost or doubled."""
    monkeypatch.setattr(events, "MAX_LINE", 5)
    monkeypatch.setattr(events, "MAX_LOG_BYTES", 400)
    rng = random.Random(17)

    async def follower(log: BuildLog) -> list[BuildEvent]:
        return [e async for e in stream(log, lambda: BuildStatus.BUILDING, follow=True, heartbeat=3600)]

    async def scenario() -> None:
        log = BuildLog(tmp_path / "build.log")
        followers = []
        while not log.truncated:
            size = rng.choice((0, 1, 2, 4, 5, 6, 11, 23))
            await log.append(bytes(rng.choice(b"ab\n") for _ in range(size)))
            if rng.random() < 0.3:
                followers.append(asyncio.create_task(follower(log)))
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
        await log.append(b"dropped\n")
        for _ in range(3):
            await asyncio.sleep(0)
        log.status(BuildStatus.READY)
        whole = _contents(await _replayed(log))
        assert "".join(whole).endswith(events.TRUNCATED_LINE) and "dropped" not in "".join(whole)
        assert all(len(line) <= 5 for line in whole)
        assert len(followers) > 5
        for task in followers:
            assert _contents(await task) == whole

    asyncio.run(scenario())


def test_one_huge_append_is_cut_at_the_cap_and_drops_a_follower_that_cannot_keep_up(tmp_path: Path) -> None:
    """100 MiB in one append, with a follower that reads nothing meanwhile: the file keeps
    MAX_LOG_BYTES and one truncation line; the follower's stream ends (its backlog would pass
    MAX_FOLLOWER_BYTES); a later reader replays pieces of MAX_LINE, then the truncation line."""
    async def scenario() -> None:
        log = BuildLog(tmp_path / "build.log")
        await log.append(b"start\n")
        behind = stream(log, lambda: BuildStatus.BUILDING, follow=True, heartbeat=3600)
        assert [e.content or e.status for e in [await anext(behind), await anext(behind)]] == [
            "start", BuildStatus.BUILDING]
        await log.append(b"x" * (100 << 20))
        truncation = b"\n" + events.TRUNCATED_LINE.encode() + b"\n"
        assert log.path.stat().st_size == events.MAX_LOG_BYTES + len(truncation)
        with pytest.raises(StopAsyncIteration):
            await anext(behind)
        await log.append(b"more\n")
        assert log.path.stat().st_size == events.MAX_LOG_BYTES + len(truncation)
        replay = _contents(await _replayed(log))
        assert replay[0] == "start" and replay[-1] == "==> the log is truncated here (64 MiB)"
        pieces = replay[1:-1]
        assert all(len(piece) == events.MAX_LINE for piece in pieces[:-1])
        assert 0 < len(pieces[-1]) <= events.MAX_LINE
        assert sum(map(len, pieces)) == events.MAX_LOG_BYTES - len(b"start\n")

    asyncio.run(scenario())


def test_a_long_line_without_a_newline_is_held_one_piece_at_most(tmp_path: Path) -> None:
    """10 MiB and no newline in one append, nobody following: only its last piece is held back;
    a follower replays the pieces before it and gets that piece live when the line ends."""
    async def scenario() -> None:
        log = BuildLog(tmp_path / "build.log")
        line = bytes(97 + i % 26 for i in range(10 << 20))
        await log.append(line)
        events_ = stream(log, lambda: BuildStatus.BUILDING, follow=True, heartbeat=3600)
        replayed = []
        while (event := await anext(events_)).type is BuildEventType.LOG:
            replayed.append(event.content or "")
        await log.append(b"\n")
        last = await anext(events_)
        assert last.type is BuildEventType.LOG and last.content is not None
        assert 0 < len(last.content) <= events.MAX_LINE
        assert all(len(piece) == events.MAX_LINE for piece in replayed)
        assert "".join([*replayed, last.content]).encode() == line
        await events_.aclose()

    asyncio.run(scenario())


def test_a_follower_that_falls_behind_is_ended_and_the_others_go_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "MAX_FOLLOWER_EVENTS", 20)

    async def scenario() -> None:
        log = BuildLog(tmp_path / "build.log")
        slow = stream(log, lambda: BuildStatus.BUILDING, follow=True, heartbeat=3600)
        fast = stream(log, lambda: BuildStatus.BUILDING, follow=True, heartbeat=3600)
        for events_ in (slow, fast):
            assert (await anext(events_)).status is BuildStatus.BUILDING
        for i in range(20):  # exactly the bound: still queued
            await log.append(f"{i}\n".encode())
            assert (await anext(fast)).content == str(i)
        assert (await anext(slow)).content == "0"
        await log.append(b"20\n21\n")  # one over the bound for the slow one
        with pytest.raises(StopAsyncIteration):
            await anext(slow)
        assert [(await anext(fast)).content for _ in range(2)] == ["20", "21"]
        log.status(BuildStatus.READY)
        assert (await anext(fast)).status is BuildStatus.READY
        # The dropped client connects again: the file has every line.
        assert _contents(await _replayed(log)) == [str(i) for i in range(22)]

    asyncio.run(scenario())


def test_a_follower_backlog_is_bounded_in_bytes_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "MAX_FOLLOWER_BYTES", 10)

    async def scenario() -> None:
        log = BuildLog(tmp_path / "build.log")
        follower = stream(log, lambda: BuildStatus.BUILDING, follow=True, heartbeat=3600)
        await anext(follower)
        await log.append(b"12345\n67890\n")  # 10 characters: fits
        assert [(await anext(follower)).content for _ in range(2)] == ["12345", "67890"]
        await log.append(b"12345\n678901\n")  # 11
        with pytest.raises(StopAsyncIteration):
            await anext(follower)

    asyncio.run(scenario())


def test_a_log_found_past_the_cap_takes_no_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a restart: a file longer than the cap was truncated already; one exactly at the cap
    was not (the next append truncates it)."""
    monkeypatch.setattr(events, "MAX_LOG_BYTES", 10)
    path = tmp_path / "build.log"

    async def scenario() -> None:
        path.write_bytes(b"123456789\n")
        log = BuildLog(path)
        assert not log.truncated
        await log.append(b"a\n")
        assert path.read_bytes() == b"123456789\n" + events.TRUNCATED_LINE.encode() + b"\n"
        again = BuildLog(path)
        assert again.truncated
        await again.append(b"b\n")
        assert path.read_bytes() == b"123456789\n" + events.TRUNCATED_LINE.encode() + b"\n"

    asyncio.run(scenario())


@pytest.mark.parametrize("seed", range(20))
def test_skipping_leaves_the_same_partial_line_as_cutting(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "MAX_LINE", 4)
    rng = random.Random(seed)
    cut, skipped = LineCutter(), LineCutter()
    for _ in range(50):
        data = bytes(rng.choice(b"ab\n" if rng.random() < 0.5 else b"ab") for _ in range(rng.randrange(20)))
        lines = cut.feed(data)
        skipped.skip(data)
        assert all(len(line) <= 4 for line in lines)
        assert cut.partial == skipped.partial and len(cut.partial) <= 4


def test_lines_are_cut_at_newlines_and_every_max_line_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "MAX_LINE", 4)
    cutter = LineCutter()
    assert cutter.feed(b"a\n\nxxxxyyyyz\nwwww") == [b"a", b"", b"xxxx", b"yyyy", b"z"]
    assert cutter.partial == b"wwww"  # exactly MAX_LINE: one piece still, if a newline comes
    assert cutter.feed(b"\n") == [b"wwww"]
    assert cutter.feed(b"vvvvv") == [b"vvvv"] and cutter.partial == b"v"
