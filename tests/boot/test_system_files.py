"""Kernel and initrd preparation (no VM)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import hypemand.guest.build as guest_build
from hypemand.errors import DependencyMissing
from hypemand.layout import SystemPaths
from hypemand.system.files import SystemFiles, ensure_system_files
from hypemand.system.initrd import CpioEntry, build_initrd, write_cpio_newc
from hypemand.system.kernel import KernelError, KernelInfo, extract_vmlinux, install_kernel
from tests.support.guest import shared_system_dir


def cpio_listing(archive: Path) -> list[str]:
    result = subprocess.run(
        ["cpio", "-it", "--quiet"], stdin=archive.open("rb"), capture_output=True, text=True, check=True
    )
    return result.stdout.split()


def test_kernel_is_installed_with_its_version_recorded(system_files: SystemFiles) -> None:
    kernel_dir = system_files.kernel_path.parent
    info = KernelInfo.model_validate_json((kernel_dir / "kernel.json").read_bytes())
    assert info.version == system_files.kernel_version == kernel_dir.name
    assert info.version.endswith("-cloud-amd64")
    assert info.package == f"linux-image-{info.version}"
    assert info.package_version
    assert system_files.kernel_path.read_bytes()[:4] == b"\x7fELF"
    bzimage = system_files.kernel_bzimage_path.read_bytes()
    assert bzimage[0x202:0x206] == b"HdrS"
    # The vmlinux is exactly what the bzImage carries.
    assert extract_vmlinux(bzimage) == system_files.kernel_path.read_bytes()
    # Only the modules the initrd loads are kept, not the whole 91 MB tree.
    kept = sorted(p.name for p in (kernel_dir / "modules").rglob("*.ko"))
    assert "virtio_blk.ko" in kept and "overlay.ko" in kept and "erofs.ko" in kept
    assert len(kept) < 30
    for name in ("virtio_blk", "virtio_console", "virtio_net", "overlay", "erofs", "virtio_mmio", "evdev",
                 "virtio_balloon"):
        sequence = info.modules[name]
        assert sequence[-1].split("/")[-1].replace("-", "_") == f"{name}.ko"
    assert info.modules["button"] == ["kernel/drivers/acpi/button.ko"]  # ACPI power button
    # Dependencies come first.
    assert (
        info.modules["virtio_net"].index("kernel/net/core/failover.ko") < len(info.modules["virtio_net"]) - 1
    )


def test_second_preparation_changes_nothing(system_files: SystemFiles) -> None:
    first = ensure_system_files(shared_system_dir())
    before = first.initrd_path.stat().st_mtime_ns
    again = ensure_system_files(shared_system_dir())
    assert again == first
    assert install_kernel(SystemPaths(shared_system_dir())).vmlinux == system_files.kernel_path
    assert again.initrd_path.stat().st_mtime_ns == before


def test_extract_vmlinux_rejects_other_files() -> None:
    with pytest.raises(KernelError):
        extract_vmlinux(b"\0" * 4096)


def test_initrd_holds_init_modules_and_load_order(system_files: SystemFiles) -> None:
    names = cpio_listing(system_files.initrd_path)
    assert "init" in names
    assert "dev/console" in names
    assert "etc/hypeman/modules" in names
    ko = [n for n in names if n.endswith(".ko")]
    assert any(n.endswith("/virtio_blk.ko") for n in ko)
    assert system_files.initrd_path.parent.name == system_files.initrd_version
    with subprocess.Popen(
        ["cpio", "-i", "--quiet", "--to-stdout", "etc/hypeman/modules"],
        stdin=system_files.initrd_path.open("rb"),
        stdout=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        module_list = proc.stdout.read().decode().splitlines()
    groups = [line.split()[0] for line in module_list]
    paths = [line.split()[1] for line in module_list]
    assert {
        "virtio_mmio",
        "virtio_pci",
        "virtio_blk",
        "virtio_console",
        "virtio_net",
        "overlay",
        "erofs",
        "button",
        "evdev",
    } <= set(groups)
    assert all(p.lstrip("/") in names for p in paths)
    # Within a group, dependencies precede the module that needs them.
    blk = [p for g, p in zip(groups, paths, strict=True) if g == "virtio_blk"]
    assert [p.rsplit("/", 1)[1] for p in blk] == ["virtio_ring.ko", "virtio.ko", "virtio_blk.ko"]


def test_initrd_is_reproducible(system_files: SystemFiles, tmp_path: Path) -> None:
    kernel = install_kernel(SystemPaths(shared_system_dir()))
    first = build_initrd(SystemPaths(tmp_path / "a"), kernel, system_files.guest_binary_path)
    second = build_initrd(SystemPaths(tmp_path / "b"), kernel, system_files.guest_binary_path)
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.info.version == second.info.version == system_files.initrd_version


def test_initrd_is_rebuilt_when_init_source_changes(
    system_files: SystemFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = install_kernel(SystemPaths(shared_system_dir()))
    sources = tmp_path / "init-src"
    shutil.copytree(guest_build.SOURCE_DIR, sources)
    monkeypatch.setattr(guest_build, "SOURCE_DIR", sources)
    system_dir = tmp_path / "system"
    binary_before = guest_build.build_guest_binary(SystemPaths(system_dir))
    before = build_initrd(SystemPaths(system_dir), kernel, binary_before)

    (sources / "zz_test_change.c").write_text(
        '__attribute__((used)) const char hm_test_change[] = "initrd must notice this";\n'
    )
    binary_after = guest_build.build_guest_binary(SystemPaths(system_dir))
    after = build_initrd(SystemPaths(system_dir), kernel, binary_after)

    assert binary_after != binary_before
    assert after.info.version != before.info.version
    assert b"initrd must notice this" in after.path.read_bytes()
    assert before.path.exists(), "an initrd a sleeping VM may need must never be deleted"


def test_cpio_writer_output_is_readable_by_cpio(tmp_path: Path) -> None:
    archive = tmp_path / "t.cpio"
    archive.write_bytes(
        write_cpio_newc(
            [
                CpioEntry("b/file", 0o100644, b"hello"),
                CpioEntry("a", 0o40755),
                CpioEntry("b", 0o40755),
            ]
        )
    )
    assert cpio_listing(archive) == ["a", "b", "b/file"]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], stdin=archive.open("rb"), cwd=out, check=True)
    assert (out / "b/file").read_bytes() == b"hello"


def test_missing_tools_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "dpkg-deb" else real_which(name))
    with pytest.raises(DependencyMissing, match="install dpkg"):
        install_kernel(SystemPaths(tmp_path / "empty-system"))
