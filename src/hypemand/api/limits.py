"""Every limit the API enforces at its edge, in one place, with the reason for each.

A limit here exists so that no client can make the server hold an unbounded amount of memory,
write an unbounded amount of log, or send the guest agent a request its protocol cannot carry
(``hypemand.guest.protocol``: one frame's payload is at most 64 KiB, counts are u16, times are
u32 milliseconds, owners are i32). Each is chosen well above what a real client sends.

The instance limits a create or an update is checked against (environment size and count,
argument size) are the domain's: ``hypemand.instances.models``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

from hypemand.guest import protocol
from hypemand.images.media_types import MAX_MANIFEST_BYTES

KiB = 1 << 10
MiB = 1 << 20

# ---- request bodies (body_limit.py) ---------------------------------------------------------------

# The JSON API. The largest request it can accept is an instance create at the environment and
# argument limits (1.5 MiB + 256 KiB of text, about 1.8 MiB as JSON); a client that escapes every
# non-ASCII character (\uXXXX: up to 6 bytes for one) may need a few times that. 8 MiB holds
# any valid request and still bounds what one request can make the server parse.
MAX_JSON_BODY_BYTES = 8 * MiB

# A registry manifest is read whole (it is parsed and hashed); 4 MiB is what common registries
# accept. Blob uploads have no limit: they are streamed to disk (layers of hundreds of MB are
# normal) and never held in memory (images/uploads.py writes them in bounded pieces).
MAX_MANIFEST_BODY_BYTES = MAX_MANIFEST_BYTES

# Every other request under /v2 carries no body the server reads (mounts and version checks);
# a body sent anyway is refused above this.
MAX_REGISTRY_OTHER_BODY_BYTES = 64 * KiB

# POST /builds is a multipart form (api/builds.py): the source tarball, bounded by the server's
# HYPEMAND_MAX_BUILD_SOURCE_BYTES (config.py), and text fields. A field is at most 1 MiB (the
# largest, a Dockerfile, is a few KiB in practice); there are 12, each once, and python-multipart
# bounds each part's headers (8 of at most 4 KiB). The whole body is at most the source's limit
# plus this.
MAX_BUILD_FORM_FIELD_BYTES = 1 * MiB
MAX_BUILD_FORM_BYTES = 16 * MiB

# ---- WebSockets (exec, cp) ----------------------------------------------------------------------

# One WebSocket message is held whole before the handler sees it: the server's ``ws_max_size``.
# The largest a real client sends is the first (JSON) frame of an exec, which must fit one agent
# frame anyway, and 32 KiB stdin or file chunks; the SDKs accept at most 1 MiB the other way.
MAX_WEBSOCKET_MESSAGE_BYTES = 1 * MiB

# ---- guest agent requests (exec, cp, stat): the guest protocol's own limits -----------------------

MAX_AGENT_PAYLOAD_BYTES = protocol.MAX_PAYLOAD
# EXEC carries argc and envc as u16.
MAX_EXEC_ARGS = 0xFFFF
MAX_EXEC_ENV = 0xFFFF
# EXEC carries its timeout as u32 milliseconds (about 49.7 days); 0 means none.
MAX_EXEC_TIMEOUT_SECONDS = 0xFFFF_FFFF // 1000
# How long an exec may ask the server to wait for the agent: as long as an exec may run.
MAX_WAIT_FOR_AGENT_SECONDS = MAX_EXEC_TIMEOUT_SECONDS
# PUT and MKDIR carry the owner as i32, -1 meaning "leave it".
MAX_GUEST_ID = 2**31 - 1
# A path the guest kernel takes (PATH_MAX is 4096 with its NUL; longer ones fail ENAMETOOLONG).
MAX_GUEST_PATH_BYTES = 4095
# EXEC's fixed fields before its strings: flags, rows, cols, timeout, argc, envc.
_EXEC_FIXED = struct.Struct(">BHHIHH")

# ---- logs ---------------------------------------------------------------------------------------

# A client-supplied value in a log line is cut to this many characters, with its size named.
LOG_VALUE_CHARS = 200


def agent_string_bytes(value: str) -> int:
    """What one string costs in an agent frame: its bytes (as the guest client encodes them)
    and the NUL that ends it. Raises ValueError for a NUL inside."""
    if "\0" in value:
        raise ValueError("must not contain NUL bytes")
    return len(value.encode("utf-8", "surrogateescape")) + 1


def check_guest_path(value: str) -> str:
    """A path sent to the guest: not empty, no NUL, at most the guest's PATH_MAX."""
    if not value:
        raise ValueError("must not be empty")
    if agent_string_bytes(value) - 1 > MAX_GUEST_PATH_BYTES:
        raise ValueError(f"longer than the {MAX_GUEST_PATH_BYTES} bytes a guest path may have")
    return value


def check_exec_env(env: Mapping[str, str]) -> None:
    """An exec's extra environment: names the guest can set (not empty, no ``=``, no NUL)."""
    if len(env) > MAX_EXEC_ENV:
        raise ValueError(f"at most {MAX_EXEC_ENV} variables")
    for key, value in env.items():
        if not key or "=" in key or "\0" in key:
            raise ValueError(f"invalid variable name {summary(key)}: not empty, without '=' or NUL")
        if "\0" in value:
            raise ValueError(f"variable {summary(key)} contains a NUL byte")


def exec_request_bytes(command: Iterable[str], env: Mapping[str, str], cwd: str) -> int:
    """The payload of the agent's EXEC frame for this request (see ``protocol.exec_request``)."""
    size = _EXEC_FIXED.size + agent_string_bytes(cwd)
    size += sum(agent_string_bytes(arg) for arg in command)
    size += sum(agent_string_bytes(f"{key}={value}") for key, value in env.items())
    return size


def summary(value: object, limit: int = LOG_VALUE_CHARS) -> str:
    """A client-supplied value for a log line or a message: at most about ``limit`` characters,
    saying how big the whole was when it was cut. Never renders more than it shows."""
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    if isinstance(value, list | tuple):
        shown: list[str] = []
        used = 0
        for item in value:
            if used > limit:
                break
            text = summary(item, limit)
            shown.append(text)
            used += len(text) + 2
        if len(shown) == len(value):
            return f"[{', '.join(shown)}]"
        return f"[{', '.join(shown)}, ...] ({len(value)} items)"
    return summary(str(value), limit)
