"""Tags (``metadata``): the same rules for every resource that carries them (images, instances,
snapshots, and later volumes and builds)."""

from __future__ import annotations

import re

TAG_KEY = re.compile(r"^[A-Za-z0-9 _.:/=+@-]{1,128}$")
TAG_VALUE = re.compile(r"^[A-Za-z0-9 _.:/=+@-]{0,256}$")
MAX_TAGS = 50


def check_tags(tags: dict[str, str] | None) -> dict[str, str] | None:
    """``tags`` if valid (None stays None); ValueError saying what is wrong otherwise."""
    if tags is None:
        return None
    if len(tags) > MAX_TAGS:
        raise ValueError(f"at most {MAX_TAGS} tags are allowed")
    for key, value in tags.items():
        if not isinstance(key, str) or not TAG_KEY.match(key):
            raise ValueError(f"invalid tag key {key!r}")
        if not isinstance(value, str) or not TAG_VALUE.match(value):
            raise ValueError(f"invalid tag value for {key!r}")
    return tags
