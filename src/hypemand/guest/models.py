"""Results of guest-agent operations, as the rest of the daemon sees them."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel


class PathInfo(BaseModel):
    """A path in the guest, as `GET /instances/{id}/stat` reports it (plus mtime and owner)."""

    exists: bool
    is_dir: bool = False
    is_file: bool = False
    is_symlink: bool = False
    link_target: str = ""
    mode: int = 0
    size: int = 0
    mtime_ns: int = 0
    uid: int = 0
    gid: int = 0
    error: str = ""


class EntryType(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    OTHER = "other"


class FileEntry(BaseModel):
    """Header of one entry streamed by `AgentClient.get`. `path` is relative: it starts with the
    base name of the requested path ("." for "/"), children follow as "<base>/<name>/..."."""

    path: str
    type: EntryType
    mode: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    link_target: str = ""

    @property
    def is_dir(self) -> bool:
        return self.type is EntryType.DIR

    @property
    def is_symlink(self) -> bool:
        return self.type is EntryType.SYMLINK


class ExecResult(BaseModel):
    """How a guest process ended. `exit_code` is 128+signal when a signal killed it (shell style)."""

    exit_code: int
    signal: int | None = None
    timed_out: bool = False


class CompletedExec(BaseModel):
    stdout: bytes
    stderr: bytes
    exit_code: int
    signal: int | None = None
    timed_out: bool = False


class OutputChunk(BaseModel):
    stream: Literal["stdout", "stderr"]
    data: bytes
