"""What Harbor's Hypeman backend does, with the async SDK in strict mode against a real server and
a real registry on 127.0.0.1: ``images.create(name=...)`` of an image the server must pull, then
at once ``instances.create(image=<the name it got back>)`` without waiting for the pull, wait for
Running, exec with ``cwd``/``env``/``timeout``, ``cp`` with ``archive=True`` both ways, stop,
delete. And a pull that fails: the instance create answers why."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypeman import AsyncHypeman, ConflictError
from hypeman.lib.cp import cp_from_instance_async, cp_to_instance_async
from hypeman.lib.exec import exec_async

from tests.api.conftest import SMALL
from tests.images.conftest import remove_layer_data
from tests.support.harness import Harness, ServerProcess
from tests.support.oci import Entry, Layout, busybox_entries, push
from tests.support.registry import Registry, run_registry

pytestmark = [pytest.mark.vm, pytest.mark.registry]

SERVICE = ["/bin/sh", "-c", "echo harbor-up; while true; do sleep 3600; done"]


@dataclass
class Harbor:
    server: ServerProcess
    registry: Registry

    def ref(self, repo_tag: str) -> str:
        return f"{self.registry.host}/{repo_tag}"


@pytest.fixture(scope="module")
def harbor(tmp_path_factory: pytest.TempPathFactory, module_harness: Harness) -> Iterator[Harbor]:
    """A registry holding a good image (a few MB, so the pull takes a moment) and one whose
    layer data is gone (its manifest resolves, its pull fails), and a server that has neither
    (the module's harness deletes its instances and stops it)."""
    root = tmp_path_factory.mktemp("harbor")
    layout = Layout.create(root / "layout")
    payload = [Entry("work", "dir"), Entry("work/note.txt", data=b"from the image\n"),
               Entry("work/padding.bin", data=os.urandom(4 << 20))]
    layout.new_image("app", [busybox_entries(), payload], entrypoint=SERVICE[:2], cmd=SERVICE[2:],
                     workdir="/work")
    layout.new_image("broken", [busybox_entries(), [Entry("junk.bin", data=os.urandom(1 << 20))]],
                     cmd=["/bin/sh"])
    with run_registry(root / "registry") as registry:
        push(layout, "app", f"{registry.host}/harbor/app:1")
        push(layout, "broken", f"{registry.host}/harbor/broken:1")
        remove_layer_data(registry, "harbor/broken", "1")
        yield Harbor(module_harness.start(), registry)


@pytest.fixture
async def client(harbor: Harbor) -> AsyncIterator[AsyncHypeman]:
    async with AsyncHypeman(base_url=harbor.server.base_url, api_key=harbor.server.token, max_retries=0,
                            _strict_response_validation=True) as sdk:
        yield sdk


def local_tree(root: Path) -> Path:
    """Files with their own modes and owners, in a nested directory."""
    tree = root / "tree"
    (tree / "nested").mkdir(parents=True)
    (tree / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (tree / "run.sh").chmod(0o750)
    (tree / "nested" / "data.bin").write_bytes(os.urandom(200_000))
    (tree / "nested" / "data.bin").chmod(0o600)
    (tree / "nested").chmod(0o711)
    os.chown(tree / "nested" / "data.bin", 1234, 5678)
    os.chown(tree / "run.sh", 4321, 8765)
    return tree


def describe(tree: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Each entry's mode, owner, group and content (directories: empty), by relative path."""
    found = {}
    for path in sorted(tree.rglob("*")):
        info = path.lstat()
        data = b"" if path.is_dir() else path.read_bytes()
        found[str(path.relative_to(tree))] = (info.st_mode & 0o7777, info.st_uid, info.st_gid, data)
    return found


async def test_create_an_instance_right_after_asking_for_its_image(
    client: AsyncHypeman, harbor: Harbor, tmp_path: Path
) -> None:
    image = await client.images.create(name=harbor.ref("harbor/app:1"))
    assert image.name == harbor.ref("harbor/app:1")
    assert image.status in ("pending", "pulling", "converting")  # not waited for, as Harbor does not

    instance = await client.instances.create(name="harbor-trial", image=image.name,
                                             **SMALL)  # type: ignore[arg-type]
    assert instance.image == image.name
    assert (await client.images.get(image.name)).status == "ready"  # the create waited for it
    waited = await client.instances.wait(instance.id, state="Running", api_timeout="120s")
    assert waited.state == "Running", waited

    result = await exec_async(client, instance.id, ["/bin/sh", "-c", 'pwd; echo "$TRIAL"; cat note.txt'],
                              cwd="/work", env={"TRIAL": "harbor"}, timeout=60)
    assert (result.exit_code, result.output) == (0, b"/work\nharbor\nfrom the image\n")

    started = time.monotonic()
    outlived = await exec_async(client, instance.id, ["sleep", "60"], timeout=2)
    assert outlived.exit_code != 0 and time.monotonic() - started < 30

    sent = local_tree(tmp_path / "local")
    await cp_to_instance_async(client, instance.id, sent, "/data/tree", archive=True)
    owners = await exec_async(client, instance.id, ["stat", "-c", "%n %a %u:%g", "/data/tree/run.sh",
                                                    "/data/tree/nested", "/data/tree/nested/data.bin"])
    assert owners.output.decode().splitlines() == [
        "/data/tree/run.sh 750 4321:8765",
        "/data/tree/nested 711 0:0",
        "/data/tree/nested/data.bin 600 1234:5678",
    ]
    back = tmp_path / "back"
    back.mkdir()
    await cp_from_instance_async(client, instance.id, "/data/tree", back, archive=True)
    assert describe(back / "tree") == describe(sent)

    stopped = await client.instances.stop(instance.id)
    assert stopped.state == "Stopped"
    await client.instances.delete(instance.id)
    assert instance.id not in [i.id for i in await client.instances.list()]


async def test_create_answers_why_the_pull_of_its_image_failed(client: AsyncHypeman, harbor: Harbor) -> None:
    image = await client.images.create(name=harbor.ref("harbor/broken:1"))
    assert image.status in ("pending", "pulling")
    with pytest.raises(ConflictError) as info:
        await client.instances.create(name="harbor-broken", image=image.name, **SMALL)  # type: ignore[arg-type]
    body = info.value.body
    assert isinstance(body, dict), body
    assert body["code"] == "image_not_ready", body
    message = body["message"]
    assert "pull" in message and "failed" in message and "BLOB_UNKNOWN" in message, message
    assert (await client.images.get(image.name)).status == "failed"
    assert await client.instances.list() == []
