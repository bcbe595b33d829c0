"""The hypervisor interface: what every backend (QEMU now, others later) offers the instance layer.

Two roles, as in Hypeman:
- a :class:`Hypervisor` (the "starter") launches a VM from a :class:`VMConfig`, re-attaches to one
  that survived a server restart (:meth:`Hypervisor.adopt`), and later restores and forks;
- a :class:`VMHandle` (the "client") controls one running VMM process.

Every VM lives in its own directory with a fixed layout (see :class:`VMPaths`). Backends keep all of
their runtime files there, so a directory copy is a complete description of a stopped VM.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hypemand.errors import DomainError, NotImplementedByBackend

# File names inside a VM directory. Socket names stay short: a Unix socket path is limited to
# 108 bytes, so VMMs are started with the VM directory as their working directory and given
# relative socket paths (see ``hypemand.unixsock`` for the host side).
CONSOLE_LOG = "logs/app.log"  # guest serial console
VMM_LOG = "logs/vmm.log"  # the VMM process' own stdout/stderr
PROCESS_RECORD = "vmm.json"  # identity of the running VMM process
# How the last VMM ended, written by its supervisor (which outlives the server, not the VMM).
VMM_EXIT_RECORD = "vmm-exit.json"
MEMORY_FILE = "memory.ram"  # guest RAM as a file (memory-backend-file): kept by standby
LAUNCH_RECORD = "qemu-config.json"  # how the VMM was launched, to relaunch it identically
CONTROL_SOCKET = "qemu.sock"  # the VMM's control channel (QMP)
START_LOCK = ".vmm.lock"  # flock held while a VMM is being started in the directory
DEFAULT_AGENT_SOCKET = "agent.sock"
# In the backend's host-wide state directory (not per VM):
ACCEL_DECISION = "qemu-accel.json"  # the cached acceleration probe result
VMM_SHIM_DIR = "vmm-shim"  # <hash of sources and compiler>/hypeman-vmm-shim: built supervisors
VMM_SHIM_BINARY = "hypeman-vmm-shim"

_VM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# virtio-blk serials are at most 20 bytes; keep them to characters that survive every layer.
_DISK_SERIAL = re.compile(r"^[A-Za-z0-9_.-]{1,20}$")
_SOCKET_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


class VMMError(DomainError):
    """The VMM failed to start, died unexpectedly, or its control channel failed."""

    status = 500
    code = "vmm_error"


class Board(StrEnum):
    """The virtual machine model. Both are QEMU boards for now."""

    QEMU_MICROVM = "qemu-microvm"  # QEMU microvm: virtio-mmio, no PCI, fastest to boot
    QEMU = "qemu"  # QEMU q35: PCI, needed later for passthrough and balloon


class Accel(StrEnum):
    KVM = "kvm"
    TCG = "tcg"  # software emulation; the only working choice on PVM hosts


class DiskFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"


class ForwardProtocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"


class VMStatus(StrEnum):
    """Run state of a VM: QEMU's ``query-status`` values plus two of our own."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # guest powered off but the VMM is still there (-no-shutdown)
    PRELAUNCH = "prelaunch"
    INMIGRATE = "inmigrate"  # waiting for or receiving an incoming migration (restore)
    POSTMIGRATE = "postmigrate"  # an outgoing migration (standby/snapshot) finished
    FINISH_MIGRATE = "finish-migrate"
    SAVE_VM = "save-vm"
    RESTORE_VM = "restore-vm"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    DEBUG = "debug"
    COLO = "colo"
    EXITED = "exited"  # the VMM process is gone
    UNKNOWN = "unknown"  # the process lives but its control socket did not answer in time


class DiskIOStatus(StrEnum):
    """A disk's I/O state as the VMM saw it last (QEMU's ``io-status``): why a VM is in io-error."""

    OK = "ok"
    FAILED = "failed"  # an I/O error other than a full host filesystem
    NOSPACE = "nospace"  # the host filesystem holding the disk image is full


