"""Wake on traffic: a request through the ingress to an instance in standby restores it.

Caddy asks our DNS responder (``resolver.py``) for an instance's address whenever its cached
answer is older than its refresh interval (``caddyconfig.DNS_REFRESH``), so a request for an
instance that has been asleep longer than that reaches the responder. Asked for an instance in standby, the
responder calls :meth:`Waker.wake` and answers the address the instance keeps at once: Caddy
holds one process-wide lock during every such lookup (measured on 2.6: a held answer stalled a
request to another instance for as long), so the answer must never wait for the restore.
Caddy's dial to the sleeping address is reset at once (``network/firewall.py``), and it dials
again every few milliseconds (``caddyconfig.RETRY_INTERVAL``) until the restored VM answers.

One restore per instance at a time: a burst of requests (each asks, each retry asks again once
the cached answer is stale) joins the restore under way. A restore that fails leaves the
instance in standby; for ``retry_after`` seconds after that, requests for it are answered 502
with the reason at once (``wakefail.py``) instead of waiting through a wake that just failed,
and the first request after the pause tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from hypemand.errors import DomainError

log = logging.getLogger(__name__)

RETRY_AFTER = 10.0  # seconds after a failed wake during which requests are answered 502 at once


class Waker:
    def __init__(self, restore: Callable[[str], Awaitable[object]], is_asleep: Callable[[str], bool], *,
                 on_failure: Callable[[str, str], Awaitable[None]] | None = None,
                 on_clear: Callable[[str], Coroutine[Any, Any, None]] | None = None,
                 retry_after: float = RETRY_AFTER) -> None:
        """``restore(instance_id)``: the instance manager's restore, as a policy (not a client)
        asks for it; ``is_asleep(instance_id)``: whether it is still in standby.
        ``on_failure(instance_id, why)`` once its wake failed, ``on_clear(instance_id)`` once
        that failure is history (the pause is over, or the instance runs again)."""
        self._restore = restore
        self._is_asleep = is_asleep
        self._on_failure = on_failure
        self._on_clear = on_clear
        self.retry_after = retry_after
        self._waking: dict[str, asyncio.Task[None]] = {}
        self._failed: set[str] = set()  # whose failed wake holds
        self._chores: set[asyncio.Task[None]] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def wake(self, instance_id: str) -> bool:
        """Start the restore of a sleeping instance, or join the one under way (synchronous:
        called by the DNS responder on the event loop). False while its last wake's failure
        holds (``retry_after`` seconds, until :meth:`forget` has cleared it): nothing is started."""
        task = self._waking.get(instance_id)
        if task is not None and not task.done():
            return True
        if self.failed(instance_id):
            return False
        task = asyncio.get_running_loop().create_task(self._wake(instance_id), name=f"wake-{instance_id}")
        self._waking[instance_id] = task
        task.add_done_callback(lambda done: self._done(instance_id, done))
        return True

    def waking(self, instance_id: str) -> bool:
        task = self._waking.get(instance_id)
        return task is not None and not task.done()

    def failed(self, instance_id: str) -> bool:
        """Whether a failed wake of the instance still holds."""
        return instance_id in self._failed

    def forget(self, instance_id: str) -> None:
        """The instance's failed wake is history: its pause is over, or it runs again. It holds
        until ``on_clear`` is done, so a wake started after it never meets its leftovers."""
        if (timer := self._timers.pop(instance_id, None)) is not None:
            timer.cancel()
        if instance_id in self._failed:
            self._chore(self._clear(instance_id))

    async def _clear(self, instance_id: str) -> None:
        try:
            if self._on_clear is not None:
                await self._on_clear(instance_id)
        finally:
            self._failed.discard(instance_id)

    def _done(self, instance_id: str, task: asyncio.Task[None]) -> None:
        if self._waking.get(instance_id) is task:
            del self._waking[instance_id]

    def _chore(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _wake(self, instance_id: str) -> None:
        log.info("ingress: a request for instance %s, which is in standby: restoring it", instance_id)
        started = time.monotonic()
        try:
            await self._restore(instance_id)
        except Exception as exc:
            if not self._is_asleep(instance_id):
                # Restored by a client meanwhile (or stopped, or deleted): nothing left to wake.
                log.info("ingress: instance %s is no longer in standby (%s)", instance_id, exc)
                return
            await self._fail(instance_id, exc)
            return
        log.info("ingress: instance %s woke in %.0f ms", instance_id, (time.monotonic() - started) * 1000)

    async def _fail(self, instance_id: str, exc: Exception) -> None:
        self._failed.add(instance_id)
        if isinstance(exc, DomainError):
            log.warning("ingress: could not wake instance %s: %s; requests for it are answered 502 for "
                        "%.0f s", instance_id, exc, self.retry_after)
        else:
            log.exception("ingress: waking instance %s failed", instance_id)
        self._timers[instance_id] = asyncio.get_running_loop().call_later(
            self.retry_after, self.forget, instance_id)
        if self._on_failure is not None:
            await self._on_failure(instance_id, str(exc) or type(exc).__name__)

    async def settled(self) -> None:
        """Wait for the wakes, and the clearing of failures, under way."""
        while pending := [*self._waking.values(), *self._chores]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        """Wait for the wakes under way (a restore cut short would only leave more to undo)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        await self.settled()
