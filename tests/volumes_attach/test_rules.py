"""The pure rules of attaching volumes, the guest's config records, the disks a boot gets, the
saved VM's payload with volume overlays, and the CLI's ``-v`` syntax."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from hypeman_cli.errors import CLIError
from hypeman_cli.instances import volume_mount
from hypemand.errors import BadRequest, Conflict
from hypemand.guest.config_disk import GuestConfig, GuestVolume, RecordType, VolumeMode, encode_config
from hypemand.hypervisor.base import Board
from hypemand.instances.models import VolumeMountRecord
from hypemand.instances.volumes import (
    MountWish,
    check_sharing,
    max_volume_devices,
    normalize_mount_path,
    plan_mount,
    require_readonly,
    volume_disks,
)
from hypemand.layout import InstancePaths
from hypemand.savedvm.files import SavedVMFiles
from hypemand.volumes.models import VolumeAttachment


class Vol:
    id = "vol1"
    name = "data"


def wish(
    path: str = "/data", readonly: bool = False, overlay: bool = False, size: str | None = None
) -> MountWish:
    return MountWish("data", path, readonly, overlay, size)


@pytest.mark.parametrize("path", ["data", "", "/", "//", "/etc", "/etc/x", "/proc", "/sys/fs", "/dev/x",
                                  "/usr/local", "/var/lib/db", "/tmp/x", "/run", "/a/../etc", "/x\n"])
def test_bad_mount_paths_are_400(path: str) -> None:
    with pytest.raises(BadRequest):
        normalize_mount_path(path)


@pytest.mark.parametrize(("path", "normal"), [("/data", "/data"), ("/data/", "/data"),
                                              ("//srv//db/.", "/srv/db"),
                                              ("/mnt/a/../b", "/mnt/b"), ("/etcetera", "/etcetera"),
                                              ("/home/user", "/home/user"), ("/opt/x:y", "/opt/x:y")])
def test_mount_paths_are_normalized(path: str, normal: str) -> None:
    assert normalize_mount_path(path) == normal


def test_plan_mount_rules() -> None:
    mount = plan_mount(wish("/data/"), "vol1", [], Board.QEMU_MICROVM)
    assert (mount.mount_path, mount.readonly, mount.overlay) == ("/data", False, False)
    assert mount.overlay_bytes == 0
    overlay = plan_mount(wish(readonly=True, overlay=True, size="100MB"), "vol1", [], Board.QEMU)
    assert overlay.overlay_bytes == 100 << 20
    with pytest.raises(BadRequest, match="readonly"):
        plan_mount(wish(overlay=True, size="1GB"), "vol1", [], Board.QEMU)
    with pytest.raises(BadRequest, match="overlay_size"):
        plan_mount(wish(readonly=True, overlay=True), "vol1", [], Board.QEMU)
    with pytest.raises(BadRequest, match="overlay_size"):
        plan_mount(wish(readonly=True, size="1GB"), "vol1", [], Board.QEMU)
    with pytest.raises(BadRequest, match="used twice"):
        plan_mount(wish("/data"), "vol2", [mount], Board.QEMU)
    with pytest.raises(Conflict, match="already attached"):
        plan_mount(wish("/other"), "vol1", [mount], Board.QEMU)


def test_device_limits_count_overlays_twice() -> None:
    assert max_volume_devices(Board.QEMU_MICROVM) == 18  # 24 virtio-mmio transports - 6
    assert max_volume_devices(Board.QEMU) == 23  # the reference's limit (q35 has 24 free)
    plain = [VolumeMountRecord(volume_id=f"v{i}", mount_path=f"/d{i}", readonly=True) for i in range(16)]
    plan_mount(wish("/x", readonly=True), "vx", plain, Board.QEMU_MICROVM)  # 17 devices
    with pytest.raises(BadRequest, match="at most 18"):
        plan_mount(wish("/x", readonly=True, overlay=True, size="64MB"), "vx", [*plain, plain[0].model_copy(
            update={"volume_id": "vy", "mount_path": "/y"})], Board.QEMU_MICROVM)


def test_sharing_any_readers_or_one_writer() -> None:
    reader = VolumeAttachment(instance_id="a", mount_path="/d", readonly=True)
    writer = VolumeAttachment(instance_id="b", mount_path="/d", readonly=False)
    check_sharing(Vol(), True, [reader, reader])
    check_sharing(Vol(), False, [])
    with pytest.raises(Conflict, match="only one"):
        check_sharing(Vol(), False, [reader])
    with pytest.raises(Conflict, match="read-write to instance b"):
        check_sharing(Vol(), True, [writer])


def test_snapshots_need_read_only_attachments() -> None:
    ro = VolumeMountRecord(volume_id="v", mount_path="/d", readonly=True)
    require_readonly("vm", [ro], "a snapshot")
    with pytest.raises(Conflict) as info:
        require_readonly("vm", [ro, ro.model_copy(update={"readonly": False})], "a snapshot")
    assert info.value.code == "volume_not_readonly"


def test_disks_and_guest_records_in_order(tmp_path: Path) -> None:
    mounts = [
        VolumeMountRecord(volume_id="a", mount_path="/a", readonly=False),
        VolumeMountRecord(
            volume_id="b", mount_path="/b", readonly=True, overlay=True, overlay_bytes=64 << 20
        ),
        VolumeMountRecord(volume_id="c", mount_path="/c:d", readonly=True),
    ]
    paths = InstancePaths(tmp_path / "vm")
    disks = volume_disks(mounts, paths, lambda vid: tmp_path / "volumes" / vid / "data.raw")
    assert [(d.serial, d.readonly, d.path.name) for d in disks.disks] == [
        ("hm-vol0", False, "data.raw"), ("hm-vol1", True, "data.raw"), ("hm-vup1", False, "b.raw"),
        ("hm-vol2", True, "data.raw"),
    ]
    assert disks.uppers == ((paths.volume_overlay("b"), 64 << 20),)
    assert [v.encoded() for v in disks.guest] == [
        "rw:hm-vol0::/a", "overlay:hm-vol1:hm-vup1:/b", "ro:hm-vol2::/c:d"
    ]
    image = encode_config(GuestConfig(cmd=["/bin/true"], volumes=list(disks.guest)))
    payload = image[32:32 + struct.unpack_from("<I", image, 12)[0]]
    found, pos = [], 0
    while pos < len(payload):
        kind, _, length = struct.unpack_from("<HHI", payload, pos)
        if kind == RecordType.VOLUME:
            found.append(payload[pos + 8:pos + 8 + length].decode())
        pos += 8 + length
    assert found == [v.encoded() for v in disks.guest]
    with pytest.raises(ValueError):
        GuestVolume(mode=VolumeMode.RO, serial="hm-vol0", path="relative")


def test_saved_vm_payload_carries_volume_overlays(tmp_path: Path) -> None:
    source = SavedVMFiles(InstancePaths(tmp_path / "src").saved)
    (tmp_path / "src" / "vol-overlays").mkdir(parents=True)
    (tmp_path / "src" / "overlay.raw").write_bytes(b"root")
    (tmp_path / "src" / "vol-overlays" / "v1.raw").write_bytes(b"upper")
    assert source.disk_files()[-1] == "vol-overlays/v1.raw"
    snapshot = SavedVMFiles(InstancePaths(tmp_path / "snap").saved)
    source.copy_to(snapshot, with_memory=False, with_state=False)
    assert (tmp_path / "snap" / "vol-overlays" / "v1.raw").read_bytes() == b"upper"
    assert "vol-overlays/v1.raw" in snapshot.digests()
    fork = SavedVMFiles(InstancePaths(tmp_path / "fork").saved)
    fork.fork_from(snapshot, with_memory=False)
    copied = tmp_path / "fork" / "vol-overlays" / "v1.raw"
    assert copied.read_bytes() == b"upper"
    assert copied.stat().st_ino != (tmp_path / "snap" / "vol-overlays" / "v1.raw").stat().st_ino
    target = SavedVMFiles(InstancePaths(tmp_path / "other").saved)
    (tmp_path / "other" / "vol-overlays").mkdir(parents=True)
    (tmp_path / "other" / "vol-overlays" / "stale.raw").write_bytes(b"old")
    target.replace_with(snapshot, with_memory=False)
    assert sorted(p.name for p in (tmp_path / "other" / "vol-overlays").iterdir()) == ["v1.raw"]


def test_cli_volume_flag() -> None:
    assert volume_mount("db:/data") == {"volume_id": "db", "mount_path": "/data"}
    assert volume_mount("db:/data:ro") == {"volume_id": "db", "mount_path": "/data", "readonly": True}
    assert volume_mount("db:/data:overlay=1GB") == {
        "volume_id": "db", "mount_path": "/data", "readonly": True, "overlay": True, "overlay_size": "1GB"}
    for bad in ("db", "db:data", ":/data", "db:/data:rx", "db:/data:overlay="):
        with pytest.raises(CLIError):
            volume_mount(bad)
