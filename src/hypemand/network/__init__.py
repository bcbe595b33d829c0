"""The VM network of one server: configuration, address allocation, and the host side (bridge,
TAPs, NAT rules, bandwidth shaping) inside a network namespace. See README.md beside this file."""

from hypemand.network.addresses import AddressesExhausted, Allocation, InstanceAddress, allocate
from hypemand.network.config import NetworkConfig, NetworkConfigError, tap_name
from hypemand.network.host import NetworkHost, ReconcileReport
from hypemand.network.shaping import BandwidthLimits
from hypemand.network.tap import TapError

__all__ = [
    "AddressesExhausted",
    "Allocation",
    "BandwidthLimits",
    "InstanceAddress",
    "NetworkConfig",
    "NetworkConfigError",
    "NetworkHost",
    "ReconcileReport",
    "TapError",
    "allocate",
    "tap_name",
]
