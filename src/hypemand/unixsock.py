"""Connecting to Unix sockets whose full path is longer than the kernel allows (108 bytes).

VM directories can be deep (test temp dirs, long data dirs), so a VM's sockets are created by
the VMM with *relative* names (its working directory is the VM directory). On the host we open
the directory and connect through ``/proc/self/fd/<dirfd>/<name>``: the kernel resolves that
magic link like a directory, and the string itself stays short whatever the real path length.

Both users live here, outside ``hypervisor/`` and ``guest/``: QMP (``hypervisor.qemu``) and the
guest agent client (``guest.client``), which must not depend on hypervisor internals.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path


def connect_unix(socket_path: Path) -> socket.socket:
    """Return a connected, non-blocking stream socket to ``socket_path`` (any length).

    Raises ``OSError`` like ``connect(2)``: ``FileNotFoundError``/``ConnectionRefusedError`` while
    the server is not listening, ``BlockingIOError`` if its backlog is full.
    """
    # Always through /proc, also for short paths: one code path, exercised by every connection.
    dir_fd = os.open(socket_path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        # A Unix stream connect completes at once or fails at once (it never reports "in
        # progress"), so a non-blocking connect does not need the event loop.
        sock.connect(f"/proc/self/fd/{dir_fd}/{socket_path.name}")
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dir_fd)
    return sock


async def open_unix_connection(
    socket_path: Path, *, limit: int = 2**16
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_unix_connection`` for paths of any length; ``limit`` is the reader's buffer
    limit, as there (64 KiB by default)."""
    return await asyncio.open_unix_connection(sock=connect_unix(socket_path), limit=limit)
