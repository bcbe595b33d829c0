"""A QEMU that exits with a QMP command of ours unread resets the socket; qemu.qmp logs that at
ERROR where a plain end-of-file is INFO. Both are the VM's end: the channel's filter tells the
reset at INFO, and leaves every other error alone."""

from __future__ import annotations

import logging

import pytest

from hypemand.hypervisor.qemu_qmp import PEER_GONE


@pytest.mark.parametrize(("summary", "level"), [
    ("ConnectionResetError: [Errno 104] Connection reset by peer", logging.INFO),
    ("BrokenPipeError: [Errno 32] Broken pipe", logging.INFO),
    ("ConnectionRefusedError: [Errno 111] Connection refused", logging.ERROR),
    ("ProtocolError: garbled", logging.ERROR),
])
def test_a_reset_by_a_vanishing_qemu_is_its_end_not_an_error(
    summary: str, level: int, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("qemu.qmp.protocol.test-peer-gone")
    logger.addFilter(PEER_GONE)
    try:
        with caplog.at_level(logging.DEBUG, logger=logger.name):
            logger.error("Task.%s: %s", "Reader", summary)
    finally:
        logger.removeFilter(PEER_GONE)
    (record,) = caplog.records
    assert (record.levelno, record.levelname) == (level, logging.getLevelName(level))
