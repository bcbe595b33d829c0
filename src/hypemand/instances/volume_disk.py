"""A volume's ext4 disk as a boot finds it (blocking: called from a worker thread).

A guest that wrote to a volume and was killed (a delete, a crash) leaves its ext4 journal to be
replayed. A guest that mounts the volume read-only cannot replay it (its disk is read-only), so
the mount would fail: the host replays it first, with ``e2fsck -E journal_only``. This is safe
only because nothing has the volume mounted while its journal needs replaying: no read-write
attachment exists next to a read-only one (the sharing rule), and a read-only guest could not
have mounted it. Concurrent boots of the same volume take turns on an ``flock`` of the disk.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

from hypemand.errors import Conflict, DependencyMissing

EXT4_MAGIC = 0xEF53
INCOMPAT_RECOVER = 0x4  # s_feature_incompat: the journal must be replayed


def needs_replay(path: Path) -> bool:
    with path.open("rb") as disk:
        disk.seek(1024)
        superblock = disk.read(1024)
    if len(superblock) < 0x64 or int.from_bytes(superblock[56:58], "little") != EXT4_MAGIC:
        return False
    return bool(int.from_bytes(superblock[0x60:0x64], "little") & INCOMPAT_RECOVER)


def replay_journal(path: Path) -> None:
    """Replay the ext4 journal of ``path`` if it needs it (409 if it cannot be)."""
    if not needs_replay(path):
        return
    e2fsck = shutil.which("e2fsck") or shutil.which("fsck.ext4")
    if e2fsck is None:
        raise DependencyMissing("replaying a volume's journal needs e2fsck: install e2fsprogs")
    with path.open("rb") as disk:
        fcntl.flock(disk, fcntl.LOCK_EX)
        try:
            if not needs_replay(path):
                return  # another boot replayed it while this one waited
            result = subprocess.run(
                [e2fsck, "-E", "journal_only", "-y", str(path)], capture_output=True, text=True, check=False
            )
            # 0: nothing to fix, 1: fixed (the journal replayed).
            if result.returncode not in (0, 1):
                detail = (result.stderr or result.stdout).strip().splitlines()
                raise Conflict(
                    f"the volume disk {path.parent.name} needs its journal replayed and e2fsck failed "
                    f"(exit {result.returncode}): {detail[-1] if detail else 'no output'}",
                    code="volume_unusable",
                )
        finally:
            fcntl.flock(disk, fcntl.LOCK_UN)
