"""The real guest agent (the guest binary in `agent` mode) against the real AgentClient.

No VM: the agent runs on the host behind a pty relay that behaves like QEMU's chardev socket
(see hostmode.py), so processes run and files land on the host, in a temporary directory.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import struct
from pathlib import Path

import pytest

from hypemand.guest import protocol as p
from hypemand.guest.client import AgentClient, AgentDisconnected, AgentError, AgentTimeout, GetEntry
from hypemand.guest.models import EntryType

from .hostmode import HostAgent


async def test_ping(client: AgentClient) -> None:
    assert await client.ping() > 0
    assert client.guest_version == p.VERSION


async def test_exec_echo(client: AgentClient) -> None:
    done = await client.run(["echo", "hello", "world"])
    assert (done.stdout, done.stderr, done.exit_code) == (b"hello world\n", b"", 0)


async def test_exit_code_of_failing_command(client: AgentClient) -> None:
    done = await client.run(["sh", "-c", "exit 7"])
    assert done.exit_code == 7 and done.signal is None and not done.timed_out


async def test_missing_command_raises_with_errno(client: AgentClient) -> None:
    with pytest.raises(AgentError) as info:
        await client.exec(["/no/such/program"])
    assert info.value.errno == 2
    assert "/no/such/program" in str(info.value)


async def test_bad_cwd_raises(client: AgentClient) -> None:
    with pytest.raises(AgentError) as info:
        await client.exec(["true"], cwd="/no/such/dir")
    assert info.value.errno == 2


async def test_env_and_cwd(client: AgentClient, tmp_path: Path) -> None:
    done = await client.run(["sh", "-c", 'echo "$GREETING" "$(pwd)"'], env={"GREETING": "hi there"},
                            cwd=str(tmp_path))
    assert done.stdout == f"hi there {tmp_path}\n".encode()


async def test_stdin_round_trip_through_cat(client: AgentClient) -> None:
    data = os.urandom(700_000)  # several windows' worth: exercises credit in both directions
    done = await client.run(["cat"], input=data)
    assert done.stdout == data and done.exit_code == 0


async def test_separate_stdout_and_stderr(client: AgentClient) -> None:
    done = await client.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (done.stdout, done.stderr, done.exit_code) == (b"out\n", b"err\n", 3)


async def test_merged_stdout_and_stderr_keep_order(client: AgentClient) -> None:
    proc = await client.exec(["sh", "-c", "echo 1; echo 2 >&2; echo 3; echo 4 >&2"], merge_stderr=True)
    chunks = [chunk async for chunk in proc]
    assert {c.stream for c in chunks} == {"stdout"}
    assert b"".join(c.data for c in chunks) == b"1\n2\n3\n4\n"
    assert (await proc.wait()).exit_code == 0


async def test_timeout_kills_process_group(client: AgentClient) -> None:
    done = await client.run(["sh", "-c", "sleep 30 & sleep 30; echo never"], timeout=0.5)
    assert done.timed_out and done.signal == 9 and done.exit_code == 137
    assert done.stdout == b""


async def test_signal_reaches_process(client: AgentClient) -> None:
    script = "trap 'echo got-term; exit 5' TERM; echo ready; while :; do sleep 0.05; done"
    proc = await client.exec(["sh", "-c", script])
    output = b""
    async for chunk in proc:
        output += chunk.data
        if b"ready" in output:
            await proc.signal(15)
        if b"got-term" in output:
            break
    result = await proc.wait()
    assert b"got-term" in output and result.exit_code == 5


async def test_tty_session_with_resize(client: AgentClient) -> None:
    proc = await client.exec(["sh", "-c", "stty size; read line; stty size; tty"], tty=True, rows=24, cols=80)
    output = b""
    resized = False
    async for chunk in proc:
        assert chunk.stream == "stdout"
        output += chunk.data
        if not resized and b"24 80" in output:
            await proc.resize(40, 132)
            await proc.write_stdin(b"go\r")
            resized = True
    result = await proc.wait()
    assert b"24 80" in output and b"40 132" in output, output
    assert b"/dev/pts/" in output
    assert result.exit_code == 0


async def test_tty_close_stdin_sends_eof(client: AgentClient) -> None:
    proc = await client.exec(["cat"], tty=True)
    await proc.write_stdin(b"abc\r")
    await proc.close_stdin()
    output = b"".join([chunk.data async for chunk in proc])
    assert b"abc" in output
    assert (await proc.wait()).exit_code == 0


async def test_tty_program_closing_stdio_before_exit_is_not_hung_up(client: AgentClient) -> None:
    # Closing every slave fd makes the pty master report EIO while the program still runs;
    # the terminal must not be hung up (SIGHUP) until the program has exited.
    done_proc = await client.exec(["sh", "-c", "echo bye; exec 0<&- 1>&- 2>&-; sleep 0.5; exit 3"], tty=True)
    output = b"".join([chunk.data async for chunk in done_proc])
    result = await done_proc.wait()
    assert b"bye" in output
    assert (result.exit_code, result.signal) == (3, None)


async def test_eight_concurrent_sessions(client: AgentClient) -> None:
    payloads = [os.urandom(300_000 + i) for i in range(8)]

    async def one(i: int) -> None:
        done = await client.run(["sh", "-c", f"cat; echo session-{i} >&2"], input=payloads[i])
        assert done.stdout == payloads[i]
        assert done.stderr == f"session-{i}\n".encode()

    await asyncio.gather(*(one(i) for i in range(8)))


async def test_stalled_session_does_not_block_others(client: AgentClient) -> None:
    # 50 MB nobody reads: the agent must stop reading that pipe, not buffer it or starve others.
    flood = await client.exec(["sh", "-c", "head -c 50000000 /dev/zero"])
    for _ in range(3):
        assert (await client.run(["echo", "still-here"])).stdout == b"still-here\n"
    total = 0
    async for chunk in flood:
        total += len(chunk.data)
    assert total == 50_000_000
    assert (await flood.wait()).exit_code == 0


async def test_wait_without_reading_discards_output(client: AgentClient) -> None:
    proc = await client.exec(["sh", "-c", "head -c 3000000 /dev/zero; exit 4"])
    assert (await proc.wait()).exit_code == 4


async def test_put_and_get_5mb_file(client: AgentClient, tmp_path: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 17)
    target = tmp_path / "sub" / "dir" / "blob.bin"
    mtime_ns = 1_600_000_000_123_456_789
    written = await client.put_file(str(target), data, mode=0o640, mtime_ns=mtime_ns)
    assert written == len(data)
    entries = []
    async for item in client.get(str(target)):
        assert isinstance(item, GetEntry)
        entries.append((item.header, await item.read_all()))
    [(header, content)] = entries
    assert hashlib.sha256(content).digest() == hashlib.sha256(data).digest()
    assert (header.path, header.type, header.mode) == ("blob.bin", EntryType.FILE, 0o640)
    assert header.size == len(data)
    assert header.mtime_ns == mtime_ns
    assert not list(target.parent.glob("*.hypeman-*")), "temporary file left behind"


async def test_put_from_async_iterator_with_owner(client: AgentClient, tmp_path: Path) -> None:
    async def source():  # type: ignore[no-untyped-def]
        for i in range(10):
            yield bytes([i]) * 100_000

    target = tmp_path / "streamed"
    written = await client.put_file(str(target), source(), mode=0o600, uid=1234, gid=4321)
    assert written == 1_000_000
    st = target.stat()
    assert (st.st_size, st.st_mode & 0o7777, st.st_uid, st.st_gid) == (1_000_000, 0o600, 1234, 4321)


async def test_put_whose_source_fails_is_abandoned(client: AgentClient, tmp_path: Path) -> None:
    """A host-side error while reading the source (not an agent error) must still cancel the
    transfer: the guest drops its temporary file and the client forgets the session."""

    async def failing_source():  # type: ignore[no-untyped-def]
        yield b"x" * 100_000
        raise ValueError("the upload broke")

    target = tmp_path / "broken"
    with pytest.raises(ValueError):
        await client.put_file(str(target), failing_source())
    assert client._sessions == {}
    # The put's worker process deletes its temporary file once the loop closes its input (the
    # loop never touches the file system itself, which may hang): soon, not before any answer.
    for _ in range(200):
        if os.listdir(tmp_path) == ["agent.sock"]:
            break
        await asyncio.sleep(0.025)
    else:
        pytest.fail(f"temporary file left behind: {os.listdir(tmp_path)}")


async def test_put_into_a_directory_path_fails(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(AgentError) as info:
        await client.put_file(str(tmp_path), b"x")
    assert info.value.errno == 21  # EISDIR


async def test_directory_tree_get(client: AgentClient, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    await client.mkdir(str(root / "a" / "b"), mode=0o750)
    await client.put_file(str(root / "top.txt"), b"top", mode=0o644)
    await client.put_file(str(root / "a" / "mid.txt"), b"middle" * 10_000)
    await client.put_file(str(root / "a" / "b" / "empty"), b"")
    await client.symlink("../top.txt", str(root / "a" / "link"))
    os.mkfifo(root / "fifo")

    seen: dict[str, tuple[EntryType, bytes, str]] = {}
    order: list[str] = []
    async for item in client.get(str(root)):
        assert isinstance(item, GetEntry), item
        seen[item.header.path] = (item.header.type, await item.read_all(), item.header.link_target)
        order.append(item.header.path)
    assert seen == {
        "tree": (EntryType.DIR, b"", ""),
        "tree/top.txt": (EntryType.FILE, b"top", ""),
        "tree/fifo": (EntryType.OTHER, b"", ""),
        "tree/a": (EntryType.DIR, b"", ""),
        "tree/a/mid.txt": (EntryType.FILE, b"middle" * 10_000, ""),
        "tree/a/link": (EntryType.SYMLINK, b"", "../top.txt"),
        "tree/a/b": (EntryType.DIR, b"", ""),
        "tree/a/b/empty": (EntryType.FILE, b"", ""),
    }
    assert all(order.index(path.rsplit("/", 1)[0]) < order.index(path) for path in order if "/" in path)


async def test_get_missing_path_raises(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(AgentError) as info:
        async for _ in client.get(str(tmp_path / "missing")):
            pass
    assert info.value.errno == 2


async def test_read_error_inside_an_entry_is_reported(client: AgentClient) -> None:
    # Reading /proc/self/mem at offset 0 fails (EIO) even for root: the header was sent, the
    # data is short, and the entry carries the error; the stream still ends normally.
    items = [item async for item in client.get("/proc/self/mem")]
    [entry] = items
    assert isinstance(entry, GetEntry)
    assert await entry.read_all() == b""
    assert entry.error is not None and "error" in entry.error.lower()


async def test_read_file_follows_links(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "real").write_bytes(b"content")
    (tmp_path / "alias").symlink_to("real")
    assert await client.read_file(str(tmp_path / "alias")) == b"content"


async def test_stat_file_dir_symlink_missing(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"12345")
    (tmp_path / "file").chmod(0o604)
    (tmp_path / "link").symlink_to("file")
    (tmp_path / "dangling").symlink_to("nowhere")

    info = await client.stat(str(tmp_path / "file"))
    assert (info.exists, info.is_file, info.is_dir, info.is_symlink, info.size, info.mode) == (
        True, True, False, False, 5, 0o604)
    info = await client.stat(str(tmp_path))
    assert info.exists and info.is_dir and not info.is_file
    info = await client.stat(str(tmp_path / "link"))
    assert info.exists and info.is_symlink and info.link_target == "file"
    info = await client.stat(str(tmp_path / "link"), follow_links=True)
    assert info.exists and info.is_file and info.size == 5
    info = await client.stat(str(tmp_path / "missing"))
    assert not info.exists and info.error == ""
    info = await client.stat(str(tmp_path / "dangling"), follow_links=True)
    assert not info.exists
    info = await client.stat(str(tmp_path / "file" / "below-a-file"))
    assert not info.exists


async def test_mkdir_and_symlink(client: AgentClient, tmp_path: Path) -> None:
    await client.mkdir(str(tmp_path / "x" / "y"), mode=0o700, mtime_ns=1_000_000_000_000_000_000)
    st = (tmp_path / "x" / "y").stat()
    assert st.st_mode & 0o7777 == 0o700 and st.st_mtime_ns == 1_000_000_000_000_000_000
    await client.mkdir(str(tmp_path / "x" / "y"), mode=0o755)  # exists: fine, mode applied
    assert (tmp_path / "x" / "y").stat().st_mode & 0o7777 == 0o755
    await client.symlink("y", str(tmp_path / "x" / "to-y"))
    await client.symlink("elsewhere", str(tmp_path / "x" / "to-y"))  # replaced
    assert os.readlink(tmp_path / "x" / "to-y") == "elsewhere"
    (tmp_path / "plain").write_bytes(b"")
    with pytest.raises(AgentError):
        await client.mkdir(str(tmp_path / "plain"))


async def test_reconnect_after_peer_drops(host_agent: HostAgent, client: AgentClient) -> None:
    sleeper = await client.exec(["sleep", "30"])
    pid = sleeper.pid
    host_agent.chardev.drop_client()  # QEMU's peer went away
    with pytest.raises(AgentDisconnected):
        await sleeper.wait()
    with pytest.raises(AgentDisconnected):
        await client.ping()
    await client.reconnect(timeout=30)
    assert (await client.run(["echo", "again"])).stdout == b"again\n"
    # The new HELLO dropped the old session, killing its process.
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"process {pid} of a dropped session is still alive")


async def test_a_restarted_agent_fails_old_sessions_and_serves_new_ones(
    host_agent: HostAgent, client: AgentClient
) -> None:
    """PID 1 restarts an agent that died; the host connection stays up. The client must learn of
    it (the old sessions are gone with the old agent) and talk to the new agent without a
    reconnect by its user."""
    sleeper = await client.exec(["sleep", "30"])
    await host_agent.restart_agent()
    with pytest.raises(AgentDisconnected):
        await asyncio.wait_for(sleeper.wait(), 30)
    assert (await asyncio.wait_for(client.run(["echo", "served"]), 30)).stdout == b"served\n"


async def test_client_reconnect_fails_inflight_sessions(client: AgentClient) -> None:
    proc = await client.exec(["sleep", "30"])
    waiter = asyncio.ensure_future(proc.wait())
    await client.reconnect(timeout=30)
    with pytest.raises(AgentDisconnected):
        await waiter
    assert (await client.run(["true"])).exit_code == 0


async def test_resync_when_guest_is_mid_frame(host_agent: HostAgent) -> None:
    # A previous peer left half a frame in the agent (it announced 60000 bytes, sent 100).
    first = await AgentClient.connect(host_agent.socket_path, timeout=30)
    await first.close()
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(host_agent.socket_path))
        raw.sendall(struct.pack(">IIB", 60000, 1, p.Msg.STDIN) + b"x" * 100)
    await asyncio.sleep(0.2)  # let the relay hand the bytes over and notice the close
    client = await AgentClient.connect(host_agent.socket_path, timeout=30)
    try:
        assert (await client.run(["echo", "synced"])).stdout == b"synced\n"
    finally:
        await client.close()


async def test_long_socket_path(guest_binary: Path, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    assert len(str(deep / "agent.sock")) > 108
    agent = HostAgent(guest_binary, deep / "agent.sock")
    try:
        await _start_with_long_path(agent)
        client = await AgentClient.connect(agent.socket_path, timeout=30)
        try:
            assert (await client.run(["echo", "long"])).stdout == b"long\n"
        finally:
            await client.close()
    finally:
        await agent.stop()


async def _start_with_long_path(agent: HostAgent) -> None:
    """asyncio cannot bind a path that long either: bind via the directory fd, like the client."""
    dir_fd = os.open(agent.socket_path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(f"/proc/self/fd/{dir_fd}/{agent.socket_path.name}")
    finally:
        os.close(dir_fd)
    sock.listen()
    await agent.start(sock)


async def test_connect_times_out_without_agent(tmp_path: Path) -> None:
    with pytest.raises(AgentTimeout):
        await AgentClient.connect(tmp_path / "nothing.sock", timeout=0.3)


# IDENTITY: the agent runs as root on this host, where eth0 and the hostname are the host's. Only
# requests that the agent refuses before changing anything, or that add entropy, are sent here; the
# hostname and MAC are changed in tests/guest/test_agent_vm.py.


def _has_cap_sys_admin() -> bool:
    status = Path("/proc/self/status").read_text()
    (effective,) = (line.split()[1] for line in status.splitlines() if line.startswith("CapEff:"))
    return bool(int(effective, 16) & (1 << 21))


async def test_identity_entropy_reaches_the_kernel(client: AgentClient) -> None:
    """The ioctl numbers and argument are right: the kernel takes them (OK), or refuses an
    unprivileged caller (EPERM); a wrong number would be ENOTTY, a wrong layout EFAULT/EINVAL.
    Mixing 64 random bytes into this host's pool is harmless."""
    if _has_cap_sys_admin():
        await client.set_identity(os.urandom(64))
        await client.set_identity(os.urandom(p.IDENTITY_MAX_ENTROPY))
    else:
        with pytest.raises(AgentError) as info:
            await client.set_identity(os.urandom(64))
        assert info.value.errno == errno.EPERM


