"""Issue 13, finding 6, through the server and the official SDK in strict mode: a cp from a file
that never ends (``/proc/kmsg``) used to hang the guest agent's one loop, and with it every later
exec, cp and stat on the instance, with nothing on the server to bound the wait.

The SDK is synchronous and has no timeout of its own for streams, so every call runs in a thread
and the test waits for it with a bound; a call still stuck when the test fails ends when the
harness deletes the instance (the agent connection then fails).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
from hypeman import Hypeman
from hypeman.lib.cp import CopyProtocolError, cp_from_instance, cp_to_instance
from hypeman.lib.exec import exec as sdk_exec

from hypemand.images import demo
from tests.api.conftest import SMALL

pytestmark = pytest.mark.vm

SERVICE = {"entrypoint": ["/bin/sh", "-c"], "cmd": ["while true; do sleep 3600; done"]}
T = TypeVar("T")


@pytest.fixture
def threads() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=8)
    try:
        yield pool
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a stuck call must not hang the teardown


def within(future: Future[T], seconds: float) -> T:
    return future.result(timeout=seconds)


def test_cp_from_a_file_without_end_fails_in_bounded_time_and_blocks_nothing(
    sdk: Hypeman, threads: ThreadPoolExecutor, tmp_path: Path
) -> None:
    created = sdk.instances.create(name="kmsg", image=demo.DEMO_NAME, **SMALL, **SERVICE)  # type: ignore[arg-type]
    assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"
    instance = created.id

    def call(work: Callable[[], T]) -> Future[T]:
        return threads.submit(work)

    started = time.monotonic()
    copy = call(lambda: cp_from_instance(sdk, instance, "/proc/kmsg", tmp_path / "kmsg"))
    # While that copy waits for data the guest will never send, the instance serves the rest.
    (tmp_path / "up.txt").write_bytes(b"uploaded")
    exec_result = call(lambda: sdk_exec(sdk, instance, ["/bin/sh", "-c", "echo served"]))
    stat_result = call(lambda: sdk.instances.stat(instance, path="/proc/kmsg"))
    upload = call(lambda: cp_to_instance(sdk, instance, tmp_path / "up.txt", "/tmp/up.txt"))
    result = within(exec_result, 30)
    assert (result.exit_code, result.output) == (0, b"served\n")
    assert within(stat_result, 30).is_file
    within(upload, 30)
    assert time.monotonic() - started < 30

    # The copy ends with the guest's reason, well before any host-side bound.
    with pytest.raises(CopyProtocolError, match="no data for 5 s"):
        within(copy, 30)
    assert time.monotonic() - started < 30

    # And everything still works on the instance afterwards.
    after = within(call(lambda: sdk_exec(sdk, instance, ["/bin/cat", "/tmp/up.txt"])), 30)
    assert (after.exit_code, after.output) == (0, b"uploaded")
    within(call(lambda: cp_from_instance(sdk, instance, "/tmp/up.txt", tmp_path / "down")), 30)
    assert (tmp_path / "down" / "up.txt").read_bytes() == b"uploaded"
    sdk.instances.delete(instance)
