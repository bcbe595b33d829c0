"""``python -m hypemand.system [SYSTEM_DIR]``: prepare kernel, guest binary and initrd.

Without an argument it uses the server's default system dir (``HYPEMAND_SYSTEM_DIR`` or
``<data_dir>/system``). Prints what is in place and how long it took.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hypemand.config import Settings
from hypemand.errors import DomainError
from hypemand.system.files import ensure_system_files


def main(argv: list[str]) -> int:
    system_dir = Path(argv[0]).absolute() if argv else Settings.load().system_dir
    started = time.monotonic()
    try:
        files = ensure_system_files(system_dir)
    except DomainError as error:
        print(f"hypemand system files: {error}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    print(f"system dir    {system_dir}")
    print(f"kernel        {files.kernel_version} (package {files.kernel_package_version})")
    print(f"  vmlinux     {files.kernel_path}")
    print(f"  bzImage     {files.kernel_bzimage_path}")
    print(f"guest binary  {files.guest_binary_path}")
    print(f"initrd        {files.initrd_path} ({files.initrd_path.stat().st_size} bytes)")
    print(f"ready in {elapsed:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