class VMMExit(BaseModel):
    """``vmm-exit.json``: how a VMM process ended, recorded by its supervisor when it happened,
    whether or not a server was watching. Exactly one of ``code`` and ``signal`` is set."""

    pid: int
    start_time: int | None = Field(default=None, description="/proc/<pid>/stat field 22 of the VMM")
    code: int | None = None  # the exit code, when it exited by itself
    signal: str | None = None  # e.g. "SIGKILL", "SIGBUS", when a signal ended it
    signal_number: int | None = None
    core_dumped: bool = False
    at: datetime  # when the supervisor saw it end (UTC)
    detail: str | None = None  # the last line the VMM wrote to its log in that run, if any

    @property
    def clean(self) -> bool:
        """Exited by itself with code 0 (a guest power-off or a ``quit``)."""
        return self.code == 0

    def describe(self) -> str:
        """``exited with code 1: <detail>`` or ``killed by SIGBUS``: for logs and ``state_error``."""
        how = f"killed by {self.signal}" if self.signal is not None else f"exited with code {self.code}"
        return f"{how}: {self.detail}" if self.detail else how


def read_vmm_exit(directory: Path) -> VMMExit | None:
    """How the last VMM of the VM in ``directory`` ended, or None: still running, never started
    since exit records exist, or its supervisor could not write (it was killed too). A launch
    removes the previous record first, so a record is always about the last launched VMM.
    Blocking (a small file read)."""
    try:
        return VMMExit.model_validate_json(VMPaths(directory).vmm_exit_record.read_bytes())
    except (FileNotFoundError, ValueError):
        return None


class ShutdownOutcome(StrEnum):
    """How :meth:`VMHandle.shutdown` ended the VM."""

    ALREADY_EXITED = "already-exited"
    GUEST_POWEROFF = "guest-poweroff"  # the guest reacted to the ACPI power button
    VMM_QUIT = "vmm-quit"  # the VMM was asked to quit (guest did not power off in time)
    KILLED = "killed"  # SIGKILL


class Capabilities(BaseModel):
    """What a backend can do *as implemented here*; the API's /capabilities derives from it."""

    model_config = ConfigDict(frozen=True)

    pause: bool = False
    graceful_shutdown: bool = False
    snapshot: bool = False  # stop + save device state / RAM to files
    standby: bool = False  # snapshot, then end the VMM; restore later
    live_snapshot: bool = False  # snapshot while the guest keeps running
    fork: bool = False
    hotplug_memory: bool = False
    balloon: bool = False
    vsock: bool = False
    gpu_passthrough: bool = False
    disk_io_limit: bool = False
    user_networking: bool = False
    tap_networking: bool = False


class DiskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Path
    readonly: bool = False
    format: DiskFormat = DiskFormat.RAW
    # The guest finds its disks by serial (hm-root, hm-overlay, hm-config, hm-vol-<id>), never
    # by device order.
    serial: str

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("disk path must be absolute")
        return value

    @field_validator("serial")
    @classmethod
    def _serial_ok(cls, value: str) -> str:
        if not _DISK_SERIAL.match(value):
            raise ValueError("disk serial must be 1-20 characters of [A-Za-z0-9_.-]")
        return value


