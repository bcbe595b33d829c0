"""The /images API through the official SDK (strict mode) against a real registry."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
from hypeman import BadRequestError, Hypeman, NotFoundError

from tests.conftest import ServerProcess
from tests.images.conftest import PushedRegistry, wait_for_status
from tests.support.registry import Registry, TokenService

pytestmark = pytest.mark.registry


def debugfs(disk: Path, command: str) -> str:
    result = subprocess.run(["debugfs", "-R", command, str(disk)], capture_output=True, text=True, check=True)
    return result.stdout


def disk_of(server: ServerProcess, digest: str) -> Path:
    return server.data_dir / "images" / "content" / digest.removeprefix("sha256:") / "rootfs.ext4"


def test_create_poll_get_list_tag_delete(sdk: Hypeman, server: ServerProcess,
                                         local_registry: PushedRegistry) -> None:
    ref = local_registry.ref("test/single:1")
    created = sdk.images.create(name=ref, tags={"team": "images"})
    assert created.name == ref
    assert created.digest == local_registry.digests["test/single:1"]
    assert created.status in ("pending", "pulling", "converting", "ready")

    image = wait_for_status(sdk, ref)
    assert image.status == "ready", image.error
    assert image.entrypoint == ["/bin/sh", "-c"]
    assert image.cmd == ["cat /etc/motd"]
    assert image.env == {"FOO": "bar", "PATH": "/bin"}
    assert image.working_dir == "/work"
    assert image.platform == "linux/amd64"
    assert image.size_bytes and image.size_bytes > 0
    assert image.queue_position is None

    # The SDK percent-encodes the slashes: GET /images/127.0.0.1%3A...%2Ftest%2Fsingle:1
    assert sdk.images.get(ref).digest == image.digest
    listed = sdk.images.list(tags={"team": "images"})
    assert [i.name for i in listed] == [ref]
    assert sdk.images.list(tags={"team": "other"}) == []

    tagged = sdk.images.tag(ref, target="myapp:stable")
    assert tagged.name == "docker.io/library/myapp:stable"
    assert tagged.digest == image.digest and tagged.status == "ready"
    assert sdk.images.get("myapp:stable").digest == image.digest

    disk = disk_of(server, image.digest)
    assert debugfs(disk, "cat /etc/motd") == "hello from single\n"

    sdk.images.delete(ref)
    with pytest.raises(NotFoundError):
        sdk.images.get(ref)
    # Content is kept while another name points at it, and removed with the last name.
    assert disk.exists()
    sdk.images.delete("myapp:stable")
    assert not disk.exists()
    with pytest.raises(NotFoundError):
        sdk.images.delete("myapp:stable")


def test_get_by_raw_unencoded_path_and_digest(sdk: Hypeman, server: ServerProcess,
                                              local_registry: PushedRegistry) -> None:
    ref = local_registry.ref("test/single:1")
    sdk.images.create(name=ref)
    image = wait_for_status(sdk, ref)
    by_digest = sdk.images.get(f"{local_registry.registry.host}/test/single@{image.digest}")
    assert by_digest.digest == image.digest and by_digest.status == "ready"
    raw = httpx.get(f"{server.base_url}/images/{ref}", headers={"Authorization": f"Bearer {server.token}"})
    assert raw.status_code == 200 and raw.json()["digest"] == image.digest


def test_missing_and_invalid_names(sdk: Hypeman, local_registry: PushedRegistry) -> None:
    with pytest.raises(NotFoundError):
        sdk.images.get("docker.io/library/never-pulled:latest")
    with pytest.raises(NotFoundError) as missing_tag:
        sdk.images.create(name=local_registry.ref("missing-tag/app:no-such-tag"))
    assert "MANIFEST_UNKNOWN" in json.dumps(missing_tag.value.body)
    for bad in ("UPPER/Case:tag", "bad name", "a:b:c", "x@sha256:1234"):
        with pytest.raises(BadRequestError) as err:
            sdk.images.create(name=bad)
        assert isinstance(err.value.body, dict) and err.value.body["code"] == "invalid_name"
    with pytest.raises(BadRequestError) as platform_err:
        sdk.images.create(name=local_registry.ref("test/single:1"), platform="windows/amd64")
    assert isinstance(platform_err.value.body, dict) and platform_err.value.body["code"] == "invalid_platform"
    with pytest.raises(NotFoundError):
        sdk.images.tag("docker.io/library/never-pulled:latest", target="x:y")


def test_tag_target_must_be_a_tag(sdk: Hypeman, local_registry: PushedRegistry) -> None:
    ref = local_registry.ref("test/single:1")
    sdk.images.create(name=ref)
    image = wait_for_status(sdk, ref)
    with pytest.raises(BadRequestError):
        sdk.images.tag(ref, target=f"docker.io/library/x@{image.digest}")


def test_whiteouts_layers_and_metadata_on_disk(sdk: Hypeman, server: ServerProcess,
                                               local_registry: PushedRegistry) -> None:
    ref = local_registry.ref("test/layered:1")
    sdk.images.create(name=ref)
    image = wait_for_status(sdk, ref)
    assert image.status == "ready", image.error
    disk = disk_of(server, image.digest)
    assert debugfs(disk, "cat /etc/motd") == "layer3\n"
    assert debugfs(disk, "cat /etc/added.txt") == "added\n"
    assert "File not found" in debugfs_err(disk, "stat /etc/removed.txt")
    opaque = debugfs(disk, "ls -p /data/opaque")
    assert "/new/" in opaque and "old1" not in opaque
    assert debugfs(disk, "cat /data/keep.txt") == "kept\n"
    suid = debugfs(disk, "stat /bin/suid")
    assert "User:  1234" in suid and "Group:  5678" in suid and "Mode:  04755" in suid
    assert "Type: character special" in debugfs(disk, "stat /dev/null")
    link = debugfs(disk, "stat /etc/motd-link")
    assert "Type: symlink" in link and 'Fast link dest: "motd"' in link
    busybox_links = debugfs(disk, "stat /bin/busybox")
    assert "Links: 2" in busybox_links  # /bin/hl is a hard link to it
    fsck = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def debugfs_err(disk: Path, command: str) -> str:
    result = subprocess.run(["debugfs", "-R", command, str(disk)],
                            capture_output=True, text=True, check=False)
    return result.stdout + result.stderr


def test_multi_platform_index_picks_platform(sdk: Hypeman, server: ServerProcess,
                                             local_registry: PushedRegistry) -> None:
    ref = local_registry.ref("test/multi:1")
    host_pick = sdk.images.create(name=ref)
    amd64 = wait_for_status(sdk, ref)
    assert amd64.status == "ready" and amd64.platform == "linux/amd64"
    assert host_pick.digest != local_registry.digests["test/multi:1"]  # the child, not the index
    assert debugfs(disk_of(server, amd64.digest), "cat /etc/arch") == "amd64\n"

    arm_ref = f"{local_registry.registry.host}/test/multi@{local_registry.digests['test/multi:1']}"
    arm = sdk.images.create(name=arm_ref, platform="linux/arm64")
    arm = wait_for_status(sdk, arm_ref)
    assert arm.status == "ready" and arm.platform == "linux/arm64"
    assert arm.digest != amd64.digest
    assert debugfs(disk_of(server, arm.digest), "cat /etc/arch") == "arm64\n"


def test_docker_v2_manifest(sdk: Hypeman, local_registry: PushedRegistry) -> None:
    ref = local_registry.ref("test/single-docker:1")
    created = sdk.images.create(name=ref)
    assert created.digest == local_registry.digests["test/single-docker:1"]
    image = wait_for_status(sdk, ref)
    assert image.status == "ready", image.error
    assert image.env == {"FOO": "bar", "PATH": "/bin"}


def test_concurrent_pulls_of_one_reference_are_joined(server: ServerProcess,
                                                      local_registry: PushedRegistry) -> None:
    from tests.conftest import strict_client

    ref = local_registry.ref("join/app:1")
    results: list[str] = []
    errors: list[BaseException] = []

    def pull() -> None:
        client = strict_client(server)
        try:
            results.append(client.images.create(name=ref).digest)
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=pull) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(set(results)) == 1
    sdk = strict_client(server)
    image = wait_for_status(sdk, ref)
    assert image.status == "ready"
    manifest = json.loads((server.data_dir / "images/blobs/sha256" / image.digest.removeprefix("sha256:"))
                          .read_bytes())
    for layer in manifest["layers"]:
        assert local_registry.registry.count_requests("GET", f"/v2/join/app/blobs/{layer['digest']}") == 1


def test_token_auth_registry_with_borrowed_credentials(
    sdk: Hypeman, server: ServerProcess, token_registry: tuple[Registry, TokenService, str]
) -> None:
    registry, tokens, digest = token_registry
    ref = f"{registry.host}/private/app:1"
    with pytest.raises(NotFoundError) as anonymous:
        sdk.images.create(name=ref)
    assert "bad or missing credentials" in json.dumps(anonymous.value.body)
    with pytest.raises(NotFoundError):
        sdk.images.create(name=ref, credentials={"username": registry.username or "", "password": "wrong"})

    created = sdk.images.create(
        name=ref, credentials={"username": registry.username or "", "password": registry.password or ""})
    assert created.digest == digest
    image = wait_for_status(sdk, ref)
    assert image.status == "ready", image.error
    assert "repository:private/app:pull" in tokens.issued
    # Borrowed credentials are never written to disk.
    for path in server.data_dir.rglob("*.json"):
        assert (registry.password or "") not in path.read_text(errors="replace")


def test_failed_record_is_retried_on_new_create(sdk: Hypeman, server: ServerProcess,
                                                local_registry: PushedRegistry) -> None:
    ref = local_registry.ref("test/single:1")
    first = sdk.images.create(name=ref)
    wait_for_status(sdk, ref)
    again = sdk.images.create(name=ref)
    assert again.digest == first.digest and again.status == "ready"

