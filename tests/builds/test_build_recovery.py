"""The server SIGKILLed while a build runs: after the restart the builder VM of the killed
server is gone, the build runs again (its source was kept) and ends ready, and the builder is
usable."""

from __future__ import annotations

import pytest
from hypeman import NotFoundError

from hypemand.images import demo
from tests.builds.support import SMALL_BUILDER, source_tarball, wait_finished, wait_status
from tests.support.harness import Harness, strict_client

pytestmark = [pytest.mark.vm]

DOCKERFILE = """\
FROM docker.io/demo/busybox:latest
RUN echo first-step > /first.txt
RUN sleep 5; echo second-step > /second.txt
"""


def test_a_build_interrupted_by_sigkill_runs_again_after_the_restart(harness: Harness) -> None:
    server = harness.start()
    demo.install(server.base_url, server.token, wait_seconds=300)
    with strict_client(server) as sdk:
        builder = sdk.builders.create(name="survivor", disk_size_gb=2)
        build = sdk.builds.create(source=("ctx.tgz", source_tarball({"Dockerfile": DOCKERFILE})),
                                  builder_id=builder.id, **SMALL_BUILDER)
        running = wait_status(sdk, build.id, "building", with_vm=True)
    server.process.kill()
    server.process.wait()

    restarted = harness.start(server.data_dir)
    with strict_client(restarted) as sdk:
        with pytest.raises(NotFoundError):
            sdk.instances.get(running.builder_instance_id or "")
        done = wait_finished(sdk, build.id)
        assert done.status == "ready", done.error
        assert done.builder_instance_id != running.builder_instance_id
        log = [e.content or "" for e in sdk.builds.events(build.id) if e.type == "log"]
        assert any("the server stopped during the build" in line for line in log)
        assert [i.id for i in sdk.instances.list()] == []
        # The builder took the restart in its stride: the next build on it uses its cache.
        again = sdk.builds.create(source=("ctx.tgz", source_tarball({"Dockerfile": DOCKERFILE})),
                                  builder_id=builder.id, **SMALL_BUILDER)
        assert wait_finished(sdk, again.id).status == "ready"
        assert sdk.builders.get(builder.id).status == "ready"