class PortForward(BaseModel):
    """A host port on 127.0.0.1 forwarded to a guest port (user-mode networking)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host_port: int = Field(ge=1, le=65535)
    guest_port: int = Field(ge=1, le=65535)
    protocol: ForwardProtocol = ForwardProtocol.TCP


class VMConfig(BaseModel):
    """Everything needed to launch a VM, and to relaunch it identically when it is restored."""

    model_config = ConfigDict(extra="forbid")

    vm_id: str
    directory: Path
    board: Board = Board.QEMU_MICROVM
    vcpus: int = Field(default=1, ge=1, le=64)
    memory_mib: int = Field(default=256, ge=32, le=1 << 20)
    # None: the backend resolves it (probe, cached) at start and records the resolved value.
    accel: Accel | None = None
    kernel: Path
    initrd: Path | None = None
    # Appended after the backend's own arguments (console, panic, clock fixes).
    kernel_args: list[str] = Field(default_factory=list)
    disks: list[DiskConfig] = Field(default_factory=list)
    # File name in ``directory``; the guest agent's virtio-serial port is bridged to it.
    agent_socket: str = DEFAULT_AGENT_SOCKET
    user_network: bool = False
    port_forwards: list[PortForward] = Field(default_factory=list)
    # A NIC on the VM's TAP, which lives in the network's namespace: the backend gets an open
    # descriptor from its ``tap_opener`` at every launch (start, restore, a fork's restore).
    tap_network: bool = False
    # The NIC's MAC (lower case, unicast) for either NIC kind; None: ``guest_mac(vm_id)``.
    nic_mac: str | None = None
    # A memory balloon (virtio-balloon): the host can take guest memory back while the VM runs.
    # False in the launch records of VMs launched before it existed: their saved device state
    # has none, so they restore without one.
    balloon: bool = False

    @field_validator("vm_id")
    @classmethod
    def _vm_id_ok(cls, value: str) -> str:
        if not _VM_ID.match(value):
            raise ValueError("vm_id must be 1-64 characters of [A-Za-z0-9_.-], starting alphanumeric")
        return value

    @field_validator("directory", "kernel", "initrd")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError("path must be absolute")
        return value

    @field_validator("agent_socket")
    @classmethod
    def _socket_name_ok(cls, value: str) -> str:
        if not _SOCKET_NAME.match(value):
            raise ValueError("agent_socket must be a plain file name of at most 40 characters")
        return value

    @field_validator("nic_mac")
    @classmethod
    def _mac_ok(cls, value: str | None) -> str | None:
        return None if value is None else unicast_mac(value)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        serials = [disk.serial for disk in self.disks]
        if len(serials) != len(set(serials)):
            raise ValueError("disk serials must be unique")
        if self.user_network and self.tap_network:
            raise ValueError("a VM has one NIC: user_network or tap_network, not both")
        if self.port_forwards and not self.user_network:
            raise ValueError("port forwards need user_network")
        ports = [(fwd.protocol, fwd.host_port) for fwd in self.port_forwards]
        if len(ports) != len(set(ports)):
            raise ValueError("host ports must be unique per protocol")
        return self

    @property
    def paths(self) -> VMPaths:
        return VMPaths(self.directory, agent_socket=self.agent_socket)


def unicast_mac(value: str) -> str:
    """``value`` as six lower-case octets (``02:00:00:0a:0b:0c``); ValueError unless it is a
    unicast address other than all zeros (a NIC cannot use a group address)."""
    mac = value.lower().replace("-", ":")
    if not _MAC.match(mac):
        raise ValueError(f"{value!r} is not a MAC address (six octets like 02:00:00:0a:0b:0c)")
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        raise ValueError(f"{value} is not a unicast MAC address")
    return mac


class VMPaths:
    """Where a VM's files live inside its directory."""

    def __init__(self, directory: Path, agent_socket: str = DEFAULT_AGENT_SOCKET) -> None:
        self.directory = directory
        self.agent_socket_name = agent_socket

    @property
    def console_log(self) -> Path:
        return self.directory / CONSOLE_LOG

    @property
    def vmm_log(self) -> Path:
        return self.directory / VMM_LOG

    @property
    def agent_socket(self) -> Path:
        return self.directory / self.agent_socket_name

    @property
    def process_record(self) -> Path:
        return self.directory / PROCESS_RECORD

    @property
    def vmm_exit_record(self) -> Path:
        return self.directory / VMM_EXIT_RECORD

    @property
    def memory_file(self) -> Path:
        return self.directory / MEMORY_FILE

    @property
    def launch_record(self) -> Path:
        return self.directory / LAUNCH_RECORD

    @property
    def control_socket(self) -> Path:
        return self.directory / CONTROL_SOCKET

    @property
    def start_lock(self) -> Path:
        return self.directory / START_LOCK


