"""``exec``: a command in a running instance over the exec WebSocket, streamed both ways.

The SDK's ``hypeman.lib.exec`` collects the output and returns at the end, which suits scripts
but not a shell, so the session is driven here with the SDK's own connection helpers
(``hypeman.lib._ws``: the URL, the bearer header, the WebSocket client):

* the first text frame is the request (``command``, ``tty``, ``env``, ``cwd``, ``timeout`` and,
  with a TTY, ``rows``/``cols`` from the local terminal);
* binary frames from the server are output, copied to stdout as they come;
* with ``-i``, stdin goes to the server as binary frames. The protocol has no end-of-input
  frame: piped input must make the command end by itself (``exit`` for a shell);
* with ``-t`` on a terminal, the terminal is put in raw mode (restored on every exit path) and
  each SIGWINCH sends ``{"resize": {"rows", "cols"}}``;
* the text frame ``{"exitCode": N}`` ends the session; N becomes this command's exit status.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import termios
import threading
import tty as tty_mode
from collections.abc import Iterator
from types import FrameType
from typing import Annotated, Any

import typer
from hypeman import Hypeman
from hypeman.lib._ws import MAX_INBOUND_MESSAGE_SIZE, SyncWebSocket, connection_settings, sync_connect

from hypeman_cli import resolve, state
from hypeman_cli.errors import CLIError
from hypeman_cli.units import key_values

READ_CHUNK = 32 * 1024


def terminal_size() -> tuple[int, int] | None:
    """(rows, cols) of whichever standard stream is a terminal."""
    for fd in (1, 0, 2):
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        if size.lines > 0 and size.columns > 0:
            return size.lines, size.columns
    return None


def _resize_frame() -> str | None:
    size = terminal_size()
    if size is None:
        return None
    return json.dumps({"resize": {"rows": size[0], "cols": size[1]}}, separators=(",", ":"))


@contextlib.contextmanager
def raw_terminal(fd: int | None) -> Iterator[None]:
    """Raw mode on ``fd`` for the block (keys go to the remote PTY as typed), restored after."""
    if fd is None or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty_mode.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def winch_pipe(enabled: bool) -> Iterator[int | None]:
    """A pipe that gets a byte on every SIGWINCH (the handler only writes; the pump sends)."""
    if not enabled:
        yield None
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def on_winch(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):
            os.write(write_end, b".")

    previous = signal.signal(signal.SIGWINCH, on_winch)
    try:
        yield read_end
    finally:
        signal.signal(signal.SIGWINCH, previous)
        os.close(write_end)
        # read_end stays open: the pump thread may still be in select() on it; it is a daemon
        # thread and the process ends right after.


def _pump(websocket: SyncWebSocket, stdin_fd: int | None, winch_fd: int | None) -> None:
    """Stdin and resizes to the server, until stdin ends (and no resizes can come) or the
    connection closes."""
    watched = [fd for fd in (stdin_fd, winch_fd) if fd is not None]
    try:
        while watched:
            readable, _, _ = select.select(watched, [], [])
            if winch_fd is not None and winch_fd in readable:
                os.read(winch_fd, 512)
                frame = _resize_frame()
                if frame is not None:
                    websocket.send(frame)
            if stdin_fd is not None and stdin_fd in readable:
                data = os.read(stdin_fd, READ_CHUNK)
                if not data:
                    watched.remove(stdin_fd)  # no EOF frame exists; the command has to end itself
                    continue
                websocket.send(data)
    except Exception:
        return  # the session is over (closed socket) or stdin broke; the receiver decides


def _exit_code(frame: str) -> int | None:
    try:
        payload = json.loads(frame)
    except ValueError:
        return None
    if isinstance(payload, dict):
        code = payload.get("exitCode")
        if isinstance(code, int) and not isinstance(code, bool):
            return code
    return None


def session(client: Hypeman, instance_id: str, command: list[str], *, tty: bool, interactive: bool,
            env: dict[str, str], cwd: str | None, timeout: int | None) -> int:
    """Run one exec session with the local terminal; returns the command's exit status."""
    request: dict[str, Any] = {"command": command, "tty": tty}
    if env:
        request["env"] = env
    if cwd:
        request["cwd"] = cwd
    if timeout:
        request["timeout"] = timeout
    if tty:
        size = terminal_size()
        if size is not None:
            request["rows"], request["cols"] = size
    stdin_fd = sys.stdin.fileno() if interactive else None
    url, headers = connection_settings(client, instance_id, "exec")
    out = sys.stdout.buffer
    with sync_connect(url, additional_headers=headers, max_size=MAX_INBOUND_MESSAGE_SIZE) as websocket:
        websocket.send(json.dumps(request, separators=(",", ":")))
        with winch_pipe(tty) as winch_fd, raw_terminal(stdin_fd if tty else None):
            if stdin_fd is not None or winch_fd is not None:
                threading.Thread(target=_pump, args=(websocket, stdin_fd, winch_fd), daemon=True).start()
            while True:
                try:
                    frame = websocket.recv()
                except Exception:
                    raise CLIError("the exec session ended without an exit status "
                                   "(the connection closed)") from None
                if isinstance(frame, bytes):
                    out.write(frame)
                    out.flush()
                    continue
                code = _exit_code(frame)
                if code is not None:
                    return code


def exec_(
    ctx: typer.Context,
    instance: Annotated[str, typer.Argument(help="instance id, name or id prefix", show_default=False)],
    command: Annotated[list[str] | None, typer.Argument(help="command and arguments (default: /bin/sh)")]
    = None,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="send stdin to it")] = False,
    tty: Annotated[bool, typer.Option("--tty", "-t", help="a terminal for the command (raw mode, resize)")]
    = False,
    no_tty: Annotated[bool, typer.Option("--no-tty", "-T", help="never a terminal")] = False,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE (repeatable)")] = None,
    cwd: Annotated[str | None, typer.Option(help="working directory in the instance")] = None,
    timeout: Annotated[int | None, typer.Option(help="seconds before the command is killed (0: never)")]
    = None,
) -> None:
    """Run a command in a running instance; its exit status becomes this command's.

    Options go before the instance; everything after it is the command:
    `hypeman exec -it web sh`, `hypeman exec web -- ls -l /`.
    """
    argv = list(command or [])
    if argv and argv[0] == "--":
        argv = argv[1:]
    use_tty = tty and not no_tty
    variables = key_values(env or [], "--env")
    if use_tty and "TERM" not in variables and os.environ.get("TERM"):
        variables["TERM"] = os.environ["TERM"]
    client = state.get(ctx).client()
    found = resolve.instance(client, instance)
    try:
        code = session(client, found.id, argv or ["/bin/sh"], tty=use_tty, interactive=interactive,
                       env=variables, cwd=cwd, timeout=timeout)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(code)
