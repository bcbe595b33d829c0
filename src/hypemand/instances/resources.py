"""What this server offers (``GET /capabilities``) and what it has given out (``GET /resources``),
answered from this host and its backends, never from constants that might not hold here."""

from __future__ import annotations

import os
import platform as platform_module
import stat
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from hypemand.hypervisor.base import Capabilities as BackendCapabilities
from hypemand.instances.admission import DiskClaim
from hypemand.instances.host import (
    CPU_OVERSUBSCRIPTION,
    DISK_OVERSUBSCRIPTION,
    MEMORY_OVERSUBSCRIPTION,
    HostCapacity,
    sparse_size,
)
from hypemand.instances.manager import InstanceManager
from hypemand.instances.networking import NETWORK_OVERSUBSCRIPTION, NetworkFacts

API_VERSION = "0.28.0"  # the official clients' version whose wire contract this server serves
SERVER_FEATURES = ["instances", "images", "volumes", "ingress", "exec", "logs"]


class CapabilitiesServer(BaseModel):
    version: str
    api_version: str


class CapabilitiesHost(BaseModel):
    os: str
    arch: str


class CapabilitiesRuntime(BaseModel):
    name: str
    available: bool
    features: list[str]


class CapabilitiesDefaultRuntime(BaseModel):
    name: str
    available: bool


class CapabilitiesNetwork(BaseModel):
    model: Literal["bridge", "nat"]
    guest_to_guest: bool
    gateway: str | None = None
    subnet: str | None = None


class CapabilitiesImages(BaseModel):
    platforms: list[str]
    default_platform: str


class Capabilities(BaseModel):
    server: CapabilitiesServer
    host: CapabilitiesHost
    default_runtime: CapabilitiesDefaultRuntime
    runtimes: list[CapabilitiesRuntime]
    network: CapabilitiesNetwork
    images: CapabilitiesImages
    features: list[str]


class ResourceStatus(BaseModel):
    type: str
    capacity: int
    effective_limit: int
    allocated: int
    available: int
    oversub_ratio: float
    source: str | None = None


class ResourceAllocation(BaseModel):
    instance_id: str
    instance_name: str
    cpu: int
    memory_bytes: int
    disk_bytes: int
    network_download_bps: int = 0
    network_upload_bps: int = 0


class DiskBreakdown(BaseModel):
    images_bytes: int
    overlays_bytes: int
    oci_cache_bytes: int = 0
    volumes_bytes: int = 0


class Resources(BaseModel):
    cpu: ResourceStatus
    memory: ResourceStatus
    disk: ResourceStatus
    network: ResourceStatus
    disk_breakdown: DiskBreakdown
    allocations: list[ResourceAllocation]


def _features(capabilities: BackendCapabilities) -> list[str]:
    names = {
        "snapshots": capabilities.snapshot,
        "standby": capabilities.standby,
        "fork": capabilities.fork,
        "pause": capabilities.pause,
        "hotplug-memory": capabilities.hotplug_memory,
        "balloon-control": capabilities.balloon,
        "vsock": capabilities.vsock,
        "gpu-passthrough": capabilities.gpu_passthrough,
        "disk-io-limit": capabilities.disk_io_limit,
    }
    return [name for name, offered in names.items() if offered]


def server_version() -> str:
    try:
        return version("hypemand")
    except PackageNotFoundError:
        return "0.0.0"


def capabilities(manager: InstanceManager) -> Capabilities:
    backend = manager.hypervisor.capabilities()
    features = _features(backend)
    facts = manager.network.facts()
    runtimes = [
        CapabilitiesRuntime(name=board.value, available=True, features=features)
        for board in manager.available_boards()
    ]
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform_module.machine(), platform_module.machine())
    return Capabilities(
        server=CapabilitiesServer(version=server_version(), api_version=API_VERSION),
        host=CapabilitiesHost(os="linux", arch=arch),
        default_runtime=CapabilitiesDefaultRuntime(name=runtimes[0].name, available=True),
        runtimes=runtimes,
        # Either way guests cannot reach each other: isolated bridge ports and no routing between
        # them, or QEMU's user-mode NIC, which NATs each guest alone.
        network=CapabilitiesNetwork(
            model=facts.model, guest_to_guest=False, gateway=facts.gateway, subnet=facts.subnet
        ),
        images=CapabilitiesImages(platforms=[manager.platform], default_platform=manager.platform),
        features=SERVER_FEATURES,
    )


@dataclass(frozen=True)
class Holding:
    """What one instance holds, as taken from the manager on the event loop."""

    instance_id: str
    instance_name: str
    active: bool  # a VMM runs: its vCPUs and memory are in use
    vcpus: int
    memory_bytes: int
    disk: DiskClaim  # what it may still take on the data disk (admission's rule)
    download_bps: int  # its bandwidth limits (0: not limited)
    upload_bps: int