class HypervisorStatePaths:
    """The backend's host-wide state: caches shared by every VM of one data directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def per_user_default(cls) -> HypervisorStatePaths:
        """For a backend given no state directory (tools that only ask for the version)."""
        return cls(Path(tempfile.gettempdir()) / f"hypemand-hypervisor-{os.getuid()}")

    @property
    def accel_decision(self) -> Path:
        return self.directory / ACCEL_DECISION

    def vmm_shim(self, version: str) -> Path:
        """The VMM supervisor built from sources and compiler identified by ``version``."""
        return self.directory / VMM_SHIM_DIR / version / VMM_SHIM_BINARY


class VMHandle(ABC):
    """Control of one running VMM process.

    A handle owns at most one control connection. Dropping or closing a handle never stops the VM;
    only :meth:`shutdown` and :meth:`kill` do.
    """

    config: VMConfig

    @property
    @abstractmethod
    def pid(self) -> int: ...

    @property
    def vm_id(self) -> str:
        return self.config.vm_id

    @property
    def directory(self) -> Path:
        return self.config.directory

    @property
    def console_log_path(self) -> Path:
        return self.config.paths.console_log

    @property
    def vmm_log_path(self) -> Path:
        return self.config.paths.vmm_log

    @property
    def agent_socket_path(self) -> Path:
        """May exceed the Unix socket path limit: connect with ``hypemand.unixsock.connect_unix``."""
        return self.config.paths.agent_socket

    @abstractmethod
    def is_alive(self) -> bool:
        """True while the VMM process exists (a zombie counts as exited)."""

    @abstractmethod
    async def status(self, timeout: float = 2.0) -> VMStatus: ...  # noqa: ASYNC109

    @abstractmethod
    async def pause(self) -> None: ...

    @abstractmethod
    async def resume(self) -> None: ...

    @abstractmethod
    async def shutdown(self, timeout: float = 10.0) -> ShutdownOutcome:  # noqa: ASYNC109
        """Ask the guest to power off; after ``timeout`` tell the VMM to quit; then SIGKILL."""

    @abstractmethod
    async def kill(self, keep_memory: bool = False) -> None:
        """SIGKILL the VMM process and wait until it is gone. Its RAM file is removed unless
        ``keep_memory`` (a failed restore must leave a standby VM restorable)."""

    @abstractmethod
    async def wait_exit(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait for the VMM process to end. Returns False if ``timeout`` passed first."""

    async def exit_info(self, timeout: float = 5.0) -> VMMExit | None:  # noqa: ASYNC109
        """How the VMM ended: None while it runs, or when nothing recorded its end. After the
        process is gone, waits up to ``timeout`` for its supervisor to finish the record."""
        if self.is_alive():
            return None
        return await asyncio.to_thread(read_vmm_exit, self.directory)

    async def set_nic_link(self, up: bool) -> None:
        """Plug (``up``) or unplug the VM's NIC: while unplugged, no frame goes in or out and the
        guest sees its carrier off. See :meth:`Hypervisor.restore` (``nic_down``)."""
        raise NotImplementedByBackend(f"VM {self.vm_id}: this backend cannot change the NIC's link")

    async def announce(self) -> None:
        """Tell the network where the VM's NIC now is (a RARP, and the guest's own gratuitous ARP
        where its driver can): what a restored VM does once it runs (see :meth:`Hypervisor.restore`).
        Nothing for a VM without a NIC, or a backend whose restore announces by itself."""
        return None

    def balloon_refusal(self, *, inflate: bool) -> str | None:
        """Why the guest's memory target cannot be set on this VM (``inflate``: below what the guest
        has now), or None when it can."""
        return "this backend has no memory balloon"

    async def guest_memory_bytes(self) -> int:
        """The memory the guest has now: its RAM less what its balloon holds."""
        raise NotImplementedByBackend(f"VM {self.vm_id}: this backend has no memory balloon")

    async def set_guest_memory_target(self, target_bytes: int) -> None:
        """Ask the guest to hold ``target_bytes`` of its RAM (at most its size), the rest in its
        balloon, where the host takes it back. The guest follows in its own time; returns at once.
        ``InvalidState`` when :meth:`balloon_refusal` names a reason."""
        raise NotImplementedByBackend(f"VM {self.vm_id}: this backend has no memory balloon")

    async def reserve_guest_memory(self) -> None:
        """Reserve again the RAM file's blocks the balloon gave back (see ``storage``): guest RAM
        must not SIGBUS on a full disk when the balloon deflates."""
        return None

    @abstractmethod
    async def disk_io_status(self) -> dict[str, DiskIOStatus]:
        """Each disk's I/O state by serial. A VM in ``VMStatus.IO_ERROR`` has at least one disk
        not OK: ``NOSPACE`` means its host filesystem is full; once there is space again,
        ``resume()`` retries the failed writes and the guest continues."""

    @abstractmethod
    async def close(self) -> None:
        """Release the control connection and OS resources. The VM keeps running."""


