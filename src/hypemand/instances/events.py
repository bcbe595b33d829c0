"""What happened to an instance, told to whoever listens (the policies: restarts, health,
auto-standby, schedules).

The instance manager emits an :class:`InstanceEvent` after each change has landed (the record is
written, the VMM is up or gone). Listeners are plain callables run on the event loop; they must
not block or raise, and they must not assume they see every event: a server that was down saw
none, so each policy also derives what it needs from the instance's record and state when it
starts (events make it prompt, not correct).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

log = logging.getLogger(__name__)


class EventKind(StrEnum):
    CREATED = "created"  # a create or fork answered (the VM runs, or the instance is Stopped)
    STARTED = "started"  # a stopped instance was booted again
    STOPPED = "stopped"  # the server ended the VM on a request (stop)
    EXITED = "exited"  # the VM ended by itself: the program exited, the VMM or the guest crashed
    STANDBY = "standby"  # the VM was saved and its VMM ended
    RESTORED = "restored"  # a standby (or a snapshot in place) runs again
    DELETED = "deleted"


@dataclass(frozen=True)
class InstanceEvent:
    kind: EventKind
    instance_id: str
    # Who asked: True for a client's request, False for the server's own policies (a restart
    # after a crash, an auto-standby, a health-triggered stop).
    manual: bool = True
    # EXITED: the program's exit code (None when none was recorded) and, for a VMM or kernel
    # crash, what happened.
    exit_code: int | None = None
    crash: str | None = None

    @property
    def failed(self) -> bool:
        """An EXITED that counts as a failure: a non-zero or unknown exit code, or a crash."""
        return self.kind is EventKind.EXITED and (self.exit_code != 0 or self.crash is not None)


Listener = Callable[[InstanceEvent], None]


class InstanceEvents:
    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, event: InstanceEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # one listener's bug must not fail the operation that emitted
                log.exception("instance event listener failed on %s", event)
