"""Log rotation on a real server and a real VM, through the official SDK: a program prints far
more than the server's (small) log limit while a client follows its console; the console is
rotated several times under the follower, which sees every line once, in order; the tail after
that reaches back into the copy; and the program's exit code, printed on the console after the
rotations, is still recorded."""

from __future__ import annotations

import pytest
from hypeman.lib.exec import exec as sdk_exec

from hypemand.images import demo
from hypemand.instances.logtail import rotated_name
from hypemand.layout import DataLayout
from tests.api.conftest import SMALL
from tests.support.harness import Harness, strict_client

pytestmark = pytest.mark.vm

LINES = 60_000  # about 400 kB of console: several rotations at the 64 KiB limit below
LAST = "rotation-test-done"
# Prints once the test, its follower attached, says so.
PROGRAM = f"while [ ! -e /tmp/go ]; do sleep 0.1; done; seq 1 {LINES}; echo {LAST}; exit 7"


def test_following_a_console_that_is_rotated_under_the_follower(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYPEMAND_LOG_MAX_SIZE", "64KB")
    monkeypatch.setenv("HYPEMAND_LOG_MAX_FILES", "2")
    monkeypatch.setenv("HYPEMAND_LOG_ROTATE_INTERVAL", "100ms")
    server = harness.start()
    demo.install(server.base_url, server.token, wait_seconds=300)
    with strict_client(server) as sdk:
        created = sdk.instances.create(
            name="chatty", image=demo.DEMO_NAME, entrypoint=["/bin/sh", "-c"], cmd=[PROGRAM],
            **SMALL,  # type: ignore[arg-type]
        )
        assert sdk.instances.wait(created.id, state="Running", api_timeout="90s").state == "Running"
        console = DataLayout(server.data_dir).instance(created.id).console_log

        followed: list[str] = []
        with sdk.instances.logs(created.id, follow=True, tail=0) as stream:
            # The answer has begun: the follower stands at the end of the console.
            assert sdk_exec(sdk, created.id, ["/bin/touch", "/tmp/go"]).exit_code == 0
            for line in stream:
                followed.append(line)
                if line == LAST:
                    break
        numbers = [int(line) for line in followed if line.isdigit()]
        assert numbers == list(range(1, LINES + 1)), _first_difference(numbers)

        assert sdk.instances.wait(created.id, state="Stopped", api_timeout="60s").state == "Stopped"
        assert sdk.instances.get(created.id).exit_code == 7

        # Rotated more than once, into the copies kept.
        assert rotated_name(console, 2).exists() and not rotated_name(console, 3).exists()
        tail = list(sdk.instances.logs(created.id, tail=200))
        assert LAST in tail
        assert [int(line) for line in tail if line.isdigit()][-10:] == list(range(LINES - 9, LINES + 1))


def _first_difference(numbers: list[int]) -> str:
    for index, number in enumerate(numbers):
        if number != index + 1:
            return f"{len(numbers)} lines; line {index} is {number}, not {index + 1}"
    return f"{len(numbers)} lines, the first ones in order"

