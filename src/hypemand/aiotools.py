"""Small asyncio tools the standard library lacks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def run_to_completion(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` to its end even if the caller is cancelled meanwhile, once or many
    times; the caller's cancellation is raised again afterwards.

    For work that must not be cut short: a VM's delete after a build, a record's write and the
    in-memory state that goes with it, a thread whose files are removed next. ``asyncio.shield``
    alone protects the work but lets the caller go at the first cancel, and a second cancel
    during a ``finally`` skips whatever follows it.
    """
    task = asyncio.ensure_future(awaitable)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise  # the work itself was cancelled
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return result
