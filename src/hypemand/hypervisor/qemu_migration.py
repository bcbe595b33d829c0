"""Saving and loading a VM's device state: the QEMU half of standby, snapshots, restore and fork.

Guest RAM is a shared file mapping (memory-backend-file, share=on), so with QEMU's
x-ignore-shared migration capability the migration stream holds device state only: saving
costs the same for 256 MiB and 16 GiB. QEMU 7.2 has no ``file:`` URI; an ``exec:`` URI writes and
reads the state file. Launching the QEMU that loads a state is ``qemu.QemuHypervisor.restore``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import time
from pathlib import Path

from hypemand.errors import Conflict, InvalidState
from hypemand.fsutil import is_no_space
from hypemand.hypervisor.base import VMMError
from hypemand.hypervisor.qemu_cmdline import machine_type
from hypemand.hypervisor.qemu_launch import QemuLaunchRecord
from hypemand.hypervisor.qemu_vm import QUIT_TIMEOUT, QemuVMHandle, vmm_log_tail
from hypemand.hypervisor.storage import MIB, free_bytes, no_space

_IGNORE_SHARED = {"capability": "x-ignore-shared", "state": True}
MIGRATION_BANDWIDTH = 1 << 40
MIGRATION_TIMEOUT = 120.0
_MIGRATION_POLL = 0.002
# Room a device state file needs, with margin (measured: 75 KiB for a microvm guest, 750 KiB for
# q35). Below this much free space a save is refused before the VM is paused, and a failed save
# is reported as a full disk: the `cat` writing the file only tells QEMU its pipe broke, not why.
STATE_FILE_ROOM = 4 * MIB


async def prepare_migration(handle: QemuVMHandle) -> None:
    """Migration settings every save and restore uses: RAM in the shared file is not sent
    (x-ignore-shared), and no bandwidth limit (QEMU's default of 128 MiB/s applies to a
    stopped VM too). No announcement when a state is loaded: the guest would make it the moment
    it runs, on the one vCPU its agent needs to answer the restore; ``QemuVMHandle.announce``
    makes it once the restore is done (a fork, unplugged, has nothing to announce before its
    own identity)."""
    await handle.qmp("migrate-set-capabilities", {"capabilities": [_IGNORE_SHARED]})
    await handle.qmp("migrate-set-parameters", {"max-bandwidth": MIGRATION_BANDWIDTH, "announce-rounds": 0})
    handle.migration_ready = True


async def save_state(handle: QemuVMHandle, state_file: Path) -> None:
    """Pause the VM and write its device state to ``state_file``; see ``Hypervisor.save_state``."""
    if not handle.migration_ready:  # a VM adopted from a server that did not prepare it
        await prepare_migration(handle)
    directory = state_file.parent
    what = f"saving the device state of VM {handle.vm_id}"
    if await asyncio.to_thread(free_bytes, directory) < STATE_FILE_ROOM:
        raise no_space(what, directory, STATE_FILE_ROOM)  # refused before the VM is paused
    # Callers save running VMs (the instance layer checks): the pause below is ours to undo.
    await handle.qmp("stop")
    # A sibling of the caller's file: the rename into place stays on one filesystem.
    partial = state_file.with_name(f".{state_file.name}.partial")
    try:
        await asyncio.to_thread(partial.unlink, missing_ok=True)
        await handle.qmp("migrate", {"uri": f"exec:cat > {shlex.quote(str(partial))}"})
        await _wait_for_migration(handle, "saving the device state")
        await asyncio.to_thread(_fsync_and_rename, partial, state_file)
    except BaseException as exc:
        # Judged before the partial file is removed: that frees the space it took.
        full = is_no_space(exc) or (
            isinstance(exc, VMMError) and await asyncio.to_thread(free_bytes, directory) < STATE_FILE_ROOM
        )
        await asyncio.to_thread(partial.unlink, missing_ok=True)
        if handle.is_alive():
            with contextlib.suppress(VMMError, InvalidState):
                await handle.qmp("cont")
        if full:
            raise no_space(what, directory, STATE_FILE_ROOM) from exc
        raise


async def end_saved(handle: QemuVMHandle) -> None:
    """Quit a QEMU whose state was saved, keeping its RAM file for the restore."""
    with contextlib.suppress(VMMError, InvalidState):
        # QEMU may hang up before it answers; the exit wait decides.
        await handle.qmp("quit", timeout=QUIT_TIMEOUT)
    if not await handle.wait_exit(QUIT_TIMEOUT):
        await handle.kill(keep_memory=True)
    await handle.close()


def check_restorable(directory: Path, running_version: str) -> None:
    """Raise ``Conflict`` (``incompatible_snapshot``) if QEMU ``running_version`` cannot load the
    device state of the VM saved in ``directory``: device state does not load across versions."""
    launch = QemuLaunchRecord.load(directory)
    if launch is None:
        raise Conflict(f"{directory.name}: no launch record to restore from")
    if launch.qemu_version != running_version:
        raise Conflict(
            f"the saved VM was made by QEMU {launch.qemu_version}; this host runs QEMU {running_version}, "
            "which cannot load its device state",
            code="incompatible_snapshot",
        )
    if launch.machine != machine_type(launch.config.board):
        raise Conflict(f"the saved VM's board {launch.machine} does not match its recorded board",
                       code="incompatible_snapshot")


async def load_state(handle: QemuVMHandle, state_file: Path, *, nic_down: bool = False) -> None:
    """Load ``state_file`` into a QEMU started with ``-incoming defer`` and run the VM, with its
    NIC unplugged if ``nic_down`` (see ``Hypervisor.restore``). A failure kills that QEMU but
    keeps the RAM file, so the restore can be tried again."""
    try:
        # The launch prepared migration (x-ignore-shared), which the destination needs too.
        await handle.qmp("migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(state_file))}"})
        await _wait_for_incoming(handle)
        if nic_down and handle.has_nic:
            # Now, not before the load: loading sets the link from the saved device state. The
            # guest runs its first instruction with the NIC already unplugged.
            await handle.set_nic_link(False)
        await handle.qmp("cont")
    except BaseException:
        if handle.is_alive():
            await handle.kill(keep_memory=True)
        await handle.close()
        raise


async def _wait_for_migration(handle: QemuVMHandle, what: str) -> None:
    """Poll an outgoing migration until it completes; raise VMMError if it fails."""
    deadline = time.monotonic() + MIGRATION_TIMEOUT
    delay = _MIGRATION_POLL
    while True:
        info = await handle.qmp("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise VMMError(f"VM {handle.vm_id}: {what} failed: {info.get('error-desc', status)}")
        if time.monotonic() > deadline:
            with contextlib.suppress(VMMError, InvalidState):
                await handle.qmp("migrate_cancel")
            raise VMMError(f"VM {handle.vm_id}: {what} did not finish within {MIGRATION_TIMEOUT:.0f} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def _wait_for_incoming(handle: QemuVMHandle) -> None:
    """Wait until an incoming migration has loaded (the VM is then paused)."""
    deadline = time.monotonic() + MIGRATION_TIMEOUT
    delay = _MIGRATION_POLL
    while True:
        if not handle.is_alive():
            raise VMMError(f"VM {handle.vm_id}: QEMU exited while loading the saved state: "
                           f"{vmm_log_tail(handle.vmm_log_path)}")
        info = await handle.qmp("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status == "failed":
            detail = info.get("error-desc", status)
            raise VMMError(f"VM {handle.vm_id}: loading the saved state failed: {detail}")
        if time.monotonic() > deadline:
            raise VMMError(f"VM {handle.vm_id}: loading the saved state took over {MIGRATION_TIMEOUT:.0f} s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def _fsync_and_rename(partial: Path, final: Path) -> None:
    with open(partial, "rb") as state:
        os.fsync(state.fileno())
    os.replace(partial, final)
    fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
