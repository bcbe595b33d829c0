"""Builds on real builder VMs, through the official SDK in strict mode.

One server for the module, with the busybox demo image and one builder. What a user sees: a
Dockerfile with FROM/WORKDIR/ENV/COPY/RUN/ENTRYPOINT becomes an image an instance runs with
that workdir, env and file; the events stream carries the log and each status; a second build
on the same builder reuses its layers; Harbor's sequence with the async SDK; a failing RUN, a
cancel and a timeout each end the build and the VM.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypeman import APIStatusError, AsyncHypeman, BadRequestError, ConflictError, Hypeman, NotFoundError

from hypemand.images import demo
from tests.builds.support import BUSYBOX, SMALL_BUILDER, source_tarball, wait_finished, wait_status
from tests.support.debian import DEBIAN_IMAGE, install_debian
from tests.support.harness import Harness, ServerProcess, strict_client

pytestmark = [pytest.mark.vm]

SOURCE_LIMIT = 2 << 20  # this module's server takes sources up to 2 MiB
SECRET = "s3cret-token-value"

APP_DOCKERFILE = """\
FROM docker.io/demo/busybox:latest
WORKDIR /app
ENV GREETING=hello-from-env
COPY note.txt /app/note.txt
RUN echo "built by RUN" > /app/built.txt && cat /app/note.txt
ENTRYPOINT ["/bin/sh", "-c", "echo cwd=$(pwd) env=$GREETING; cat note.txt built.txt; sleep 3600"]
"""


@pytest.fixture(scope="module")
def server(module_harness: Harness, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    secrets = tmp_path_factory.mktemp("build-secrets")
    (secrets / "npm_token").write_text(SECRET)
    server = module_harness.start(env={"HYPEMAND_MAX_BUILD_SOURCE_BYTES": str(SOURCE_LIMIT),
                                       "HYPEMAND_BUILD_SECRETS_DIR": str(secrets)})
    demo.install(server.base_url, server.token, wait_seconds=300)
    return server


@pytest.fixture
def sdk(server: ServerProcess) -> Iterator[Hypeman]:
    with strict_client(server) as client:
        yield client


@pytest.fixture(scope="module")
def builder_id(server: ServerProcess) -> str:
    with strict_client(server) as client:
        return client.builders.create(name="tests", disk_size_gb=4, tags={"suite": "builds"}).id


def app_source(note: str = "note from the context") -> bytes:
    return source_tarball({"Dockerfile": APP_DOCKERFILE, "note.txt": note + "\n"})


def wait_for_log(sdk: Hypeman, instance_id: str, needle: str) -> str:
    deadline = time.monotonic() + 300
    while True:
        text = "\n".join(sdk.instances.logs(instance_id, tail=50))
        if needle in text:
            return text
        assert time.monotonic() < deadline, f"{needle!r} never appeared in the logs:\n{text}"
        time.sleep(0.5)


def manifest(server: ServerProcess, repository: str, tag: str) -> dict[str, Any]:
    accept = "application/vnd.oci.image.manifest.v1+json"
    answer = httpx.get(f"{server.base_url}/v2/{repository}/manifests/{tag}", timeout=30,
                       headers={"Authorization": f"Bearer {server.token}", "Accept": accept})
    answer.raise_for_status()
    document: dict[str, Any] = answer.json()
    return document


def test_a_dockerfile_becomes_an_image_an_instance_runs(server: ServerProcess, sdk: Hypeman,
                                                        builder_id: str) -> None:
    source = app_source()
    build = sdk.builds.create(source=("app.tar.gz", source), builder_id=builder_id, **SMALL_BUILDER)
    assert build.status == "queued" and build.builder_id == builder_id

    seen: list[tuple[str, str | None]] = []

    def follow() -> None:
        with strict_client_for(sdk) as client:
            for event in client.builds.events(build.id, follow=True):
                seen.append((event.type, event.status if event.type == "status" else event.content))

    follower = threading.Thread(target=follow)
    follower.start()
    done = wait_finished(sdk, build.id)
    follower.join(timeout=120)
    assert not follower.is_alive()
    assert done.status == "ready", done.error
    assert done.image_ref and done.image_digest and done.builder_instance_id
    assert done.provenance is not None
    assert done.provenance.source_hash == "sha256:" + hashlib.sha256(source).hexdigest()
    assert done.provenance.base_image_digest == sdk.images.get(BUSYBOX).digest
    assert done.duration_ms is not None and done.duration_ms > 0
    # The stream: the log's lines, and each status up to ready, in order.
    statuses = [value for kind, value in seen if kind == "status"]
    assert statuses[-2:] == ["pushing", "ready"] and "building" in statuses
    logged = "\n".join(value or "" for kind, value in seen if kind == "log")
    assert "note from the context" in logged and "STEP" in logged
    # The builder VM is gone; the image is in the store, ready.
    with pytest.raises(NotFoundError):
        sdk.instances.get(done.builder_instance_id)
    assert sdk.images.get(done.image_ref).status == "ready"
    # The base's layer was not compressed again in the VM: the result has the store's own blob.
    built, base = manifest(server, f"builds/{build.id}", "latest"), manifest(server, "demo/busybox", "latest")
    assert built["layers"][0] == base["layers"][0] and len(built["layers"]) == 3  # COPY and RUN
    # Replayed afterwards (no follow): the same log, then the final status.
    replay = list(sdk.builds.events(build.id, follow=False))
    assert replay[-1].type == "status" and replay[-1].status == "ready"
    assert any("note from the context" in (e.content or "") for e in replay if e.type == "log")

    instance = sdk.instances.create(name="built-app", image=done.image_ref, size="256MB", overlay_size="64MB",
                                    vcpus=1, network={"enabled": False})
    text = wait_for_log(sdk, instance.id, "built by RUN")
    assert "cwd=/app env=hello-from-env" in text
    assert "note from the context" in text
    sdk.instances.delete(instance.id)


def strict_client_for(sdk: Hypeman) -> Hypeman:
    return Hypeman(base_url=str(sdk.base_url), api_key=sdk.api_key, max_retries=0,
                   _strict_response_validation=True, timeout=300)


def test_harbor_sequence_with_the_async_sdk_reuses_the_builders_layers(
        server: ServerProcess, builder_id: str) -> None:
    """Harbor: create with a tarball and ``tags`` JSON, poll get until ready, find the build by
    its tags, run the image. The second build of the same Dockerfile on the same builder takes
    every step from the cache (the bench measures how much faster that is)."""

    async def harbor() -> None:
        async with AsyncHypeman(base_url=server.base_url, api_key=server.token, max_retries=0,
                                _strict_response_validation=True, timeout=300) as client:
            tags = {"harbor-task": "t1", "digest": "abc"}
            build = await client.builds.create(source=("context.tar.gz", app_source()), builder_id=builder_id,
                                               tags=json.dumps(tags), **SMALL_BUILDER)
            deadline = time.monotonic() + 600
            while build.status not in ("ready", "failed", "cancelled"):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.5)
                build = await client.builds.get(build.id)
            assert build.status == "ready", build.error
            assert build.tags == tags
            found = await client.builds.list(tags={"harbor-task": "t1"})
            assert [b.id for b in found] == [build.id]
            assert await client.builds.list(tags={"harbor-task": "other"}) == []
            log = [e.content or "" async for e in await client.builds.events(build.id, follow=False)
                   if e.type == "log"]
            cached = [line for line in log if "Using cache" in line]
            assert len(cached) >= 3, "\n".join(log)  # WORKDIR, ENV, COPY, RUN: all from the cache
            instance = await client.instances.create(name="harbor-run", image=build.image_ref or "",
                                                     size="256MB", overlay_size="64MB", vcpus=1,
                                                     network={"enabled": False})
            await client.instances.delete(instance.id)

    # The first test's build filled the cache; run it here if this test runs alone.
    with strict_client(server) as sdk:
        if not sdk.builds.list():
            assert wait_finished(sdk, sdk.builds.create(source=("a.tgz", app_source()), builder_id=builder_id,
                                                        **SMALL_BUILDER).id).status == "ready"
    asyncio.run(harbor())


def test_a_failing_run_fails_the_build_with_its_last_lines(sdk: Hypeman) -> None:
    dockerfile = 'FROM docker.io/demo/busybox:latest\nRUN echo "about to fail"; exit 3\n'
    build = sdk.builds.create(source=("x.tgz", source_tarball({"Dockerfile": dockerfile})), **SMALL_BUILDER)
    done = wait_finished(sdk, build.id)
    assert done.status == "failed"
    assert done.error is not None and "about to fail" in done.error and "exit" in done.error
    assert done.image_ref is None
    assert done.builder_instance_id is not None
    with pytest.raises(NotFoundError):
        sdk.instances.get(done.builder_instance_id)


def test_a_build_past_its_timeout_fails_and_its_vm_goes(sdk: Hypeman) -> None:
    dockerfile = 'FROM docker.io/demo/busybox:latest\nRUN sleep 600\n'
    source = source_tarball({"Dockerfile": dockerfile})
    build = sdk.builds.create(source=("x.tgz", source), timeout_seconds=15, **SMALL_BUILDER)
    wait_status(sdk, build.id, "building", with_vm=True)
    done = wait_finished(sdk, build.id)
    assert done.status == "failed"
    assert done.error is not None and "timeout" in done.error
    assert done.builder_instance_id is not None
    with pytest.raises(NotFoundError):
        sdk.instances.get(done.builder_instance_id)


def test_a_builder_runs_one_build_at_a_time_and_refuses_prune_and_delete_meanwhile(sdk: Hypeman) -> None:
    builder = sdk.builders.create(name="busy", disk_size_gb=2)
    assert builder.status == "ready" and builder.max_concurrency == 1 and builder.queued_builds == []
    sleeper = source_tarball({"Dockerfile": "FROM docker.io/demo/busybox:latest\nRUN sleep 600\n"})
    first = sdk.builds.create(source=("a.tgz", sleeper), builder_id=builder.id, **SMALL_BUILDER)
    second = sdk.builds.create(source=("b.tgz", sleeper), builder_id=builder.id, **SMALL_BUILDER)
    running = wait_status(sdk, first.id, "building", with_vm=True)
    waiting = sdk.builds.get(second.id)
    assert waiting.status == "queued" and waiting.queue_position == 1
    busy = sdk.builders.get(builder.id)
    assert busy.active_build_id == first.id and busy.queued_builds == [second.id]
    for refused in (lambda: sdk.builders.delete(builder.id), lambda: sdk.builders.prune(builder.id)):
        with pytest.raises(ConflictError):
            refused()
    # A queued build cancelled never starts; the running one's VM is gone when cancel answers.
    sdk.builds.cancel(second.id)
    assert sdk.builds.get(second.id).status == "cancelled"
    assert sdk.builds.get(second.id).builder_instance_id is None
    sdk.builds.cancel(first.id)
    assert sdk.builds.get(first.id).status == "cancelled"
    with pytest.raises(NotFoundError):
        sdk.instances.get(running.builder_instance_id or "")
    with pytest.raises(ConflictError):
        sdk.builds.cancel(first.id)
    assert sdk.builders.prune(builder.id).status == "ready"
    assert sdk.builders.get(builder.id).active_build_id is None
    sdk.builders.delete(builder.id)
    with pytest.raises(NotFoundError):
        sdk.builders.get(builder.id)


def test_bad_sources_are_refused_and_nothing_is_kept(sdk: Hypeman) -> None:
    before = [b.id for b in sdk.builds.list()]
    traversal = io.BytesIO()
    with tarfile.open(fileobj=traversal, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(BadRequestError) as refused:
        sdk.builds.create(source=("x.tgz", traversal.getvalue()))
    assert "escape.txt" in str(refused.value)
    with pytest.raises(BadRequestError) as refused:
        sdk.builds.create(source=("x.tgz", source_tarball({"app.py": "print(1)\n"})))
    assert "Dockerfile" in str(refused.value)
    with pytest.raises(NotFoundError):
        sdk.builds.create(source=("x.tgz", app_source()), builder_id="no-such-builder")
    with pytest.raises(APIStatusError) as too_large:
        sdk.builds.create(source=("big.tgz", os.urandom(SOURCE_LIMIT + (64 << 10))))
    assert too_large.value.status_code == 413
    assert [b.id for b in sdk.builds.list()] == before
    with pytest.raises(NotFoundError):
        sdk.builds.get("no-such-build")


def test_a_multi_stage_build_from_the_debian_image(server: ServerProcess, sdk: Hypeman) -> None:
    """A first stage on Debian runs python3 to make a file, with a secret of the server mounted;
    the final stage, on busybox, copies only that file: the result has it, and none of the first
    stage's weight nor the secret. Named by ``image_name``."""
    install_debian(server)
    dockerfile = f"""\
FROM {DEBIAN_IMAGE} AS make
WORKDIR /work
COPY gen.py .
RUN python3 gen.py > /work/made.txt && bash -c 'echo "bash says ${{BASH_VERSION%%.*}}"'
RUN --mount=type=secret,id=npm_token echo "secret-length=$(wc -c < /run/secrets/npm_token)" > /work/secret.txt

FROM docker.io/demo/busybox:latest
COPY --from=make /work/made.txt /work/secret.txt /
CMD ["/bin/sh", "-c", "cat /made.txt /secret.txt; ls /usr/bin/python3 || echo no-python-here; sleep 3600"]
"""
    gen = "import sys\nprint('made by python', sys.version_info.major)\n"
    source = source_tarball({"Dockerfile": dockerfile, "gen.py": gen})
    with pytest.raises(BadRequestError) as unknown:
        sdk.builds.create(source=("ms.tgz", source), secrets=json.dumps([{"id": "not_configured"}]))
    assert "not_configured" in str(unknown.value)
    build = sdk.builds.create(source=("ms.tgz", source), secrets=json.dumps([{"id": "npm_token"}]),
                              image_name="team/multi:v2", **SMALL_BUILDER)
    done = wait_finished(sdk, build.id)
    assert done.status == "ready", done.error
    assert done.image_ref == "docker.io/team/multi:v2"
    log = [e.content or "" for e in sdk.builds.events(build.id) if e.type == "log"]
    assert any(line.startswith("bash says 5") for line in log), "\n".join(log)
    # The first stage's base is the provenance's base image.
    assert done.provenance is not None
    assert done.provenance.base_image_digest == sdk.images.get(DEBIAN_IMAGE).digest
    instance = sdk.instances.create(name="multi-stage", image=done.image_ref or "", size="256MB",
                                    overlay_size="64MB", vcpus=1, network={"enabled": False})
    text = wait_for_log(sdk, instance.id, "no-python-here")
    assert "made by python 3" in text
    assert f"secret-length={len(SECRET)}" in text
    assert SECRET not in "\n".join(log)
    sdk.instances.delete(instance.id)
