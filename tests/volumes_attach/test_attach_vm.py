"""Volumes attached to real VMs, through the official SDK in strict mode: data that outlives its
VM, one volume read-only in two running VMs, a second read-write attachment refused, overlay
volumes giving each VM private writes over one base (and a fork its own copy of the upper
layer), attach and detach only while Stopped, bad mount paths, standby/restore with a volume,
snapshots and forks refused with a read-write attachment, and a volume filled from inside the
guest (ENOSPC there, nothing on the host)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypeman import BadRequestError, ConflictError, Hypeman, NotFoundError
from hypeman.lib.exec import exec as sdk_exec

from hypemand.images import demo
from hypemand.layout import DataLayout
from tests.api.conftest import SMALL
from tests.support.harness import ServerProcess, strict_client

pytestmark = [pytest.mark.vm]

SLEEPER = {"entrypoint": ["/bin/sleep"], "cmd": ["3600"]}


@pytest.fixture
def sdk(api: ServerProcess) -> Iterator[Hypeman]:
    with strict_client(api) as client:
        yield client
        for instance in client.instances.list():
            client.instances.delete(instance.id)
        for volume in client.volumes.list():
            client.volumes.delete(volume.id)


def running(sdk: Hypeman, name: str, volumes: list[dict[str, object]], **extra: object) -> str:
    created = sdk.instances.create(
        name=name, image=demo.DEMO_NAME, volumes=volumes, **{**SMALL, **SLEEPER, **extra}  # type: ignore[arg-type]
    )
    state = sdk.instances.wait(created.id, state="Running", api_timeout="90s").state
    assert state == "Running", sdk.instances.logs(created.id, source="app", tail=40)
    return created.id


def sh(sdk: Hypeman, instance: str, script: str) -> tuple[int, str]:
    result = sdk_exec(sdk, instance, ["/bin/sh", "-c", script])
    return result.exit_code, result.output.decode(errors="replace")


def ok(sdk: Hypeman, instance: str, script: str) -> str:
    code, output = sh(sdk, instance, script)
    assert code == 0, output
    return output


def expect(error: type[Exception], status: int, call: object, *mentions: str) -> str:
    assert callable(call)
    with pytest.raises(error) as info:  # type: ignore[call-overload]
        call()
    body = info.value.body  # type: ignore[attr-defined]
    assert info.value.status_code == status and isinstance(body, dict), body  # type: ignore[attr-defined]
    for mention in mentions:
        assert mention in body["message"], (mention, body)
    return str(body["code"])


def test_data_written_by_one_vm_is_read_by_the_next(sdk: Hypeman) -> None:
    volume = sdk.volumes.create(name="db", size_gb=1)
    first = running(sdk, "vol-writer", [{"volume_id": "db", "mount_path": "/data"}])
    shown = sdk.instances.get(first).volumes
    assert shown is not None and [(v.volume_id, v.mount_path, v.readonly) for v in shown] == [
        (volume.id, "/data", False)
    ]
    attachments = sdk.volumes.get("db").attachments
    assert attachments is not None and [(a.instance_id, a.readonly) for a in attachments] == [(first, False)]
    ok(sdk, first, "echo 'row 1' > /data/table && mkdir -p /data/dir && echo x > /data/dir/f && sync")
    sdk.instances.delete(first)  # killed: the next (read-only) user replays the journal first
    assert sdk.volumes.get("db").attachments == []
    reading = {"volume_id": volume.id, "mount_path": "/srv/db/", "readonly": True}
    second = running(sdk, "vol-reader", [reading])
    assert ok(sdk, second, "cat /srv/db/table /srv/db/dir/f") == "row 1\nx\n"
    code, output = sh(sdk, second, "echo y > /srv/db/new")
    assert code != 0 and "Read-only file system" in output


def test_read_only_in_two_running_vms_and_a_second_writer_refused(sdk: Hypeman) -> None:
    sdk.volumes.create(name="dataset", size_gb=1)
    seeder = running(sdk, "vol-seed", [{"volume_id": "dataset", "mount_path": "/data"}])
    ok(sdk, seeder, "echo hello > /data/greeting && sync")
    sdk.instances.stop(seeder)
    # While the seeder holds it read-write (even Stopped), nobody else attaches it.
    code = expect(ConflictError, 409, lambda: sdk.instances.create(
        name="vol-ro-x", image=demo.DEMO_NAME,
        volumes=[{"volume_id": "dataset", "mount_path": "/d", "readonly": True}],
        **{**SMALL, **SLEEPER}), "read-write")  # type: ignore[arg-type]
    assert code == "already_attached"
    sdk.instances.delete(seeder)
    one = running(sdk, "vol-ro-1", [{"volume_id": "dataset", "mount_path": "/data", "readonly": True}])
    two = running(sdk, "vol-ro-2", [{"volume_id": "dataset", "mount_path": "/mnt/in", "readonly": True}])
    assert ok(sdk, one, "cat /data/greeting") == "hello\n"
    assert ok(sdk, two, "cat /mnt/in/greeting") == "hello\n"
    attachments = sdk.volumes.get("dataset").attachments
    assert attachments is not None and sorted(a.instance_id for a in attachments) == sorted([one, two])
    assert all(a.readonly for a in attachments)
    # A read-write attachment next to read-only ones: refused, at create and at attach.
    expect(ConflictError, 409, lambda: sdk.instances.create(
        name="vol-rw-x", image=demo.DEMO_NAME, volumes=[{"volume_id": "dataset", "mount_path": "/d"}],
        **{**SMALL, **SLEEPER}), "already attached")  # type: ignore[arg-type]
    spare = sdk.instances.create(name="vol-spare", image=demo.DEMO_NAME, **{**SMALL, **SLEEPER})  # type: ignore[arg-type]
    sdk.instances.wait(spare.id, state="Running", api_timeout="90s")
    sdk.instances.stop(spare.id)
    expect(ConflictError, 409, lambda: sdk.instances.volumes.attach("dataset", id=spare.id, mount_path="/d"))
    # The volume cannot be deleted while attached.
    expect(ConflictError, 409, lambda: sdk.volumes.delete("dataset"))


def test_overlay_volumes_give_each_vm_private_writes_over_one_base_and_a_fork_its_own_copy(
    sdk: Hypeman, api: ServerProcess
) -> None:
    sdk.volumes.create(name="base", size_gb=1)
    seeder = running(sdk, "ovl-seed", [{"volume_id": "base", "mount_path": "/data"}])
    ok(sdk, seeder, "echo base > /data/shared && sync")
    sdk.instances.stop(seeder)
    sdk.instances.delete(seeder)
    mount = {"volume_id": "base", "mount_path": "/data", "readonly": True, "overlay": True,
             "overlay_size": "64MB"}
    first = running(sdk, "ovl-one", [mount])
    second = running(sdk, "ovl-two", [mount])
    shown = sdk.instances.get(first).volumes
    assert shown is not None and shown[0].overlay and shown[0].overlay_size == "64MB" and shown[0].readonly
    ok(sdk, first, "echo one > /data/mine && echo changed-by-one > /data/shared")
    ok(sdk, second, "echo two > /data/mine")
    assert ok(sdk, first, "cat /data/mine /data/shared") == "one\nchanged-by-one\n"
    assert ok(sdk, second, "cat /data/mine /data/shared") == "two\nbase\n"
    # Each VM's upper layer is its own file; the base volume is untouched.
    layout = DataLayout(api.data_dir)
    assert layout.instance(first).volume_overlay(shown[0].volume_id).exists()
    # A fork (of the running VM) gets a copy of the upper layer, not the same one.
    fork = sdk.instances.fork(first, name="ovl-fork", from_running=True, target_state="Running")
    assert sdk.instances.wait(fork.id, state="Running", api_timeout="90s").state == "Running"
    assert ok(sdk, fork.id, "cat /data/mine /data/shared") == "one\nchanged-by-one\n"
    ok(sdk, fork.id, "echo fork > /data/mine && sync")
    assert ok(sdk, first, "cat /data/mine") == "one\n"
    fork_upper = layout.instance(fork.id).volume_overlay(shown[0].volume_id)
    first_upper = layout.instance(first).volume_overlay(shown[0].volume_id)
    assert fork_upper.exists() and os.stat(fork_upper).st_ino != os.stat(first_upper).st_ino


def test_attach_and_detach_only_while_stopped_and_bad_mount_paths(sdk: Hypeman) -> None:
    volume = sdk.volumes.create(name="later", size_gb=1)
    vm = sdk.instances.create(name="vol-attach", image=demo.DEMO_NAME, **{**SMALL, **SLEEPER})  # type: ignore[arg-type]
    sdk.instances.wait(vm.id, state="Running", api_timeout="90s")
    expect(ConflictError, 409, lambda: sdk.instances.volumes.attach("later", id=vm.id, mount_path="/data"),
           "stop it")
    sdk.instances.stop(vm.id)
    for bad in ("data", "/", "/etc", "/proc/x", "/usr/local/../../var/lib", "/data/\n"):
        expect(BadRequestError, 400, lambda bad=bad: sdk.instances.volumes.attach(  # type: ignore[misc]
            "later", id=vm.id, mount_path=bad))
    expect(NotFoundError, 404,
           lambda: sdk.instances.volumes.attach("no-such-volume", id=vm.id, mount_path="/d"))
    attached = sdk.instances.volumes.attach("later", id=vm.id, mount_path="/data/./in/")
    assert attached.volumes is not None and [(v.volume_id, v.mount_path) for v in attached.volumes] == [
        (volume.id, "/data/in")
    ]
    expect(ConflictError, 409, lambda: sdk.instances.volumes.attach("later", id=vm.id, mount_path="/other"))
    sdk.instances.start(vm.id)
    assert sdk.instances.wait(vm.id, state="Running", api_timeout="90s").state == "Running"
    ok(sdk, vm.id, "echo attached > /data/in/f && sync")
    expect(ConflictError, 409, lambda: sdk.instances.volumes.detach("later", id=vm.id), "stop it")
    sdk.instances.stop(vm.id)
    detached = sdk.instances.volumes.detach("later", id=vm.id)
    assert detached.volumes == []
    expect(NotFoundError, 404, lambda: sdk.instances.volumes.detach("later", id=vm.id))
    # Paths on create: 400, and nothing made.
    sdk.volumes.create(name="other", size_gb=1)
    expect(BadRequestError, 400, lambda: sdk.instances.create(
        name="vol-bad", image=demo.DEMO_NAME, **{**SMALL, **SLEEPER},  # type: ignore[arg-type]
        volumes=[{"volume_id": "later", "mount_path": "/a"}, {"volume_id": "other", "mount_path": "/a/"}]),
        "used twice")
    expect(BadRequestError, 400, lambda: sdk.instances.create(
        name="vol-bad", image=demo.DEMO_NAME, **{**SMALL, **SLEEPER},  # type: ignore[arg-type]
        volumes=[{"volume_id": "later", "mount_path": "/a", "overlay": True, "overlay_size": "64MB"}]),
        "readonly")
    assert [i.name for i in sdk.instances.list()] == ["vol-attach"]


def test_standby_and_restore_keep_the_attachment(sdk: Hypeman) -> None:
    sdk.volumes.create(name="keep", size_gb=1)
    vm = running(sdk, "vol-standby", [{"volume_id": "keep", "mount_path": "/data"}])
    ok(sdk, vm, "echo before > /data/f")
    sdk.instances.standby(vm)
    restored = sdk.instances.restore(vm)
    assert restored.state == "Running" and restored.volumes and restored.volumes[0].mount_path == "/data"
    script = "cat /data/f && echo after >> /data/f && sync && cat /data/f"
    assert ok(sdk, vm, script) == "before\nbefore\nafter\n"


def test_snapshots_and_forks_need_read_only_attachments(sdk: Hypeman) -> None:
    sdk.volumes.create(name="rw", size_gb=1)
    sdk.volumes.create(name="ro", size_gb=1)
    writer = running(sdk, "vol-snap-rw", [{"volume_id": "rw", "mount_path": "/data"}])
    code = expect(ConflictError, 409, lambda: sdk.instances.snapshots.create(writer, kind="Standby"),
                  "read-only")
    assert code == "volume_not_readonly"
    expect(ConflictError, 409, lambda: sdk.instances.fork(writer, name="f", from_running=True), "read-only")
    assert sdk.snapshots.list() == []
    reader = running(sdk, "vol-snap-ro", [{"volume_id": "ro", "mount_path": "/data", "readonly": True}])
    snapshot = sdk.instances.snapshots.create(reader, kind="Standby")
    fork = sdk.snapshots.fork(snapshot.id, name="vol-snap-fork", target_state="Running")
    assert sdk.instances.wait(fork.id, state="Running", api_timeout="90s").state == "Running"
    assert fork.volumes and fork.volumes[0].readonly
    ok(sdk, fork.id, "ls /data")
    attachments = sdk.volumes.get("ro").attachments
    assert attachments is not None and sorted(a.instance_id for a in attachments) == sorted([reader, fork.id])
    sdk.snapshots.delete(snapshot.id)


def test_a_full_volume_is_enospc_in_the_guest_and_nothing_on_the_host(
    sdk: Hypeman, api: ServerProcess
) -> None:
    volume = sdk.volumes.create(name="small", size_gb=1)
    vm = running(sdk, "vol-full", [{"volume_id": "small", "mount_path": "/data"}])
    _, output = sh(sdk, vm, "dd if=/dev/zero of=/data/fill bs=1M 2>&1; sync")
    assert "No space left on device" in output, output
    assert sdk.instances.get(vm).state == "Running"  # not paused: the host disk has room
    assert ok(sdk, vm, "rm /data/fill && echo fine > /data/after && cat /data/after") == "fine\n"
    disk = DataLayout(api.data_dir).volume(volume.id).disk
    assert disk.stat().st_size == 1 << 30
