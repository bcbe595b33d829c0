"""The agent inside a real guest, booted by ``boot_guest`` (system kernel/initrd, our PID 1, a
busybox image); the client talks through the real virtio-serial port and QEMU's chardev socket.

One VM serves the whole module (boots are expensive on 2 shared cores).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from hypemand.guest.client import AgentClient, AgentDisconnected, AgentError, GetEntry
from hypemand.guest.config_disk import GuestConfig
from hypemand.guest.models import EntryType
from hypemand.hypervisor.base import PortForward
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.instances.boot import RunningGuest
from hypemand.system.files import SystemFiles
from tests.support.guest import booted_guest, guest_spec, http_get
from tests.support.net import free_port

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(
    accel_cache_dir: Path,
    system_files: SystemFiles,
    busybox_ext4: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[RunningGuest]:
    spec = guest_spec(
        tmp_path_factory.mktemp("agent-vm") / "vm",
        busybox_ext4,
        GuestConfig(cmd=["/bin/sleep", "100000"], env={"PATH": "/bin"}),
        network=False,
    )
    async with booted_guest(QemuHypervisor(state_dir=accel_cache_dir), system_files, spec) as guest:
        yield guest


async def test_exec_runs_in_the_image(vm: RunningGuest) -> None:
    done = await vm.agent.run(["sh", "-c", "ls /bin/busybox; hostname; echo oops >&2; exit 3"])
    assert done.stdout == b"/bin/busybox\nhypeman\n"
    assert (done.stderr, done.exit_code) == (b"oops\n", 3)


async def test_missing_program(vm: RunningGuest) -> None:
    with pytest.raises(AgentError) as info:
        await vm.agent.exec(["no-such-program"])
    assert info.value.errno == 2


async def test_stdin_round_trip(vm: RunningGuest) -> None:
    data = os.urandom(1 << 20)
    done = await vm.agent.run(["cat"], input=data)
    assert done.stdout == data


async def test_timeout(vm: RunningGuest) -> None:
    done = await vm.agent.run(["sleep", "60"], timeout=1.0)
    assert done.timed_out and done.signal == 9


async def test_tty_resize(vm: RunningGuest) -> None:
    proc = await vm.agent.exec(["sh", "-c", "stty size; read x; stty size"], tty=True, rows=24, cols=80)
    output = b""
    resized = False
    async for chunk in proc:
        output += chunk.data
        if not resized and b"24 80" in output:
            await proc.resize(50, 120)
            await proc.write_stdin(b"\r")
            resized = True
    assert b"50 120" in output, output
    assert (await proc.wait()).exit_code == 0


async def test_eight_concurrent_sessions(vm: RunningGuest) -> None:
    async def one(i: int) -> None:
        data = os.urandom(100_000 + i)
        done = await vm.agent.run(["sh", "-c", f"cat; echo s{i} >&2"], input=data)
        assert (done.stdout, done.stderr) == (data, f"s{i}\n".encode())

    await asyncio.gather(*(one(i) for i in range(8)))


async def test_put_get_5mb(vm: RunningGuest) -> None:
    data = os.urandom(5 << 20)
    mtime_ns = 1_700_000_000_000_000_000
    assert await vm.agent.put_file("/tmp/up/big.bin", data, mode=0o640, mtime_ns=mtime_ns) == len(data)
    entries = []
    async for item in vm.agent.get("/tmp/up/big.bin"):
        assert isinstance(item, GetEntry)
        entries.append((item, await item.read_all()))  # data must be read before the next entry
    [(item, content)] = entries
    assert content == data
    assert (item.header.mode, item.header.mtime_ns, item.header.size) == (0o640, mtime_ns, len(data))
    done = await vm.agent.run(["sh", "-c", "md5sum /tmp/up/big.bin"])
    assert done.stdout.split()[0].decode() == hashlib.md5(data).hexdigest()


async def test_tree_and_stat(vm: RunningGuest) -> None:
    c = vm.agent
    await c.mkdir("/tmp/tree/sub", mode=0o700)
    await c.put_file("/tmp/tree/a.txt", b"A")
    await c.put_file("/tmp/tree/sub/b.txt", b"B" * 70_000)
    await c.symlink("a.txt", "/tmp/tree/link")
    got = {}
    async for item in c.get("/tmp/tree"):
        assert isinstance(item, GetEntry)
        got[item.header.path] = (item.header.type, await item.read_all(), item.header.link_target)
    assert got == {
        "tree": (EntryType.DIR, b"", ""),
        "tree/sub": (EntryType.DIR, b"", ""),
        "tree/sub/b.txt": (EntryType.FILE, b"B" * 70_000, ""),
        "tree/a.txt": (EntryType.FILE, b"A", ""),
        "tree/link": (EntryType.SYMLINK, b"", "a.txt"),
    }
    assert (await c.stat("/tmp/tree/sub")).is_dir
    assert (await c.stat("/tmp/tree/sub")).mode == 0o700
    assert (await c.stat("/tmp/tree/a.txt")).is_file
    link = await c.stat("/tmp/tree/link")
    assert link.is_symlink and link.link_target == "a.txt"
    assert (await c.stat("/tmp/tree/link", follow_links=True)).is_file
    assert not (await c.stat("/tmp/tree/missing")).exists


async def test_a_file_without_end_blocks_nothing_and_ends_with_an_error(vm: RunningGuest) -> None:
    """Issue 13, finding 6: /proc/kmsg blocks when empty. The old agent read it in its one loop,
    so every later request on the instance hung for good."""
    c = vm.agent
    copy = asyncio.ensure_future(c.read_file("/proc/kmsg"))
    started = time.monotonic()
    async with asyncio.timeout(20):
        assert (await c.run(["echo", "served"])).stdout == b"served\n"
        assert (await c.stat("/proc/kmsg")).is_file
        await c.put_file("/tmp/beside-kmsg", b"beside")
        assert await c.read_file("/tmp/beside-kmsg") == b"beside"
        await c.ping()
    # The copy itself ends with the agent's own limit for a file that gives no data (5 s).
    with pytest.raises(AgentError, match="no data for 5 s"):
        async with asyncio.timeout(30):
            await copy
    assert time.monotonic() - started < 30
    assert (await c.run(["echo", "after"])).stdout == b"after\n"


async def test_fifos_are_not_read(vm: RunningGuest) -> None:
    """A FIFO without a writer, also bind-mounted over a regular file, is an entry without data."""
    c = vm.agent
    async with asyncio.timeout(30):
        script = "mkfifo /tmp/pipe && echo x > /tmp/covered && mount --bind /tmp/pipe /tmp/covered"
        setup = await c.run(["sh", "-c", script])
        assert setup.exit_code == 0, setup
        for path in ("/tmp/pipe", "/tmp/covered"):
            items = [(i, await i.read_all()) async for i in c.get(path) if isinstance(i, GetEntry)]
            assert [(item.header.type, data) for item, data in items] == [(EntryType.OTHER, b"")]
        await c.run(["umount", "/tmp/covered"])


async def test_a_cancelled_copy_of_a_file_without_end_ends_its_worker(vm: RunningGuest) -> None:
    c = vm.agent
    async with asyncio.timeout(30):
        agent_pid = (await c.run(["sh", "-c", "echo $PPID"])).stdout.strip().decode()
        children = f"/proc/{agent_pid}/task/{agent_pid}/children"
        walk = c.get("/proc/kmsg")
        entry = await anext(walk)
        assert isinstance(entry, GetEntry)
        listed = await c.run(["sh", "-c", f"cat {children}; echo; echo $$"])
        workers, shell = listed.stdout.decode().split("\n")[:2]
        assert len(set(workers.split()) - {shell}) == 1, listed  # the copy's worker, waiting for data
        await walk.aclose()  # CANCEL, well within the worker's 5 s wait
    async with asyncio.timeout(20):
        while True:
            listed = await c.run(["sh", "-c", f"cat {children}; echo; echo $$"])
            workers, shell = listed.stdout.decode().split("\n")[:2]
            if not set(workers.split()) - {shell}:
                break
            await asyncio.sleep(0.1)


async def test_set_clock(vm: RunningGuest) -> None:
    target = 2_000_000_000  # 2033-05-18
    await vm.agent.set_clock(target * 1_000_000_000)
    seen = int((await vm.agent.run(["date", "+%s"])).stdout)
    await vm.agent.set_clock()  # back to the host's time
    assert target <= seen < target + 60
    now = int((await vm.agent.run(["date", "+%s"])).stdout)
    assert abs(now - time.time()) < 60


async def test_reconnect_drops_old_sessions(vm: RunningGuest) -> None:
    sleeper = await vm.agent.exec(["sleep", "1000"])
    await vm.agent.reconnect(timeout=60)
    with pytest.raises(AgentDisconnected):
        await sleeper.wait()
    # The guest killed the process of the session the old connection left behind.
    for _ in range(100):
        if (await vm.agent.run(["kill", "-0", str(sleeper.pid)])).exit_code != 0:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the dropped session's process is still alive")


async def test_new_client_after_close(vm: RunningGuest) -> None:
    await vm.agent.close()
    fresh = await AgentClient.connect(vm.handle.agent_socket_path, timeout=60)
    try:
        assert (await fresh.run(["echo", "back"])).stdout == b"back\n"
    finally:
        await fresh.close()
    # The guest's own client, closed above, can start afresh too (the later tests use it).
    await vm.agent.reconnect(timeout=60)
    assert (await vm.agent.run(["echo", "again"])).stdout == b"again\n"


async def test_a_restarted_agent_is_used_at_once_and_keeps_signals_to_itself(vm: RunningGuest) -> None:
    """PID 1 restarts an agent that died; the client learns of it and talks to the new agent
    without a reconnect. The new agent is forked after the program started and must not carry
    PID 1's signal forwarding: a SIGTERM for the agent is not the program's."""
    find_program = (
        "for p in /proc/[0-9]*; do "
        '[ "$(tr "\\0" " " < $p/cmdline)" = "/bin/sleep 100000 " ] && echo ${p#/proc/}; done'
    )
    program = (await vm.agent.run(["sh", "-c", find_program])).stdout.split()
    assert len(program) == 1
    killer = await vm.agent.exec(["sh", "-c", "kill -KILL $PPID; sleep 60"])  # the agent dies
    # The new agent's start notice fails the old sessions; the client says HELLO to it by itself.
    with pytest.raises(AgentDisconnected):
        await asyncio.wait_for(killer.wait(), 60)
    done = await vm.agent.run(["sh", "-c", "kill -TERM $PPID; echo sent"])
    assert done.stdout == b"sent\n"
    assert (await vm.agent.run(["sh", "-c", find_program])).stdout.split() == program
    assert "HYPEMAN-EXIT" not in vm.handle.console_log_path.read_text()


IDENTITY_PAGE = "served-after-the-mac-change"


async def test_set_identity(
    accel_cache_dir: Path,
    system_files: SystemFiles,
    busybox_ext4: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A guest of its own (with networking, and a hostname/MAC the other tests must not see)
    gets a new identity: the CRNG ioctls succeed, hostname and MAC change, and eth0 keeps its
    address and default route. The port forward still reaching the guest's server afterwards
    shows that QEMU's user network learnt the new MAC (the guest announces it)."""
    port = free_port()
    spec = guest_spec(
        tmp_path_factory.mktemp("identity-vm") / "vm",
        busybox_ext4,
        GuestConfig(
            entrypoint=["/bin/sh", "-c"],
            cmd=[
                f"mkdir -p /tmp/www && echo {IDENTITY_PAGE} > /tmp/www/index.html && "
                "exec httpd -f -p 80 -h /tmp/www"
            ],
            env={"PATH": "/bin"},
        ),
        port_forwards=[PortForward(host_port=port, guest_port=80)],
    )
    async with booted_guest(QemuHypervisor(state_dir=accel_cache_dir), system_files, spec) as guest:
        agent = guest.agent

        async def sh(script: str) -> str:
            done = await agent.run(["sh", "-c", script])
            assert done.exit_code == 0, done
            return done.stdout.decode()

        assert (await http_get(port)).strip() == IDENTITY_PAGE  # the user network knows the old MAC
        old_mac = (await sh("cat /sys/class/net/eth0/address")).strip()
        new_mac = "02:5e:11:22:33:44"
        assert old_mac != new_mac
        routes_before = await sh("ip -4 route")
        assert "default via 10.0.2.2 dev eth0" in routes_before, routes_before

        await agent.set_identity(os.urandom(64), mac=new_mac, hostname="fork-b")
        assert await sh("hostname") == "fork-b\n"
        assert await sh("cat /sys/class/net/eth0/address") == new_mac + "\n"
        assert "inet 10.0.2.15/24" in await sh("ip -4 addr show dev eth0")
        assert await sh("ip -4 route") == routes_before  # same routes, same metrics
        assert "UP" in (await sh("ip link show dev eth0")).split("<")[1].split(">")[0].split(",")
        assert (await http_get(port, attempts=25)).strip() == IDENTITY_PAGE

        # Entropy alone, again: the ioctls succeed every time (root in the guest; a wrong number
        # would be ENOTTY), and MAC, hostname and routes stay.
        await agent.set_identity(os.urandom(64))
        await agent.set_identity(os.urandom(512))
        assert await sh("hostname; cat /sys/class/net/eth0/address") == f"fork-b\n{new_mac}\n"

        # Refused before anything changes.
        for bad in ("01:00:5e:00:00:01", "00:00:00:00:00:00"):
            with pytest.raises(AgentError) as info:
                await agent.set_identity(os.urandom(64), mac=bad, hostname="never")
            assert info.value.errno == errno.EINVAL and "not a unicast address" in str(info.value)
        with pytest.raises(AgentError) as info:
            await agent.set_identity(os.urandom(513))
        assert info.value.errno == errno.EINVAL
        assert await sh("hostname; cat /sys/class/net/eth0/address") == f"fork-b\n{new_mac}\n"
        assert await sh("ip -4 route") == routes_before
