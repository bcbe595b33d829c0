"""A tiny test guest for the hypervisor tests: Debian's cloud kernel plus a busybox initramfs.

The hypervisor layer must be testable before (and independently of) the real guest init that
``hypemand.system`` builds, so these tests bring their own guest. It is cached across runs in
``/var/tmp/hypemand-test-kernel`` (override: ``HYPEMAND_TEST_KERNEL_CACHE``).

What the guest does (``/init``, a busybox shell script):
- loads the virtio modules for both boards plus ``button``/``evdev`` (ACPI power button);
- lists its virtio disks by serial (``HM-TEST-DISK vda hm-root``);
- answers every line on the ``org.hypeman.agent`` virtio-serial port with ``echo:<line>``;
- prints ``HM-TEST-READY`` on the serial console once all of the above is in place;
- gives ``eth0`` the slirp address 10.0.2.15 and serves ``/www`` with busybox httpd on port 80;
- powers off (``poweroff -f``) when the ACPI power button is pressed (QMP ``system_powerdown``),
  so a graceful shutdown is observable;
- prints ``HM-TEST-TICK n`` every 0.5 s so a paused guest can be told from a running one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
READY_LINE = "HM-TEST-READY"
TICK_PREFIX = "HM-TEST-TICK"
POWEROFF_LINE = "HM-TEST-POWEROFF"
HTTP_BODY = "hello-from-hm-test-guest"
DISK_PREFIX = "HM-TEST-DISK"
AGENT_PORT_NAME = "org.hypeman.agent"

# Modules in the order insmod needs them; dependencies are resolved with modprobe on the host.
GUEST_MODULES = ("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_console", "virtio_net", "button", "evdev")

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r module; do insmod "/lib/modules/$module" 2>/dev/null; done < /modules.order
ip link set lo up
if ip link set eth0 up 2>/dev/null; then
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
  mkdir -p /www && echo {HTTP_BODY} > /www/index.html
  httpd -p 80 -h /www
fi
for ev in /sys/class/input/event*; do
  if grep -q "Power Button" "$ev/device/name" 2>/dev/null; then
    # Open the device before announcing readiness: key events reach only open readers.
    exec 3<"/dev/input/${{ev##*/}}"
    (head -c 1 <&3 >/dev/null; echo {POWEROFF_LINE}; sync; poweroff -f) &
  fi
done
for block in /sys/block/vd*; do
  [ -e "$block/serial" ] && echo "{DISK_PREFIX} ${{block##*/}} $(cat "$block/serial")"
done
for port in /sys/class/virtio-ports/*; do
  if [ "$(cat "$port/name" 2>/dev/null)" = {AGENT_PORT_NAME} ]; then
    exec 4<>"/dev/${{port##*/}}"
    # read sees EOF while no host client is connected: poll until one is.
    (while true; do
      while read -r line <&4; do echo "echo:$line" >&4; done
      sleep 0.2
    done) &
  fi
done
echo "{READY_LINE} uptime=$(cut -d' ' -f1 /proc/uptime)"
i=0
while true; do echo "{TICK_PREFIX} $i"; i=$((i + 1)); sleep 0.5; done
"""

# Bump when INIT_SCRIPT or the module list changes, so cached images are rebuilt.
GUEST_IMAGE_VERSION = 5


@dataclass(frozen=True)
class GuestImage:
    kernel: Path  # uncompressed vmlinux (PVH direct boot)
    initrd: Path


def cache_dir() -> Path:
    return Path(os.environ.get("HYPEMAND_TEST_KERNEL_CACHE", "/var/tmp/hypemand-test-kernel"))


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def _concrete_kernel_package() -> str:
    for line in _run(["apt-cache", "depends", KERNEL_META_PACKAGE]).splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Depends" and value.strip().startswith("linux-image-"):
            return value.strip()
    raise RuntimeError(f"apt-cache does not name the package behind {KERNEL_META_PACKAGE}")


def _extract_vmlinux(bzimage: Path, destination: Path) -> None:
    """The cloud bzImage carries an LZ4 (legacy frame) payload: find it and decompress it."""
    data = bzimage.read_bytes()
    start = data.find(b"\x02\x21\x4c\x18")
    while start != -1:
        result = subprocess.run(["lz4", "-dc"], input=data[start:], capture_output=True, check=False)
        if result.stdout[:4] == b"\x7fELF":
            destination.write_bytes(result.stdout)
            return
        start = data.find(b"\x02\x21\x4c\x18", start + 1)
    raise RuntimeError(f"no LZ4 ELF payload in {bzimage}")


def _build(root: Path) -> GuestImage:
    package = _concrete_kernel_package()
    kernel_version = package.removeprefix("linux-image-")
    work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    try:
        _run(["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", package], cwd=work)
        deb = next(work.glob(f"{package}_*.deb"))
        tree = work / "tree"
        _run(["dpkg-deb", "-x", str(deb), str(tree)])
        _run(["depmod", "-b", str(tree), kernel_version])

        initramfs = work / "initramfs"
        for sub in ("bin", "proc", "sys", "dev", "tmp", "lib/modules"):
            (initramfs / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy2("/bin/busybox", initramfs / "bin/busybox")
        modules_root = tree / "lib/modules" / kernel_version
        order: list[str] = []
        for module in GUEST_MODULES:
            out = _run(["modprobe", "-d", str(tree), "-S", kernel_version, "--show-depends", module])
            for line in out.splitlines():
                if not line.startswith("insmod "):
                    continue  # builtin
                relative = str(Path(line.split()[1]).resolve().relative_to(modules_root.resolve()))
                if relative not in order:
                    order.append(relative)
                    target = initramfs / "lib/modules" / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(modules_root / relative, target)
        (initramfs / "modules.order").write_text("\n".join(order) + "\n")
        init = initramfs / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)

        out_dir = root / f"{kernel_version}-v{GUEST_IMAGE_VERSION}"
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=root))
        _extract_vmlinux(next((tree / "boot").glob("vmlinuz-*")), staging / "vmlinux")
        files = subprocess.run(["find", "."], cwd=initramfs, check=True, capture_output=True).stdout
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=initramfs,
            input=files,
            check=True,
            capture_output=True,
        ).stdout
        gz = subprocess.run(["gzip", "-1"], input=cpio, check=True, capture_output=True).stdout
        (staging / "initramfs.cpio.gz").write_bytes(gz)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.chmod(0o755)
        staging.rename(out_dir)
        return GuestImage(kernel=out_dir / "vmlinux", initrd=out_dir / "initramfs.cpio.gz")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_test_guest() -> GuestImage:
    """Build the test guest once per machine; concurrent test runs wait on a lock file."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for candidate in sorted(root.glob(f"*-v{GUEST_IMAGE_VERSION}")):
            guest = GuestImage(kernel=candidate / "vmlinux", initrd=candidate / "initramfs.cpio.gz")
            if guest.kernel.is_file() and guest.initrd.is_file():
                return guest
        guest = _build(root)
        for old in root.glob("*-v*"):  # images of earlier GUEST_IMAGE_VERSIONs
            if old.is_dir() and not old.name.endswith(f"-v{GUEST_IMAGE_VERSION}"):
                shutil.rmtree(old, ignore_errors=True)
        return guest
