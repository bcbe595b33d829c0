"""Descriptors handed to a VMM through its supervisor (the VM's TAP): the VMM inherits them under
the same numbers, the server's copy is closed by ``spawn_supervised``, and the shim closes its own
copy after the fork, so the VMM alone holds them. No VM needed: the "VMM" is a small Python
program, and the descriptor the write end of a pipe, whose reader sees EOF exactly when the last
holder is gone."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hypemand.hypervisor.base import HypervisorStatePaths, read_vmm_exit
from hypemand.hypervisor.qemu_spawn import spawn_supervised
from hypemand.hypervisor.shim import ensure_vmm_shim

# Writes to the descriptor it was given, says which descriptors it has, and waits to be killed.
FAKE_VMM = """
import os, sys, time
fd = int(sys.argv[1])
os.write(fd, b"from-the-vmm")
print("fds", sorted(int(n) for n in os.listdir("/proc/self/fd")), flush=True)
time.sleep(600)
"""


def fd_targets(pid: int | str) -> list[str]:
    """What each open descriptor of process ``pid`` refers to."""
    fd_dir = Path(f"/proc/{pid}/fd")
    targets = []
    for entry in fd_dir.iterdir():
        try:
            targets.append(os.readlink(entry))
        except FileNotFoundError:
            continue
    return targets


def read_within(fd: int, timeout: float) -> bytes | None:
    """What ``fd`` has to read within ``timeout`` (b"" at EOF), or None if nothing came."""
    readable, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 4096) if readable else None


def test_the_vmm_alone_holds_the_descriptors_it_was_given(tmp_path: Path) -> None:
    shim = ensure_vmm_shim(HypervisorStatePaths(tmp_path / "state"))
    directory = tmp_path / "vm"
    directory.mkdir()
    log = directory / "vmm.log"
    reader, writer = os.pipe()
    pipe = os.readlink(f"/proc/self/fd/{writer}")
    spawned = spawn_supervised(shim, [sys.executable, "-c", FAKE_VMM, str(writer)], directory, log,
                               vmm_fds=(writer,))
    try:
        assert spawned.vmm is not None, log.read_text()
        # The server's copy is gone (only the read end is left here), so is the shim's; the VMM
        # has it under the same number.
        assert fd_targets("self").count(pipe) == 1
        assert read_within(reader, 30) == b"from-the-vmm"
        assert pipe not in fd_targets(spawned.supervisor.pid)
        assert os.readlink(f"/proc/{spawned.vmm.pid}/fd/{writer}") == pipe
        # Its command line is exactly argv: the descriptor is named there by its number, and
        # adoption compares the command line with the record.
        assert Path(f"/proc/{spawned.vmm.pid}/cmdline").read_bytes().split(b"\0")[-2] == str(writer).encode()
        spawned.vmm.send_signal(signal.SIGKILL)
        # Once the VMM is gone, nobody holds the write end: EOF at once (the shim kept no copy).
        assert read_within(reader, 30) == b""
        assert spawned.supervisor.wait(30) == 128 + signal.SIGKILL
        ended = read_vmm_exit(directory)
        assert ended is not None and ended.signal == "SIGKILL"
    finally:
        if spawned.vmm is not None:
            spawned.vmm.send_signal(signal.SIGKILL)
            spawned.vmm.close()
        spawned.supervisor.kill()
        spawned.supervisor.wait(30)
        os.close(reader)


def free_fd_number() -> int:
    """A descriptor number nothing in this process has open (and nothing will soon)."""
    number = 900
    while True:
        try:
            os.fstat(number)
        except OSError:
            return number
        number += 1


def test_descriptors_that_cannot_be_passed_start_nothing_and_are_closed(tmp_path: Path) -> None:
    shim = ensure_vmm_shim(HypervisorStatePaths(tmp_path / "state"))
    directory = tmp_path / "vm"
    directory.mkdir()
    log = directory / "vmm.log"
    reader, writer = os.pipe()
    with pytest.raises(OSError):  # Popen cannot pass a descriptor that is not open
        spawn_supervised(shim, ["/bin/true"], directory, log, vmm_fds=(writer, free_fd_number()))
    assert read_within(reader, 5) == b""  # the writer was closed all the same: EOF
    os.close(reader)


@pytest.mark.parametrize(
    "pattern", ["{free}", "{r},{free}", "{r},x", "{r},,{w}", "0,{w}", "{r}," + ",".join(["{w}"] * 9)]
)
def test_the_shim_refuses_a_bad_descriptor_list_before_it_forks(tmp_path: Path, pattern: str) -> None:
    """Exit code 2, a line on stderr, no exit record and no VMM. ``r`` and ``w`` are open in the
    shim; ``free`` is not; at most 8 descriptors go to the VMM."""
    shim = ensure_vmm_shim(HypervisorStatePaths(tmp_path / "state"))
    marker = tmp_path / "ran"
    r, w = os.pipe()
    given = pattern.format(r=r, w=w, free=free_fd_number())
    try:
        done = subprocess.run([str(shim), given, "exit.json", "/bin/touch", str(marker)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=30, pass_fds=(r, w))
    finally:
        os.close(r)
        os.close(w)
    assert done.returncode == 2 and "hypeman-vmm-shim:" in done.stderr, done
    assert not marker.exists() and not (tmp_path / "exit.json").exists()
