"""The guest kernel: Debian's ``linux-image-cloud-amd64``, unpacked once into the system dir.

Layout (``<system_dir>/kernel/<kernel-version>/``)::

    vmlinux        uncompressed ELF; QEMU boots it through PVH (no firmware, no decompression)
    vmlinuz        the original bzImage (works as -kernel on every machine type)
    config         the kernel's build config, for reference
    modules/...    only the modules the initrd loads, at their in-tree relative paths
    kernel.json    KernelInfo: version, package version, module load order

``kernel.json`` is written last, atomically: its presence means the directory is complete.
Installing a second time returns at once.
"""

from __future__ import annotations

import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import lz4.block
import zstandard
from pydantic import BaseModel

from hypemand.errors import DependencyMissing, DomainError
from hypemand.fsutil import fsync_dir, write_model_atomic
from hypemand.layout import KERNEL_INFO, KernelPaths, SystemPaths

META_PACKAGE = "linux-image-cloud-amd64"

# Modules the guest init loads, by the name modprobe knows them under. Their dependencies
# (including soft dependencies such as crc32c for erofs) are added automatically.
REQUIRED_MODULES: tuple[str, ...] = (
    "virtio_mmio",  # microvm: every device is virtio-mmio
    "virtio_pci",  # q35/pc machines
    "virtio_blk",
    "virtio_console",  # virtio-serial: the agent channel
    "virtio_net",
    "overlay",
    "erofs",
    # ACPI power button (microvm: via the GED device; q35: the fixed-feature button) and the
    # event device interface PID 1 reads KEY_POWER from: graceful shutdown.
    "button",
    "evdev",
)
OPTIONAL_MODULES: tuple[str, ...] = (
    "virtio_rng",
    "virtio_balloon",  # memory reclaim (POST /resources/memory/reclaim)
)

# Bumped when the set of kept modules or the layout changes, so an old install is redone.
LAYOUT_VERSION = 4


class KernelError(DomainError):
    code = "kernel_error"


class KernelInfo(BaseModel):
    version: str  # uname -r of the guest, e.g. 6.1.0-56-cloud-amd64
    package: str  # the concrete Debian package, e.g. linux-image-6.1.0-56-cloud-amd64
    package_version: str  # e.g. 6.1.192-2
    layout_version: int
    # For each wanted module (by name): the module files to load for it, relative to the
    # ``modules`` dir, dependencies first. Files shared by several modules appear under each.
    modules: dict[str, list[str]]


class Kernel(BaseModel):
    directory: Path
    info: KernelInfo

    @property
    def paths(self) -> KernelPaths:
        return KernelPaths(self.directory)

    @property
    def vmlinux(self) -> Path:
        return self.paths.vmlinux

    @property
    def vmlinuz(self) -> Path:
        return self.paths.vmlinuz

    @property
    def modules_dir(self) -> Path:
        return self.paths.modules


def _require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        hint = {
            "apt-get": "apt",
            "apt-cache": "apt",
            "dpkg-deb": "dpkg",
            "depmod": "kmod",
            "modprobe": "kmod",
        }
        packages = sorted({hint.get(t, t) for t in missing})
        raise DependencyMissing(
            f"preparing the guest kernel needs {', '.join(missing)}: install {' '.join(packages)}"
        )


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise KernelError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _installed_kernels(system: SystemPaths) -> list[Kernel]:
    kernels = []
    for info_path in sorted(system.kernels.glob(f"*/{KERNEL_INFO}")):
        try:
            info = KernelInfo.model_validate_json(info_path.read_bytes())
        except ValueError:
            continue
        if info.layout_version == LAYOUT_VERSION:
            kernels.append(Kernel(directory=info_path.parent, info=info))
    return kernels


def resolve_kernel_package() -> str:
    """The concrete ``linux-image-<ver>-cloud-amd64`` the meta package points at."""
    _require_tools("apt-cache")
    out = _run(["apt-cache", "depends", META_PACKAGE])
    for line in out.splitlines():
        key, _, value = line.strip().partition(":")
        value = value.strip()
        if key == "Depends" and value.startswith("linux-image-") and value.endswith("-cloud-amd64"):
            return value
    raise KernelError(f"apt-cache does not know {META_PACKAGE}; run apt-get update")


