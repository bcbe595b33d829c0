"""``hypeman`` on a real terminal: ``exec -it`` driven under tmux (prompt, typed command, window
resize, Ctrl-D with the shell's exit status, the terminal restored), and the table that ``ps``
prints by default when stdout is a terminal (a pty)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import shlex
import struct
import subprocess
import termios
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli.conftest import HYPEMAN, INSTANCE_NAME, VmEnv

pytestmark = pytest.mark.vm

# Whole escape sequences (CSI, OSC, charset selection), to read what a terminal would show.
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Za-z0-9]")


def visible(output: str) -> str:
    return ESCAPES.sub("", output)


@dataclass
class Tmux:
    socket: Path
    session: str

    def __call__(self, *args: str) -> str:
        result = subprocess.run(["tmux", "-S", str(self.socket), *args], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, f"tmux {args}: {result.stderr}"
        return result.stdout

    def pane(self) -> str:
        return self("capture-pane", "-p", "-t", self.session)

    def wait_for(self, predicate: Callable[[str], bool], what: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.pane()
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not appear within {timeout} s; the pane shows:\n{text}")
            time.sleep(0.2)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    """A tmux server of this test's own (its own socket); killed at the end, also on failure."""
    handle = Tmux(tmp_path / "tmux.sock", f"cli-{uuid.uuid4().hex[:8]}")
    try:
        yield handle
    finally:
        subprocess.run(["tmux", "-S", str(handle.socket), "kill-server"], capture_output=True, timeout=30)


def test_exec_it_under_tmux_prompt_typing_resize_and_ctrl_d(vm_env: VmEnv, tmux: Tmux,
                                                            tmp_path: Path) -> None:
    status_file = tmp_path / "status"
    stty_after = tmp_path / "stty-after"
    env = vm_env.cli.environment()
    exports = " ".join(f"{key}={shlex.quote(env[key])}"
                       for key in ("HOME", "HYPEMAN_BASE_URL", "HYPEMAN_API_KEY"))
    # The exit status and the terminal's settings after hypeman has returned go to files.
    command = (f"env {exports} {shlex.quote(str(HYPEMAN))} exec -it {INSTANCE_NAME} /bin/sh; "
               f"echo $? > {shlex.quote(str(status_file))}; "
               f"stty -a > {shlex.quote(str(stty_after))}; sleep 60")
    tmux("new-session", "-d", "-s", tmux.session, "-x", "100", "-y", "30", command)

    # (capture-pane drops trailing blanks: the prompt "/ # " shows as "/ #")
    tmux.wait_for(lambda text: text.rstrip().endswith("/ #"), "the shell prompt")
    tmux("send-keys", "-t", tmux.session, "echo h''i; stty size", "Enter")
    pane = tmux.wait_for(lambda text: "\nhi\n" in text and "30 100" in text,
                         "the answers to echo and stty size")
    assert "Traceback" not in pane

    tmux("resize-window", "-t", tmux.session, "-x", "120", "-y", "40")
    deadline = time.monotonic() + 30
    while True:  # a resize can race the next command: ask again until the new size is seen
        tmux("send-keys", "-t", tmux.session, "stty size", "Enter")
        try:
            tmux.wait_for(lambda text: "40 120" in text, "the new window size", timeout=3)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise

    tmux("send-keys", "-t", tmux.session, "sh -c 'exit 3'", "Enter")
    tmux.wait_for(lambda text: "exit 3'" in text and text.rstrip().endswith("/ #"), "the prompt again")
    tmux("send-keys", "-t", tmux.session, "C-d")
    deadline = time.monotonic() + 30
    while not (status_file.exists() and status_file.read_text().strip()):
        assert time.monotonic() < deadline, f"no exit status written; pane:\n{tmux.pane()}"
        time.sleep(0.2)
    assert status_file.read_text().strip() == "3"  # the shell's status: that of its last command
    deadline = time.monotonic() + 10
    while not (stty_after.exists() and stty_after.read_text().strip()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    settings = stty_after.read_text().split()
    assert "icanon" in settings and "echo" in settings  # raw mode was undone


def run_in_pty(argv: list[str], env: dict[str, str], rows: int = 40, cols: int = 200) -> tuple[int, str]:
    """Run with stdin, stdout and stderr on a fresh pty; returns (status, everything written)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    process = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower, env=env,
                               close_fds=True)
    os.close(follower)
    output = bytearray()
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the last holder of the pty's other end has gone
                break
            if not chunk:
                break
            output += chunk
        return process.wait(timeout=60), output.decode(errors="replace")
    finally:
        os.close(leader)
        if process.poll() is None:
            process.kill()
            process.wait()


def test_on_a_terminal_ps_prints_a_table_and_errors_stay_one_line(vm_env: VmEnv) -> None:
    env = dict(vm_env.cli.environment(), TERM="xterm-256color")
    status, output = run_in_pty([str(HYPEMAN), "ps"], env)
    assert status == 0, output
    text = visible(output)
    assert "INSTANCE ID" in text and INSTANCE_NAME in text and "Running" in text
    assert not text.lstrip().startswith("[")  # not JSON

    status, output = run_in_pty([str(HYPEMAN), "inspect", "no-such-instance"], env)
    assert status == 1
    lines = [line for line in output.replace("\r", "").splitlines() if line.strip()]
    assert len(lines) == 1 and "instance not found" in lines[0], output


def test_on_a_terminal_push_and_cp_draw_live_progress(vm_env: VmEnv, tmp_path: Path) -> None:
    """The live displays (rich spinner and transfer bars) on a real terminal, ending cleanly."""
    env = dict(vm_env.cli.environment(), TERM="xterm-256color")
    status, output = run_in_pty([str(HYPEMAN), "push", str(vm_env.layout), "demo/busybox:latest"], env)
    assert status == 0, output
    text = visible(output)
    assert "✓ pushed docker.io/demo/busybox:latest" in text and "Traceback" not in text
    assert "NAME" in text and "ready" in text  # the result as a table: stdout is the terminal too

    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(2_000_000))
    status, output = run_in_pty([str(HYPEMAN), "cp", str(payload), f"{INSTANCE_NAME}:/tmp/tty.bin"], env)
    assert status == 0, output
    assert "2.0/2.0 MB" in visible(output)  # rich's DownloadColumn at the end of the transfer
