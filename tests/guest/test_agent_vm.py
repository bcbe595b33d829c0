"""The agent inside a real guest: QEMU (TCG) boots the system kernel/initrd with H1's PID 1 and a
busybox image; the client talks through the real virtio-serial port and QEMU's chardev socket.

One VM serves the whole module (boots are expensive on 2 shared cores).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from hypemand.guest.client import AgentClient, AgentDisconnected, AgentError, GetEntry
from hypemand.guest.config_disk import GuestConfig, make_overlay_disk, write_config_disk
from hypemand.guest.markers import Marker, wait_for_markers
from hypemand.guest.models import EntryType
from hypemand.hypervisor.base import DiskConfig, VMConfig
from hypemand.hypervisor.qemu import QemuHypervisor, QemuVMHandle
from hypemand.system.files import ensure_system_files
from tests.boot.support import make_busybox_tree, make_ext4_image

pytestmark = [pytest.mark.vm, pytest.mark.asyncio(loop_scope="module")]

BOOT_TIMEOUT = 180.0


def _system_dir() -> Path:
    return Path(os.environ.get("HYPEMAND_SYSTEM_DIR", "/var/lib/hypemand/system"))


@dataclass
class AgentVM:
    handle: QemuVMHandle
    client: AgentClient


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vm(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[AgentVM]:
    files = await asyncio.to_thread(ensure_system_files, _system_dir())
    work = tmp_path_factory.mktemp("agent-vm")
    tree = make_busybox_tree(work / "tree")
    root = make_ext4_image(tree, work / "root.ext4")
    overlay = work / "overlay.raw"
    make_overlay_disk(overlay, 64 << 20)
    config_disk = work / "config.raw"
    write_config_disk(config_disk, GuestConfig(cmd=["/bin/sleep", "100000"], env={"PATH": "/bin"}))
    config = VMConfig(
        vm_id="agent-vm",
        directory=work / "vm",
        memory_mib=256,
        kernel=files.kernel_path,
        initrd=files.initrd_path,
        disks=[
            DiskConfig(path=root, readonly=True, serial="hm-root"),
            DiskConfig(path=overlay, serial="hm-overlay"),
            DiskConfig(path=config_disk, readonly=True, serial="hm-config"),
        ],
    )
    handle = await QemuHypervisor(state_dir=work / "hv").start(config)
    agent_vm: AgentVM | None = None
    try:
        await wait_for_markers(handle.console_log_path, [Marker.AGENT_READY], BOOT_TIMEOUT, handle.is_alive)
        agent_vm = AgentVM(handle, await AgentClient.connect(handle.agent_socket_path, timeout=60))
        yield agent_vm
    finally:
        if agent_vm is not None:
            await agent_vm.client.close()
        if handle.is_alive():
            await handle.kill()
        await handle.close()


async def test_exec_runs_in_the_image(vm: AgentVM) -> None:
    done = await vm.client.run(["sh", "-c", "ls /bin/busybox; hostname; echo oops >&2; exit 3"])
    assert done.stdout == b"/bin/busybox\nhypeman\n"
    assert (done.stderr, done.exit_code) == (b"oops\n", 3)


async def test_missing_program(vm: AgentVM) -> None:
    with pytest.raises(AgentError) as info:
        await vm.client.exec(["no-such-program"])
    assert info.value.errno == 2


async def test_stdin_round_trip(vm: AgentVM) -> None:
    data = os.urandom(1 << 20)
    done = await vm.client.run(["cat"], input=data)
    assert done.stdout == data


async def test_timeout(vm: AgentVM) -> None:
    done = await vm.client.run(["sleep", "60"], timeout=1.0)
    assert done.timed_out and done.signal == 9


async def test_tty_resize(vm: AgentVM) -> None:
    proc = await vm.client.exec(["sh", "-c", "stty size; read x; stty size"], tty=True, rows=24, cols=80)
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


async def test_eight_concurrent_sessions(vm: AgentVM) -> None:
    async def one(i: int) -> None:
        data = os.urandom(100_000 + i)
        done = await vm.client.run(["sh", "-c", f"cat; echo s{i} >&2"], input=data)
        assert (done.stdout, done.stderr) == (data, f"s{i}\n".encode())

    await asyncio.gather(*(one(i) for i in range(8)))


async def test_put_get_5mb(vm: AgentVM) -> None:
    data = os.urandom(5 << 20)
    mtime_ns = 1_700_000_000_000_000_000
    assert await vm.client.put_file("/tmp/up/big.bin", data, mode=0o640, mtime_ns=mtime_ns) == len(data)
    entries = []
    async for item in vm.client.get("/tmp/up/big.bin"):
        assert isinstance(item, GetEntry)
        entries.append((item, await item.read_all()))  # data must be read before the next entry
    [(item, content)] = entries
    assert content == data
    assert (item.header.mode, item.header.mtime_ns, item.header.size) == (0o640, mtime_ns, len(data))
    done = await vm.client.run(["sh", "-c", "md5sum /tmp/up/big.bin"])
    assert done.stdout.split()[0].decode() == hashlib.md5(data).hexdigest()


async def test_tree_and_stat(vm: AgentVM) -> None:
    c = vm.client
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


async def test_set_clock(vm: AgentVM) -> None:
    target = 2_000_000_000  # 2033-05-18
    await vm.client.set_clock(target * 1_000_000_000)
    seen = int((await vm.client.run(["date", "+%s"])).stdout)
    await vm.client.set_clock()  # back to the host's time
    assert target <= seen < target + 60
    now = int((await vm.client.run(["date", "+%s"])).stdout)
    assert abs(now - time.time()) < 60


async def test_reconnect_drops_old_sessions(vm: AgentVM) -> None:
    sleeper = await vm.client.exec(["sleep", "1000"])
    await vm.client.reconnect(timeout=60)
    with pytest.raises(AgentDisconnected):
        await sleeper.wait()
    # The guest killed the process of the session the old connection left behind.
    for _ in range(100):
        if (await vm.client.run(["kill", "-0", str(sleeper.pid)])).exit_code != 0:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the dropped session's process is still alive")


async def test_new_client_after_close(vm: AgentVM) -> None:
    await vm.client.close()
    vm.client = await AgentClient.connect(vm.handle.agent_socket_path, timeout=60)
    assert (await vm.client.run(["echo", "back"])).stdout == b"back\n"