def _download(package: str, into: Path) -> Path:
    # apt drops privileges to _apt when run as root; that user cannot write into our private
    # temp dir, so keep the download as the calling user.
    cmd = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", package]
    result = subprocess.run(cmd, cwd=into, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        # A stale or missing package list is the usual cause: refresh once and retry.
        subprocess.run(["apt-get", "-q", "update"], capture_output=True, check=False)
        _run(cmd, cwd=into)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise KernelError(f"apt-get download {package} produced no .deb")
    return debs[0]


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the uncompressed ELF kernel held in a bzImage's protected-mode payload.

    The setup header says where the payload is (boot protocol >= 2.08), so no magic-number
    scanning is needed. The payload ends with the uncompressed size (4 bytes, little endian).
    """
    if bzimage[0x202:0x206] != b"HdrS":
        raise KernelError("not a bzImage (no HdrS setup header)")
    protocol = struct.unpack_from("<H", bzimage, 0x206)[0]
    if protocol < 0x208:
        raise KernelError(f"boot protocol {protocol:#x} too old to locate the payload")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    expected_size = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    elf = _decompress_payload(payload)
    if elf[:4] != b"\x7fELF" or len(elf) != expected_size:
        raise KernelError("bzImage payload did not decompress to the expected ELF image")
    return elf


def _decompress_payload(payload: bytes) -> bytes:
    magic = payload[:6]
    if magic[:4] == b"\x02\x21\x4c\x18":
        return _decompress_lz4_legacy(payload)
    if magic[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    if magic == b"\xfd7zXZ\x00":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if magic[:2] == b"\x1f\x8b":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    raise KernelError(f"unsupported bzImage compression (magic {magic.hex()})")


def _decompress_lz4_legacy(payload: bytes) -> bytes:
    """LZ4 legacy frame: magic, then blocks of <u32 compressed size><data>, each <= 8 MiB out."""
    legacy_magic = 0x184C2102
    block_max = 8 << 20
    pos = 4
    chunks = []
    while pos + 4 <= len(payload):
        size = struct.unpack_from("<I", payload, pos)[0]
        if size == legacy_magic:  # concatenated streams repeat the magic
            pos += 4
            continue
        if pos + 4 + size > len(payload):
            break  # the trailing uncompressed-size word
        chunks.append(lz4.block.decompress(payload[pos + 4 : pos + 4 + size], uncompressed_size=block_max))
        pos += 4 + size
    return b"".join(chunks)


def _module_load_order(tree: Path, version: str) -> dict[str, list[str]]:
    """For each wanted module: module paths (below lib/modules/<version>), dependencies first."""
    modules_root = tree / "lib/modules" / version
    _run(["depmod", "-b", str(tree), version])
    # An empty config dir keeps the host's /etc/modprobe.d (blacklists, options) out of it.
    empty_config = tree / "empty-modprobe.d"
    empty_config.mkdir(exist_ok=True)
    order: dict[str, list[str]] = {}
    for name in (*REQUIRED_MODULES, *OPTIONAL_MODULES):
        result = subprocess.run(
            ["modprobe", "-C", str(empty_config), "-d", str(tree), "-S", version, "--show-depends", name],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            if name in OPTIONAL_MODULES:
                continue
            raise KernelError(f"kernel {version} has no module {name}: {result.stderr.strip()}")
        sequence = order.setdefault(name, [])
        for line in result.stdout.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "insmod":
                relative = str(Path(words[1]).relative_to(modules_root))
                if relative not in sequence:
                    sequence.append(relative)
            # "builtin X" lines need nothing
    return order


def _store_module(source: Path, target: Path) -> str:
    """Copy one module, decompressing .ko.xz/.ko.zst/.ko.gz so init can finit_module it as is."""
    data = source.read_bytes()
    name = source.name
    if name.endswith(".ko.xz"):
        data, name = lzma.decompress(data), name[:-3]
    elif name.endswith(".ko.zst"):
        data, name = zstandard.ZstdDecompressor().decompressobj().decompress(data), name[:-4]
    elif name.endswith(".ko.gz"):
        data, name = zlib.decompress(data, 16 + zlib.MAX_WBITS), name[:-3]
    target = target.with_name(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return name


def install_kernel(system: SystemPaths) -> Kernel:
    """Return the installed guest kernel, downloading and unpacking it on first use."""
    installed = _installed_kernels(system)
    if installed:
        # Newest version first; a later apt upgrade does not replace a working kernel by
        # itself (snapshots need the kernel they were taken on), see upgrade_kernel().
        return max(installed, key=lambda k: _version_key(k.info.version))
    return upgrade_kernel(system)


def upgrade_kernel(system: SystemPaths) -> Kernel:
    """Install the kernel the meta package currently points at (kept beside older ones)."""
    _require_tools("apt-get", "apt-cache", "dpkg-deb", "depmod", "modprobe")
    package = resolve_kernel_package()
    for kernel in _installed_kernels(system):
        if kernel.info.package == package:
            return kernel
    kernels_root = system.kernels
    kernels_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kernels_root, prefix=".unpack-") as tmp_name:
        tmp = Path(tmp_name)
        deb = _download(package, tmp)
        package_version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
        tree = tmp / "tree"
        _run(["dpkg-deb", "-x", str(deb), str(tree)])
        versions = sorted(p.name for p in (tree / "lib/modules").iterdir())
        if len(versions) != 1:
            raise KernelError(f"{deb.name} holds {len(versions)} module trees, expected one")
        version = versions[0]
        # Built beside its final place, then renamed into it: a kernel directory is never partial.
        staging = KernelPaths(tmp / "staged")
        staging.modules.mkdir(parents=True)
        bzimage = (tree / "boot" / f"vmlinuz-{version}").read_bytes()
        staging.vmlinuz.write_bytes(bzimage)
        staging.vmlinux.write_bytes(extract_vmlinux(bzimage))
        shutil.copyfile(tree / "boot" / f"config-{version}", staging.config)
        modules_root = tree / "lib/modules" / version
        modules: dict[str, list[str]] = {}
        for name, sequence in _module_load_order(tree, version).items():
            stored_sequence = modules.setdefault(name, [])
            for relative in sequence:
                stored = _store_module(modules_root / relative, staging.modules / relative)
                stored_sequence.append(str(Path(relative).with_name(stored)))
        info = KernelInfo(
            version=version,
            package=package,
            package_version=package_version,
            layout_version=LAYOUT_VERSION,
            modules=modules,
        )
        target = system.kernel(version)
        if target.directory.exists():  # an incomplete earlier attempt (no kernel.json)
            shutil.rmtree(target.directory)
        _fsync_tree(staging.directory)
        staging.directory.rename(target.directory)
        fsync_dir(kernels_root)
        write_model_atomic(target.info, info)
    return Kernel(directory=target.directory, info=info)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _version_key(version: str) -> tuple[int | str, ...]:
    parts: list[int | str] = []
    for piece in version.replace("-", ".").split("."):
        parts.append(int(piece) if piece.isdigit() else -1)
    return tuple(parts)


# Kernel arguments that shorten boot under TCG without changing what the guest can do
# (measured with bench/boot_path.py; see README): skip the crypto self-tests (about 0.35 s of
# emulated CPU), trust the TSC instead of watching it against other clocks (microvm has no HPET
# or PM timer to watch it with), and register one UART instead of four.
FAST_BOOT_ARGS = "cryptomgr.notests tsc=reliable 8250.nr_uarts=1"

# The guest kernel's page-init mode: the reference's "performance" mode, its default. With the
# Debian default (init_on_alloc=1) the guest zeroes every page it allocates, the balloon's
# included, right before handing it to the host: the host's page-cache folio of the RAM file is
# then dirty when QEMU punches the page out of it, and the kernel (6.18, ext4 large folios) keeps
# a dirty folio whole: the memory is not returned (measured: 0 of 512 MiB ballooned; with this
# and the RAM file flushed before the reclaim, 498 of 512). Pages the guest gives its programs are
# still zeroed (__GFP_ZERO); only kernel allocations lose the hardening.
GUEST_MEMORY_ARGS = "init_on_alloc=0 init_on_free=0"