class Hypervisor(ABC):
    """A VMM backend: launches VMs and re-attaches to running ones."""

    name: ClassVar[str]

    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abstractmethod
    def version(self) -> str:
        """The VMM's version, e.g. ``7.2.22``. Recorded so restores can refuse a mismatch."""

    @abstractmethod
    async def start(self, config: VMConfig) -> VMHandle:
        """Boot a VM. Raises ``Conflict`` if a VMM for ``config.directory`` is already running,
        ``InsufficientStorage`` if its RAM file cannot be reserved (then nothing is started or
        left behind)."""

    @abstractmethod
    async def adopt(self, directory: Path) -> VMHandle | None:
        """Re-attach to the VMM recorded in ``directory``; None if it is not running any more."""

    async def reap_orphans(self, guests_root: Path) -> Sequence[object]:
        """End VMM processes running a VM directory under ``guests_root`` that no record claims
        (a server that died between spawning and recording them). Returns what it ended."""
        return []

    # Standby, snapshots and fork. A VM's RAM already lives in a file in its directory, so saving
    # a VM writes its device state only; the RAM file is kept, copied or mapped as it is.

    async def save_state(self, handle: VMHandle, state_file: Path) -> None:
        """Pause the VM and write its device state to ``state_file`` (RAM stays in its file). The VM
        is left paused: ``handle.resume()`` continues it (a snapshot), ``end_saved`` ends it
        (standby). Only for a running VM; if saving fails, it is resumed before the error is raised:
        ``InsufficientStorage`` when the state file's filesystem is (nearly) full."""
        raise NotImplementedByBackend(f"{self.name} does not support snapshots")

    async def end_saved(self, handle: VMHandle) -> None:
        """End a VMM whose state was saved, keeping its RAM file for the restore."""
        raise NotImplementedByBackend(f"{self.name} does not support standby")

    def check_restorable(self, directory: Path) -> None:
        """Raise ``Conflict`` if the saved VM in ``directory`` cannot be restored by this backend
        as it is now (another VMM version or board), before anything is started."""
        raise NotImplementedByBackend(f"{self.name} does not support restore")

    async def restore(self, directory: Path, state_file: Path, *, nic_down: bool = False) -> VMHandle:
        """Relaunch the VM recorded in ``directory`` from ``state_file`` and its RAM file, and run it.
        A VM's own RAM file is reserved first (``InsufficientStorage`` if it cannot be; the saved VM
        stays as it was); a fork's, mapped copy-on-write, needs no space.

        ``nic_down``: the VM runs with its NIC unplugged until ``handle.set_nic_link(True)``. For a
        fork: until the agent gave it its own identity, its guest still has the source's MAC and
        IP, and whatever it sends (the announcements every restored guest makes, a retransmit)
        would teach the network that the source lives behind the fork's port.

        The restored VM does not announce itself yet (the guest would do it on the vCPU its agent
        needs to answer the restore): the caller calls ``handle.announce()`` once the restore is
        done, and for a fork once its NIC is plugged in."""
        raise NotImplementedByBackend(f"{self.name} does not support restore")

    def prepare_fork(self, directory: Path, fork: ForkIdentity) -> None:
        """Make the saved VM copied into ``directory`` a new VM: the fork's id, and its RAM file
        mapped copy-on-write, so that many forks share one file and never write to it. Blocking."""
        raise NotImplementedByBackend(f"{self.name} does not support fork")

    def writes_memory_file(self, directory: Path) -> bool:
        """Whether the VM in ``directory`` writes its RAM file (so its blocks are reserved in
        full), rather than mapping a file it shares privately, as a fork does. Blocking (reads
        the launch record); True when nothing says otherwise."""
        return True


class ForkIdentity(BaseModel):
    """What makes a copied VM a different VM."""

    model_config = ConfigDict(frozen=True)

    vm_id: str
    # The fork's NIC MAC (an allocated one for a TAP); None: ``guest_mac(vm_id)``.
    mac: str | None = None

    @field_validator("mac")
    @classmethod
    def _mac_ok(cls, value: str | None) -> str | None:
        return None if value is None else unicast_mac(value)
