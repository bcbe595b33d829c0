"""Query-string shapes the official clients send, parsed once for every router."""

from __future__ import annotations

from fastapi import Request


def tag_filter(request: Request) -> dict[str, str]:
    """``?tags[team]=backend&tags[env]=prod`` (deepObject style) -> {"team": "backend", ...}."""
    wanted: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key.startswith("tags[") and key.endswith("]"):
            wanted[key[5:-1]] = value
    return wanted
