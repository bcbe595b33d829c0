"""What the stream routes (``logs``, ``exec``, ``cp``) need from the instance manager, and the
``PathInfo`` wire shape that ``stat`` and ``cp`` both answer with."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from starlette.requests import HTTPConnection

from hypemand.guest.client import AgentClient
from hypemand.guest.models import PathInfo


class InstanceStreams(Protocol):
    """The stream side of the instance manager (``app.state.runtime.instances``)."""

    async def guest_agent(self, ref: str, wait_for_agent: float = 0.0) -> AgentClient:
        """The connected agent of a Running instance. ref: id, exact name or unique id prefix.
        Raises NotFound (404), Conflict "ambiguous" (409), InvalidState (409 invalid_state) if
        not Running after waiting up to ``wait_for_agent`` seconds."""
        ...

    async def log_file(self, ref: str, source: str) -> Path:
        """The log file of source app|vmm|hypeman; it may not exist yet. Raises NotFound."""
        ...


def instance_streams(connection: HTTPConnection) -> InstanceStreams:
    """The instance manager, from an HTTP request or a WebSocket alike."""
    instances: InstanceStreams = connection.app.state.runtime.instances
    return instances


def path_info_fields(info: PathInfo) -> dict[str, Any]:
    """The SDK's ``PathInfo``: link_target only for a symlink, error only when there is one."""
    fields: dict[str, Any] = {
        "exists": info.exists,
        "is_dir": info.is_dir,
        "is_file": info.is_file,
        "is_symlink": info.is_symlink,
        "mode": info.mode,
        "size": info.size,
    }
    if info.is_symlink:
        fields["link_target"] = info.link_target
    if info.error:
        fields["error"] = info.error
    return fields
