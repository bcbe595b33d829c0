"""``<instance>`` and ``<snapshot>`` arguments resolved client-side, as the Go CLI does.

The full list is fetched and the argument is matched against an exact id, then an exact name,
then a unique id prefix; anything else is "not found" or "ambiguous" with the candidates named.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from hypeman import Hypeman
from hypeman.types import Instance, Snapshot

from hypeman_cli.errors import CLIError

T = TypeVar("T")


def pick(items: Sequence[T], query: str, kind: str, ident: Callable[[T], str],
         name: Callable[[T], str | None]) -> T:
    if not query:
        raise CLIError(f"an empty {kind} argument matches nothing")
    for item in items:
        if ident(item) == query:
            return item
    named = [item for item in items if name(item) == query]
    if len(named) == 1:
        return named[0]
    prefixed = [item for item in items if ident(item).startswith(query)]
    if len(prefixed) == 1 and not named:
        return prefixed[0]
    candidates = named or prefixed
    if not candidates:
        raise CLIError(f"{kind} not found: {query!r} is no {kind}'s id, name or id prefix")
    listed = ", ".join(f"{ident(c)} ({name(c) or 'no name'})" for c in candidates[:10])
    more = f" and {len(candidates) - 10} more" if len(candidates) > 10 else ""
    raise CLIError(f"{kind} {query!r} is ambiguous: it matches {listed}{more}; use the full id")


def instance(client: Hypeman, query: str) -> Instance:
    return pick(client.instances.list(), query, "instance", lambda i: i.id, lambda i: i.name)


def snapshot(client: Hypeman, query: str) -> Snapshot:
    return pick(client.snapshots.list(), query, "snapshot", lambda s: s.id, lambda s: s.name)
