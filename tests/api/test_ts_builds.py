"""The official TypeScript SDK (@onkernel/hypeman 0.28.0) drives a builder and its builds.

``tests/ts/builds-smoke.mjs`` creates a builder, lists and gets it; builds a context with COPY
and RUN on it (the source a ``toFile`` File, tags as JSON) and polls until ready, finds the build
by its tags, replays its events; builds a ``RUN sleep 600`` context (the source a file stream)
and cancels it once its followed events show the RUN running; prunes and deletes the builder.
It prints every response and what the SDK put on the wire. This test checks the statuses, runs
the built image as an instance (Python SDK), and checks each Build, Builder and BuildEvent
against the types the SDK declares in its ``.d.ts`` (the parser of ``test_ts_sdk``, with the
files' type aliases resolved).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from hypemand.images import demo
from tests.api import test_ts_sdk
from tests.api.test_ts_sdk import SDK_DIR, Interfaces, parse_interfaces, shape_problems
from tests.builds.support import BUSYBOX, source_tarball
from tests.support.harness import Harness, ServerProcess, strict_client

pytestmark = pytest.mark.vm

BUILD_TYPES = SDK_DIR / "resources" / "builds.d.ts"
BUILDER_TYPES = SDK_DIR / "resources" / "builders.d.ts"
ts_sdk = test_ts_sdk.ts_sdk  # the fixture that installs the SDK into tests/ts

APP_DOCKERFILE = f"""\
FROM {BUSYBOX}
COPY note.txt /app/note.txt
RUN echo "built by RUN through the TS SDK" > /app/built.txt && cat /app/note.txt
CMD ["/bin/sh", "-c", "cat /app/note.txt /app/built.txt; sleep 3600"]
"""
NOTE = "note from the TS context"
SLEEPER_DOCKERFILE = f"FROM {BUSYBOX}\nRUN sleep 600\n"

_ALIAS = re.compile(r"^export type (\w+) = (.*);$", re.MULTILINE)


def sdk_types(*files: Path) -> Interfaces:
    """The interfaces of ``files``, each member's named type alias (``status: BuildStatus``)
    replaced by what it stands for (``'queued' | 'building' | ...``)."""
    text = "\n".join(path.read_text() for path in files)
    aliases = dict(_ALIAS.findall(text))
    interfaces = parse_interfaces(text)
    for members in interfaces.values():
        for name, (optional, declared) in members.items():
            parts = [aliases.get(part.strip(), part.strip()) for part in declared.split(" | ")]
            members[name] = (optional, " | ".join(parts))
    return interfaces


def test_the_build_types_are_read_with_their_aliases(ts_sdk: Path) -> None:
    interfaces = sdk_types(BUILD_TYPES, BUILDER_TYPES)
    assert interfaces["Build"]["status"] == (
        False, "'queued' | 'building' | 'pushing' | 'ready' | 'failed' | 'cancelled'")
    assert interfaces["Build"]["provenance"] == (True, "BuildProvenance")
    assert interfaces["Build"]["queue_position"] == (True, "number | null")
    assert interfaces["BuildEvent"]["type"] == (False, "'log' | 'status' | 'heartbeat'")
    assert interfaces["Builder"]["queued_builds"] == (False, "Array<string>")
    assert interfaces["Builder"]["status"] == (False, "'ready' | 'pruning' | 'deleting' | 'error'")
    event = {"timestamp": "2026-01-01T00:00:00Z", "type": "status", "status": "done", "content": None}
    assert shape_problems(event, "BuildEvent", interfaces) == [
        "BuildEvent.status: 'done' is not " + interfaces["Build"]["status"][1],
        "BuildEvent.content: null, but declared optional and never null (string)"]
    assert shape_problems({"id": "b", "status": "ready", "tags": {}}, "Build", interfaces) == [
        "Build.created_at: required, missing"]


# ---- the run -------------------------------------------------------------------------------------------


@dataclass
class BuildsRun:
    server: ServerProcess
    out: dict[str, Any]
    app_source: bytes


@pytest.fixture(scope="module")
def run(module_harness: Harness, ts_sdk: Path, tmp_path_factory: pytest.TempPathFactory) -> BuildsRun:
    """One run of builds-smoke.mjs against a server of its own (with the demo image)."""
    server = module_harness.start()
    demo.install(server.base_url, server.token, wait_seconds=600)
    contexts = tmp_path_factory.mktemp("ts-build-contexts")
    app_source = source_tarball({"Dockerfile": APP_DOCKERFILE, "note.txt": NOTE + "\n"})
    (contexts / "app.tar.gz").write_bytes(app_source)
    (contexts / "sleeper.tar.gz").write_bytes(source_tarball({"Dockerfile": SLEEPER_DOCKERFILE}))
    result = subprocess.run(
        ["node", "builds-smoke.mjs", server.base_url, server.token,
         str(contexts / "app.tar.gz"), str(contexts / "sleeper.tar.gz")],
        cwd=ts_sdk, capture_output=True, text=True, timeout=1500)
    (contexts / "out.json").write_text(result.stdout)  # for a failure's reader
    assert result.stdout.strip(), result.stderr
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert "failure" not in out, (out.get("failure"), result.stderr)
    assert result.returncode == 0, result.stderr
    return BuildsRun(server, out, app_source)


def test_typescript_sdk_drives_a_builder(run: BuildsRun) -> None:
    out = run.out
    builder = out["builderCreated"]
    builder_id = builder["id"]
    assert (builder["name"], builder["disk_size_gb"], builder["status"]) == ("ts-builder", 2, "ready")
    assert builder["tags"]["suite"] == "ts-builds"
    assert (builder["max_concurrency"], builder["queued_builds"]) == (1, [])
    assert [b["id"] for b in out["buildersListed"]] == [builder_id]
    assert out["builderGot"] == builder
    busy = out["builderBusy"]
    assert busy["active_build_id"] == out["sleeperCreated"]["id"] and busy["status"] == "ready"
    assert busy["last_used_at"] is not None
    assert out["builderPruned"]["status"] == "ready" and out["builderPruned"]["id"] == builder_id
    assert out["builderAfterPrune"].get("active_build_id") is None
    assert out["deleteResult"] is None
    missing = out["builderGetAfterDelete"]
    assert (missing["class"], missing["status"]) == ("NotFoundError", 404)
    assert missing["error"]["code"] == "not_found"
    assert out["buildersListedAfterDelete"] == []


def test_typescript_sdk_builds_an_image(run: BuildsRun) -> None:
    out = run.out
    created, ready = out["appCreated"], out["appReady"]
    assert created["status"] == "queued" and created["builder_id"] == out["builderCreated"]["id"]
    assert created["tags"] == ready["tags"] == {"suite": "ts-builds", "run": ready["tags"]["run"]}
    assert ready["status"] == "ready", ready.get("error")
    assert ready["id"] == created["id"] and ready["image_ref"] and ready["image_digest"]
    assert ready["image_digest"].startswith("sha256:") and ready["duration_ms"] > 0
    assert ready["builder_instance_id"] and ready["completed_at"] and ready["started_at"]
    assert out["appPolled"][-1] == "ready"
    assert set(out["appPolled"]) <= {"queued", "building", "pushing", "ready"}
    assert ready["provenance"]["source_hash"] == "sha256:" + hashlib.sha256(run.app_source).hexdigest()
    assert [b["id"] for b in out["appListedByTags"]] == [created["id"]]
    assert out["appListedByOtherTag"] == []
    assert [b["id"] for b in out["appListed"]] == [created["id"]]  # the sleeper came later

    # Replayed (no follow): the log's lines, then the status the build ended with.
    events = out["appEvents"]
    assert [e["type"] for e in events] == ["log"] * (len(events) - 1) + ["status"]
    assert events[-1]["status"] == "ready"
    log = "\n".join(e["content"] for e in events if e["type"] == "log")
    assert NOTE in log and "STEP" in log
    for event in events:
        datetime.fromisoformat(event["timestamp"])


def test_typescript_sdk_cancels_a_running_build(run: BuildsRun) -> None:
    out = run.out
    building, cancelled = out["sleeperBuilding"], out["sleeperCancelled"]
    assert out["sleeperCreated"]["status"] == "queued"
    assert building["status"] == "building" and building["builder_instance_id"]
    followed = out["sleeperFollowed"]
    assert "sleep 600" in followed[-1]["content"], followed  # the RUN had started
    assert out["cancelResult"] is None
    assert cancelled["status"] == "cancelled" and cancelled.get("image_ref") is None
    assert out["sleeperVmAfterCancel"]["status"] == 404
    again = out["cancelAgain"]
    assert (again["class"], again["status"]) == ("ConflictError", 409)
    assert [e["status"] for e in out["sleeperEvents"] if e["type"] == "status"][-1] == "cancelled"


def test_the_built_image_runs_as_an_instance(run: BuildsRun) -> None:
    image_ref = run.out["appReady"]["image_ref"]
    with strict_client(run.server) as sdk:
        assert sdk.images.get(image_ref).status == "ready"
        instance = sdk.instances.create(name="ts-built", image=image_ref, size="256MB", overlay_size="64MB",
                                        vcpus=1, network={"enabled": False})
        try:
            deadline = time.monotonic() + 300
            while "built by RUN through" not in (text := "\n".join(sdk.instances.logs(instance.id))):
                assert time.monotonic() < deadline, text
                time.sleep(0.5)
            assert NOTE in text
        finally:
            sdk.instances.delete(instance.id)


def test_the_sdk_sends_the_source_as_a_gzip_file_part(run: BuildsRun) -> None:
    """What the server must take: the fields in the order the SDK writes them (a File value in
    its key's place, a stream read first and so appended last), numbers as text, tags as JSON."""
    app, sleeper = run.out["wire"]["uploads"]
    assert app["path"] == sleeper["path"] == "/builds"
    assert app["content_type"].startswith("multipart/form-data; boundary=")
    assert [p["name"] for p in app["parts"]] == ["source", "builder_id", "tags", "memory_mb", "cpus"]
    source = app["parts"][0]
    assert (source["filename"], source["content_type"]) == ("app.tar.gz", "application/gzip")
    fields = {p["name"]: p["value"] for p in app["parts"][1:]}
    assert (fields["memory_mb"], fields["cpus"]) == ("768", "1")
    assert json.loads(fields["tags"]) == run.out["appReady"]["tags"]
    assert [p["name"] for p in sleeper["parts"]] == ["builder_id", "memory_mb", "cpus", "source"]
    assert sleeper["parts"][-1]["filename"] == "sleeper.tar.gz"
    tag_queries = [q["search"] for q in run.out["wire"]["queries"] if q["path"] == "/builds"]
    assert tag_queries[0] == "?tags[suite]=ts-builds&tags[run]=" + run.out["appReady"]["tags"]["run"]


def _shape_problems(out: dict[str, Any]) -> list[str]:
    interfaces = sdk_types(BUILD_TYPES, BUILDER_TYPES)
    problems: list[str] = []
    singles: dict[str, tuple[str, ...]] = {
        "Builder": ("builderCreated", "builderGot", "builderBusy", "builderPruned", "builderAfterPrune"),
        "Build": ("appCreated", "appReady", "sleeperCreated", "sleeperBuilding", "sleeperCancelled")}
    lists: dict[str, tuple[str, ...]] = {
        "Builder": ("buildersListed",), "Build": ("appListedByTags", "appListed"),
        "BuildEvent": ("appEvents", "sleeperFollowed", "sleeperEvents")}
    for type_name, keys in singles.items():
        for key in keys:
            problems += shape_problems(out[key], type_name, interfaces, key)
    for type_name, keys in lists.items():
        for key in keys:
            for n, item in enumerate(out[key]):
                problems += shape_problems(item, type_name, interfaces, f"{key}[{n}]")
    return problems


def test_responses_have_the_types_the_sdk_declares(run: BuildsRun) -> None:
    """Every Build, Builder and BuildEvent: required fields present, each of its declared type
    (an optional field the SDK declares never null is absent, not null), nothing undeclared."""
    problems = _shape_problems(run.out)
    assert problems == [], "\n".join(problems)
