"""Small filesystem helpers shared by every domain.

All persistent state is written with :func:`write_atomic`: a reader sees either the old
file or the new one, never a torn write, even across a crash or power loss.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from hypemand.errors import Conflict, InsufficientStorage

# errno values that mean "the file system is full" (a quota counts as full for us).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(exc: BaseException) -> bool:
    """The one test for "the file system is full" (a quota counts as full for us)."""
    return isinstance(exc, OSError) and exc.errno in NO_SPACE


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn a full file system into :class:`InsufficientStorage` (507) naming ``what`` was being
    written, instead of a bare OSError that would answer 500."""
    try:
        yield
    except OSError as exc:
        if is_no_space(exc):
            raise InsufficientStorage(f"no space left on the data disk to write {what}") from exc
        raise


@contextlib.contextmanager
def exclusive_lock(path: Path, busy_message: str) -> Iterator[None]:
    """Hold an flock on ``path`` (created if missing), across processes; raise ``Conflict``
    with ``busy_message`` at once if someone else holds it."""
    with open(path, "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(busy_message) from None
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def fsync_dir(directory: Path) -> None:
    """Make a rename or create inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via temp file, fsync and rename. A full disk raises
    :class:`InsufficientStorage` and leaves the old file as it was."""
    with storage_errors(path.name):
        _write_atomic(path, data, mode)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fchmod(tmp.fileno(), mode)
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_model_atomic(path: Path, model: BaseModel, mode: int = 0o644) -> None:
    write_atomic(path, model.model_dump_json(indent=2).encode() + b"\n", mode)


RecordT = TypeVar("RecordT", bound=BaseModel)


def load_record_dirs(root: Path, record_name: str, model: type[RecordT]) -> list[RecordT]:
    """The records of ``root/<id>/<record_name>``; a directory without its record is the rest of
    a create that did not finish (the record is written last) and is removed. Blocking."""
    found: list[RecordT] = []
    if not root.is_dir():
        return found
    for directory in root.iterdir():
        record = directory / record_name
        if not record.exists():
            shutil.rmtree(directory, ignore_errors=True)
            continue
        found.append(model.model_validate_json(record.read_bytes()))
    return found


def read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())
