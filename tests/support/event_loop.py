"""Checking that blocking work stays off the event loop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class LoopSpy:
    """Wraps functions to record which were called, and which of them ran on the thread that
    made the spy (the event loop's, in an async test)."""

    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()
        self.called: set[str] = set()
        self.on_the_loop: list[str] = []

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.called.add(name)
            if threading.get_ident() == self.loop_thread:
                self.on_the_loop.append(name)
            return function(*args, **kwargs)

        return wrapper