@dataclass(frozen=True)
class ResourceInputs:
    """Everything :func:`resources` needs, copied out of the manager's live state, so that the
    blocking part can run in a worker thread while the event loop goes on changing that state."""

    capacity: Callable[[], HostCapacity]  # the host's, read from the file system
    writes_memory_file: Callable[[Path], bool]  # the hypervisor's: a VM's RAM file is its own
    images_dir: Path
    volumes_dir: Path | None  # the volumes' disks (volumes_bytes)
    data_dirs: tuple[Path, ...]  # what the server keeps on the data disk besides images
    holdings: tuple[Holding, ...]
    network: NetworkFacts


def resource_inputs(manager: InstanceManager) -> ResourceInputs:
    """Call on the event loop (it reads the manager's live instances; no blocking I/O)."""
    holdings = tuple(
        Holding(
            instance_id=record.id,
            instance_name=record.name,
            active=active,
            vcpus=record.vcpus,
            memory_bytes=record.memory_bytes + record.hotplug_bytes,
            disk=claim,
            download_bps=record.bandwidth_download or 0,
            upload_bps=record.bandwidth_upload or 0,
        )
        for record, active, claim in manager.allocations()
    )
    layout = manager.layout
    return ResourceInputs(
        capacity=manager.capacity,
        writes_memory_file=manager.hypervisor.writes_memory_file,
        images_dir=layout.images,
        volumes_dir=layout.volumes,
        data_dirs=(layout.guests, layout.snapshots),
        holdings=holdings,
        network=manager.network.facts(),
    )


def resources(inputs: ResourceInputs) -> Resources:
    """Blocking (statvfs, /proc/meminfo, file sizes): call it from a worker thread. It touches
    nothing but ``inputs`` and the files they name.

    Disk is answered as what this server can really use: its capacity is the free space plus
    what the server's own files already take (not the size of a file system others share), and
    its allocation is those files plus what instances may still write (overlays up to their
    size, RAM files in full) — the same promises admission counts."""
    capacity = inputs.capacity()
    allocations: list[ResourceAllocation] = []
    cpu = memory = overlays = promised = bandwidth = 0
    for holding in inputs.holdings:
        claim = holding.disk
        overlays += sparse_size(claim.overlay) + sum(sparse_size(path) for path, _ in claim.volume_overlays)
        promised += claim.open_promise(running=holding.active, writes_memory_file=inputs.writes_memory_file)
        with_memory = holding.active or claim.standby_record.exists()
        network = max(holding.download_bps, holding.upload_bps) if holding.active else 0
        if holding.active:
            cpu += holding.vcpus
            memory += holding.memory_bytes
            bandwidth += network
        allocations.append(
            ResourceAllocation(
                instance_id=holding.instance_id,
                instance_name=holding.instance_name,
                cpu=holding.vcpus if holding.active else 0,
                memory_bytes=holding.memory_bytes if holding.active else 0,
                disk_bytes=claim.overlays_bytes + (holding.memory_bytes if with_memory else 0),
                network_download_bps=holding.download_bps if holding.active else 0,
                network_upload_bps=holding.upload_bps if holding.active else 0,
            )
        )
    images = _tree_size(inputs.images_dir)
    volumes = _tree_size(inputs.volumes_dir) if inputs.volumes_dir is not None else 0
    own = images + volumes + sum(_tree_size(directory) for directory in inputs.data_dirs)

    def status(kind: str, total: int, ratio: float, used: int, source: str) -> ResourceStatus:
        limit = int(total * ratio)
        return ResourceStatus(
            type=kind,
            capacity=total,
            effective_limit=limit,
            allocated=used,
            available=max(0, limit - used),
            oversub_ratio=ratio,
            source=source,
        )

    return Resources(
        cpu=status("cpu", capacity.cpus, CPU_OVERSUBSCRIPTION, cpu, "os.cpu_count"),
        memory=status(
            "memory", capacity.memory_bytes, MEMORY_OVERSUBSCRIPTION, memory, "/proc/meminfo MemTotal"
        ),
        disk=status(
            "disk",
            capacity.disk_free_bytes + own,
            DISK_OVERSUBSCRIPTION,
            own + promised,
            "free space of the data directory's file system plus the server's own files",
        ),
        # Bytes per second; each running VM counts the larger of its two limits, as the reference.
        network=status("network", inputs.network.capacity, NETWORK_OVERSUBSCRIPTION, bandwidth,
                       inputs.network.source)
        if inputs.network.capacity
        else status("network", 0, 1.0, 0, inputs.network.source),
        disk_breakdown=DiskBreakdown(images_bytes=images, overlays_bytes=overlays, volumes_bytes=volumes),
        allocations=allocations,
    )


def _tree_size(root: Path) -> int:
    """Bytes the files under ``root`` occupy. Directories come and go while it walks (instances
    are created and deleted meanwhile): what vanished is simply not counted."""
    total = 0
    for directory, _, files in os.walk(root, onerror=lambda _error: None):
        for name in files:
            try:
                info = os.lstat(os.path.join(directory, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_blocks * 512
    return total
