"""Run blocking network work inside a named network namespace, from asyncio.

A Linux thread can join a network namespace on its own (setns with CLONE_NEWNET changes only
the calling thread). :class:`NamespaceWorker` keeps one such thread: everything it runs sees
that namespace, which is how the rest of this package reaches it without a helper process:

* netlink sockets (pyroute2's ``IPRoute()``) opened there talk to that namespace;
* ``/dev/net/tun`` opened there finds and creates TAPs of that namespace;
* ``/proc/sys/net/...`` opened there shows that namespace's settings;
* a child process started there (``nft``) is born in that namespace.

The thread never leaves: a thread that fails to join ends the worker, and no thread of the
worker ever runs in another namespace, so nothing meant for the namespace can land in the
host's. One thread also serialises every change to the namespace's devices and rules.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.thread import BrokenThreadPool
from pathlib import Path
from typing import ParamSpec, TypeVar

from pyroute2 import netns as pyroute2_netns

NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

T = TypeVar("T")
P = ParamSpec("P")

_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceError(RuntimeError):
    """A network namespace could not be created or joined."""


def namespace_path(name: str) -> Path:
    return NETNS_RUN_DIR / name


def namespace_exists(name: str) -> bool:
    return namespace_path(name).exists()


def ensure_namespace(name: str) -> bool:
    """Create the named namespace (as ``ip netns add`` does) if it is missing, with its
    loopback up. Blocking. True when it was created now."""
    if namespace_exists(name):
        return False
    try:
        pyroute2_netns.create(name)
    except OSError as err:
        if namespace_exists(name):  # another process made it meanwhile
            return False
        raise NamespaceError(f"cannot create network namespace {name}: {err}") from err
    run_in_namespace(name, _loopback_up)
    return True


def _loopback_up() -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def join_namespace(name: str) -> None:
    """Move the calling thread into the named namespace, for good; checks it arrived."""
    path = namespace_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceError(f"network namespace {name} does not exist ({path})") from None
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise NamespaceError(f"cannot join network namespace {name}: {os.strerror(errno)}")
    finally:
        os.close(fd)
    if not in_namespace(name):
        raise NamespaceError(f"joined network namespace {name} but the thread is elsewhere")


def in_namespace(name: str) -> bool:
    """Whether the calling thread is in the named namespace."""
    mine = os.stat("/proc/thread-self/ns/net")
    target = os.stat(namespace_path(name))
    return (mine.st_dev, mine.st_ino) == (target.st_dev, target.st_ino)


def run_in_namespace(name: str | None, function: Callable[[], T]) -> T:
    """Run ``function`` once in a fresh thread that joined the namespace (or here, for None).
    Blocking; for one-off work outside a :class:`NamespaceWorker`."""
    if name is None:
        return function()
    with ThreadPoolExecutor(1, initializer=join_namespace, initargs=(name,)) as pool:
        return pool.submit(function).result()


class NamespaceWorker:
    """One thread that lives in a network namespace (or in the server's own, for None) and
    runs blocking calls there, one at a time, in submission order."""

    def __init__(self, namespace: str | None, label: str = "net") -> None:
        self.namespace = namespace
        initializer = (lambda: join_namespace(namespace)) if namespace else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"hypemand-{label}",
                                        initializer=initializer)

    async def run(self, function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``function(*args, **kwargs)`` run in the namespace thread."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(function, *args, **kwargs))
        except BrokenThreadPool:
            raise NamespaceError(f"the thread for network namespace {self.namespace} could not "
                                 "join it (does it still exist?)") from None

    def call(self, function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """The same, blocking the caller (never call it from the event loop)."""
        return self._pool.submit(function, *args, **kwargs).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
