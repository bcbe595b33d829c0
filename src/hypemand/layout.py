"""The data directory's layout: every path the server keeps state in is built here, and only here.

    <data_dir>/
      jwt-secret                 token signing secret (0600), unless JWT_SECRET is set
      images/                    the image domain (blobs, content, names, uploads, registry)
      hypervisor/                host-wide hypervisor caches (acceleration probe)
      guests/<instance id>/      one directory per instance (see InstancePaths)
      snapshots/<snapshot id>/   stored snapshots: snapshot.json and guest/ (see hypemand.snapshots)

An instance directory is shared by two owners with a fixed split: the instance domain owns
the record, the disks it writes and its operations log; the hypervisor owns the VM files
described by :class:`hypemand.hypervisor.base.VMPaths` (console and VMM logs, process record,
sockets, RAM file, launch record).
"""

from __future__ import annotations

from pathlib import Path

from hypemand.hypervisor.base import VMPaths

INSTANCE_RECORD = "instance.json"
OVERLAY_DISK = "overlay.raw"
CONFIG_DISK = "config.disk"
BOOT_LOCK = ".boot.lock"
OPERATIONS_LOG = "logs/hypeman.log"
STATE_FILE = "vm.state"  # device state of a saved VM (its RAM stays in the hypervisor's RAM file)
STANDBY_RECORD = "standby.json"  # present exactly while the instance is in Standby


class InstancePaths:
    """The files of one instance; ``vm`` is the hypervisor's share of the directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.vm = VMPaths(directory)

    @property
    def record(self) -> Path:
        return self.directory / INSTANCE_RECORD

    @property
    def overlay_disk(self) -> Path:
        return self.directory / OVERLAY_DISK

    @property
    def config_disk(self) -> Path:
        return self.directory / CONFIG_DISK

    @property
    def boot_lock(self) -> Path:
        return self.directory / BOOT_LOCK

    @property
    def operations_log(self) -> Path:
        return self.directory / OPERATIONS_LOG

    @property
    def state_file(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def standby_record(self) -> Path:
        return self.directory / STANDBY_RECORD

    @property
    def memory_file(self) -> Path:
        return self.vm.memory_file

    @property
    def launch_record(self) -> Path:
        return self.vm.launch_record

    @property
    def console_log(self) -> Path:
        return self.vm.console_log

    @property
    def vmm_log(self) -> Path:
        return self.vm.vmm_log


class DataLayout:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def jwt_secret(self) -> Path:
        return self.root / "jwt-secret"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def hypervisor_state(self) -> Path:
        return self.root / "hypervisor"

    @property
    def guests(self) -> Path:
        return self.root / "guests"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    def instance(self, instance_id: str) -> InstancePaths:
        return InstancePaths(self.guests / instance_id)
