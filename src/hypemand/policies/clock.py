"""Waiting for a moment of the wall clock (a restart's ``next_attempt_at``, a hold's end).

asyncio's timers run on the monotonic clock, which may run a little ahead of the wall clock
(NTP slewing it): one ``asyncio.sleep`` of the difference can end microseconds before the
moment, so the wait is taken again until the wall clock has really got there.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime


async def sleep_until(moment: datetime) -> None:
    while (remaining := (moment - datetime.now(UTC)).total_seconds()) > 0:  # noqa: ASYNC110
        await asyncio.sleep(remaining)  # a wall-clock deadline, not another task's signal
