"""Build time and size of the two image disk formats (ext4 via mke2fs -d, erofs lz4hc).

Usage: .venv/bin/python bench/image_disk_formats.py [ROOTFS_DIR ...]
Without arguments it measures a busybox-static root and a copy of /usr/lib/python3.11.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from hypemand.images.disk import DiskFormat, build_disk


def busybox_root(where: Path) -> Path:
    root = where / "busybox-root"
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "ls", "cat", "echo", "mount", "sleep"):
        (root / "bin" / applet).symlink_to("busybox")
    return root


def python_root(where: Path) -> Path:
    root = where / "python-root"
    shutil.copytree("/usr/lib/python3.11", root / "usr/lib/python3.11", symlinks=True)
    return root


def measure(root: Path, out_dir: Path) -> None:
    files = sum(1 for _ in root.rglob("*"))
    for fmt in DiskFormat:
        out = out_dir / f"{root.name}.{fmt.value}"
        start = time.perf_counter()
        size = build_disk(root, out, fmt)
        elapsed = time.perf_counter() - start
        allocated = out.stat().st_blocks * 512
        print(f"{root.name:16} {files:6} entries  {fmt.value:5}  {elapsed:6.3f}s  "
              f"apparent {size / 1e6:7.1f} MB  allocated {allocated / 1e6:7.1f} MB")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        roots = [Path(a) for a in sys.argv[1:]] or [busybox_root(where), python_root(where)]
        for root in roots:
            measure(root, where)


if __name__ == "__main__":
    main()
