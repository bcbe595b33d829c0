"""A server killed mid-queue resumes its pulls on restart: every image ends ready or failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.images.conftest import PushedRegistry, wait_for_status
from tests.support.harness import Harness, strict_client
from tests.support.registry import Registry, TokenService

pytestmark = pytest.mark.registry


def record_statuses(data_dir: Path) -> dict[str, str]:
    statuses = {}
    for path in (data_dir / "images" / "content").glob("*/record.json"):
        record = json.loads(path.read_text())
        statuses[record["digest"]] = record["status"]
    return statuses


def test_kill_mid_queue_then_restart(tmp_path: Path, harness: Harness, local_registry: PushedRegistry,
                                     token_registry: tuple[Registry, TokenService, str]) -> None:
    data_dir = tmp_path / "data"
    refs = [local_registry.ref(f"restart/img{n}:1") for n in range(4)]
    registry, _, private_digest = token_registry
    private = f"{registry.host}/private/app:1"

    first = harness.start(data_dir)
    try:
        sdk = strict_client(first)
        digests = [sdk.images.create(name=ref).digest for ref in refs]
        sdk.images.create(name=private, credentials={"username": registry.username or "",
                                                     "password": registry.password or ""})
        sdk.close()
    finally:
        first.process.kill()  # no graceful shutdown: the queue dies with the process
        first.process.wait(timeout=10)

    at_kill = record_statuses(data_dir)
    in_progress = {d for d, s in at_kill.items() if s in ("pending", "pulling", "converting")}
    assert in_progress & set(digests), f"nothing was left in the queue to recover: {at_kill}"

    second = harness.start(data_dir)  # a restart on the same data directory
    try:
        sdk = strict_client(second)
        for ref in refs:
            image = wait_for_status(sdk, ref)
            assert image.status == "ready", image.error
        private_image = wait_for_status(sdk, private)
        if private_digest in in_progress:
            # Borrowed credentials were never stored, so that pull cannot resume by itself.
            assert private_image.status == "failed"
            assert private_image.error and "fresh credentials" in private_image.error
        else:
            assert private_image.status == "ready"
        assert not list((data_dir / "images" / "blobs" / "tmp").iterdir())
        sdk.close()
    finally:
        second.stop()
