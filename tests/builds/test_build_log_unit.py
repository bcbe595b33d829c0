"""The pure parts of a build's run: its log and event stream, the error's tail, image names."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hypemand.builds.events import BuildLog, stream
from hypemand.builds.models import BuildEventType, BuildStatus
from hypemand.builds.runner import LineTail
from hypemand.builds.service import split_image_name


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


@pytest.mark.parametrize(("name", "expected"), [
    ("builds/abc", ("builds/abc", "latest")),
    ("team/app:v1", ("team/app", "v1")),
    ("localhost:5000/app", ("localhost:5000/app", "latest")),
    ("localhost:5000/app:2", ("localhost:5000/app", "2")),
])
def test_image_names_split_into_repository_and_tag(name: str, expected: tuple[str, str]) -> None:
    assert split_image_name(name) == expected
