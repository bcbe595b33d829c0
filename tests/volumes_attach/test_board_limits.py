"""The boards' virtio device limits (``qemu_cmdline.VIRTIO_SLOTS``, which bound how many volume
disks an instance may have) hold for this QEMU: that many virtio-blk devices start, one more is
refused."""

from __future__ import annotations

import subprocess

import pytest

from hypemand.hypervisor.base import Board
from hypemand.hypervisor.qemu_cmdline import VIRTIO_SLOTS, machine_type
from hypemand.hypervisor.qemu_host import find_qemu_binary


def starts_with(board: Board, devices: int) -> tuple[bool, str]:
    bus = "device" if board is Board.QEMU_MICROVM else "pci"
    argv = [str(find_qemu_binary()), "-M", machine_type(board), "-nodefaults", "-display", "none",
            "-accel", "tcg", "-S", "-qmp", "stdio"]
    for index in range(devices):
        argv += ["-drive", f"id=d{index},file=/dev/null,format=raw,if=none,readonly=on",
                 "-device", f"virtio-blk-{bus},drive=d{index}"]
    commands = '{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n'
    result = subprocess.run(argv, input=commands, capture_output=True, text=True, timeout=30, check=False)
    return result.returncode == 0 and '"return"' in result.stdout, result.stderr


@pytest.mark.parametrize("board", [Board.QEMU_MICROVM, Board.QEMU])
def test_the_board_carries_exactly_its_virtio_slots(board: Board) -> None:
    fits, why = starts_with(board, VIRTIO_SLOTS[board])
    assert fits, why
    fits, why = starts_with(board, VIRTIO_SLOTS[board] + 1)
    assert not fits and why
