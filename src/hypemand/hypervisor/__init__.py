"""VMM backends behind one interface (``base``); QEMU is the first (``qemu``)."""

from hypemand.hypervisor.base import (
    Accel,
    Board,
    Capabilities,
    DiskConfig,
    DiskFormat,
    ForwardProtocol,
    Hypervisor,
    PortForward,
    ShutdownOutcome,
    VMConfig,
    VMHandle,
    VMMError,
    VMStatus,
)

__all__ = [
    "Accel",
    "Board",
    "Capabilities",
    "DiskConfig",
    "DiskFormat",
    "ForwardProtocol",
    "Hypervisor",
    "PortForward",
    "ShutdownOutcome",
    "VMConfig",
    "VMHandle",
    "VMMError",
    "VMStatus",
]