async def test_identity_over_the_limits_is_refused_before_anything_changes(client: AgentClient) -> None:
    hostname = socket.gethostname()
    with pytest.raises(AgentError) as info:
        await client.set_identity(os.urandom(p.IDENTITY_MAX_ENTROPY + 1), hostname="never-set")
    assert info.value.errno == errno.EINVAL
    assert "513 bytes of entropy" in str(info.value)
    with pytest.raises(AgentError) as info:
        await client.set_identity(os.urandom(64), hostname="h" * (p.IDENTITY_MAX_HOSTNAME + 1))
    assert info.value.errno == errno.EINVAL
    assert "hostname of 65 bytes" in str(info.value)
    assert socket.gethostname() == hostname
    assert (await client.run(["echo", "still serving"])).stdout == b"still serving\n"


async def test_identity_malformed_payload_gets_an_error_frame(host_agent: HostAgent) -> None:
    """Raw frames (the client cannot produce these): a truncated request and a 3-byte MAC."""
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(host_agent.socket_path))
        raw.settimeout(10)
        raw.sendall(p.hello(77))
        decoder = p.FrameDecoder()
        replies: list[p.Frame] = []

        def receive() -> p.Frame:
            while not replies:
                data = raw.recv(65536)
                assert data, "agent closed the connection"
                frames = decoder.feed(data)
                replies.extend(f for f in frames if not (f.session == 0 and f.type == p.Msg.HELLO_ACK))
            return replies.pop(0)

        raw.sendall(p.encode_frame(5, p.Msg.IDENTITY, b"\x00\x08abc"))  # 8 bytes announced, 3 sent
        raw.sendall(p.encode_frame(6, p.Msg.IDENTITY, b"\x00\x00\x03\x02\x00\x00\0"))
        got = {}
        for _ in range(2):
            frame = await asyncio.to_thread(receive)
            assert frame.type == p.Msg.ERROR
            got[frame.session] = p.decode_error(frame.payload)
    assert got[5] == (errno.EINVAL, "malformed identity request: Invalid argument")
    assert got[6] == (errno.EINVAL, "identity: a MAC address has 6 bytes")
