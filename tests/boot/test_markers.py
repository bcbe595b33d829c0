"""Console marker parsing and waiting (no VM: the console is a file written by the test)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hypemand.guest.markers import GuestBootTimeout, Marker, parse_markers, wait_for_markers

BOOT_LOG = """\
[    0.501866] PCI: Fatal: No config space access function found
HYPEMAN-AGENT-READY ts=2.512
HYPEMAN-PROGRAM-START ts=2.542
hello-from-guest
partial line without newlineHYPEMAN-EXIT code=137 message="killed by signal 9 (\\"Killed\\") C:\\\\x"
[    5.762115] reboot: Power down
"""


def test_parse_all_markers() -> None:
    markers = parse_markers(BOOT_LOG)
    assert markers.agent_ready_ts == 2.512
    assert markers.program_start_ts == 2.542
    assert markers.exit is not None
    assert markers.exit.code == 137
    assert markers.exit.message == 'killed by signal 9 ("Killed") C:\\x'
    assert markers.boot_error is None


def test_parse_boot_error() -> None:
    markers = parse_markers(
        "HYPEMAN-BOOT-ERROR image disk /dev/vda is neither ext4 nor erofs\n"
        'HYPEMAN-EXIT code=127 message="boot failed: image disk /dev/vda is neither ext4 nor erofs"\n'
    )
    assert markers.boot_error == "image disk /dev/vda is neither ext4 nor erofs"
    assert markers.exit is not None and markers.exit.code == 127
    assert not markers.has(Marker.PROGRAM_START)


async def test_wait_returns_when_markers_arrive(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("booting\n")

    async def guest() -> None:  # the markers arrive while the wait is under way: part of the test
        await asyncio.sleep(0.1)
        with log.open("a") as f:
            f.write("HYPEMAN-AGENT-READY ts=1.0\n")
            f.flush()
            await asyncio.sleep(0.1)
            f.write("HYPEMAN-PROGRAM-START ts=1.1\n")

    writer = asyncio.create_task(guest())
    markers = await wait_for_markers(log, [Marker.AGENT_READY, Marker.PROGRAM_START], 10, lambda: True)
    await writer
    assert markers.program_start_ts == 1.1


async def test_wait_reads_only_after_offset(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    old = 'HYPEMAN-AGENT-READY ts=1.0\nHYPEMAN-EXIT code=0 message="exited normally"\n'
    log.write_text(old + "second boot\n")
    with pytest.raises(GuestBootTimeout) as caught:
        await wait_for_markers(log, [Marker.AGENT_READY], 0.3, lambda: True, offset=len(old))
    assert "within" in caught.value.reason
    assert caught.value.console_tail == "second boot"


async def test_wait_times_out_with_console_tail(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    with pytest.raises(GuestBootTimeout) as caught:
        await wait_for_markers(log, [Marker.AGENT_READY], 0.2, lambda: True)
    tail = caught.value.console_tail.splitlines()
    assert len(tail) == 40
    assert tail[-1] == "line 99"
    assert "HYPEMAN-AGENT-READY" in caught.value.reason


async def test_wait_fails_fast_when_the_vm_process_is_gone(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("Kernel panic - not syncing\n")
    with pytest.raises(GuestBootTimeout) as caught:
        await wait_for_markers(log, [Marker.AGENT_READY], 60, lambda: False)
    assert "process ended" in caught.value.reason
    assert "Kernel panic" in caught.value.console_tail


async def test_wait_fails_when_guest_exits_first(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text(
        'HYPEMAN-BOOT-ERROR disks missing\nHYPEMAN-EXIT code=127 message="boot failed: disks missing"\n'
    )
    with pytest.raises(GuestBootTimeout) as caught:
        await wait_for_markers(log, [Marker.AGENT_READY], 60, lambda: True)
    assert "disks missing" in caught.value.reason
    assert caught.value.markers.exit is not None


async def test_waiting_for_exit_itself_succeeds(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text('HYPEMAN-EXIT code=3 message="exited with code 3"\n')
    markers = await wait_for_markers(log, [Marker.EXIT], 5, lambda: False)
    assert markers.exit is not None and markers.exit.code == 3
