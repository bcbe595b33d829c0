"""Per-VM bandwidth limits with tc, through pyroute2. Blocking: run in the namespace's thread.

Download (world -> VM) leaves the host through the VM's TAP, so a TBF on the TAP's root
shapes it: ``rate``, a bucket of ``rate x multiplier / 250`` bytes (the reference's: 4 ms of
traffic per unit of multiplier, at least one full frame), at most 50 ms of queue.

Upload (VM -> world) enters the host through the TAP, where nothing can be queued, so the
TAP's ingress redirects every frame to one IFB device per server (``<bridge>-up``) and the
IFB's egress shapes it with HTB (the reference's model, on the direction where upload
actually flows):

    1:      htb, unclassified traffic (ARP, spoofed sources) to 1:ffff
    1:1     the server's upload capacity (rate = ceil = capacity)
    1:N     one class per VM: rate = its upload, ceil = rate x multiplier (it borrows up to
            that while the capacity allows), N = its address's offset in the subnet
    1:ffff  the default class: rate 1% of capacity, ceil capacity

A u32 filter on the IFB sends a VM's source address to its class. The VM's offset N is also
the priority of the redirect filter on its TAP, so the kernel alone tells which class belongs
to which TAP: no record of classes is kept, strays are classes no TAP points at, and
deleting a TAP's class needs nothing but the TAP. Offsets fit 16 bits because the subnet is
at most a /16 (the network address 0, the gateway 1 and the broadcast address are never VMs'
offsets, so 1:1 and 1:ffff cannot clash).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

TBF_LATENCY = "50ms"
MIN_BURST = 1540  # one full Ethernet frame and its header
ROOT_HANDLE = 0x10000  # 1:
CAPACITY_CLASS = 0x10001  # 1:1
DEFAULT_MINOR = 0xFFFF
INGRESS_HANDLE = 0xFFFF0000  # ffff:
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
RATE_FIELD_MAX = (1 << 32) - 1  # TBF's rate is 32 bits of bytes per second (34 Gbit/s)


@dataclass(frozen=True)
class BandwidthLimits:
    """Bytes per second; None leaves that direction unshaped."""

    download: int | None = None
    upload: int | None = None

    def __post_init__(self) -> None:
        for name in ("download", "upload"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= RATE_FIELD_MAX:
                raise ValueError(f"{name} rate {value} B/s must be between 1 and {RATE_FIELD_MAX}")


def download_burst(rate: int, multiplier: int) -> int:
    """The TBF bucket in bytes for a download rate in bytes per second."""
    return max(rate * multiplier // 250, MIN_BURST)


def upload_ceiling(rate: int, multiplier: int, capacity: int) -> int:
    """How far an upload class may borrow: its rate x multiplier, within the capacity."""
    return max(rate, min(rate * multiplier, capacity))


def htb_burst(rate: int) -> int:
    """Bytes a class may send at once: 1 ms of its rate, at least a frame. (tc's default,
    rate/HZ + MTU, is one frame on a high-resolution-timer kernel: too little at Gbit/s.)"""
    return max(rate // 1000, MIN_BURST)


def _htb_class(ipr: IPRoute, index: int, classid: int, parent: int, rate: int, ceil: int) -> None:
    ipr.tc("replace-class", "htb", index=index, handle=classid, parent=parent, rate=rate, ceil=ceil,
           burst=htb_burst(rate), cburst=htb_burst(ceil))


def _ignore(codes: tuple[int, ...], function: Any, *args: Any, **kwargs: Any) -> None:
    try:
        function(*args, **kwargs)
    except NetlinkError as err:
        if err.code not in codes:
            raise


_GONE = (errno.ENOENT, errno.EINVAL, errno.ENODEV)


# ---- download ------------------------------------------------------------------------------------


def set_download(ipr: IPRoute, tap_index: int, rate: int | None, multiplier: int) -> None:
    if rate is None:
        _ignore(_GONE, ipr.tc, "del", index=tap_index, handle=0, parent=0xFFFFFFFF)
        return
    ipr.tc("replace", "tbf", index=tap_index, handle=ROOT_HANDLE, rate=rate,
           burst=download_burst(rate, multiplier), latency=TBF_LATENCY)


# ---- upload: the IFB -----------------------------------------------------------------------------


def ensure_upload_root(ipr: IPRoute, ifb_name: str, capacity: int) -> int:
    """The IFB, up, with its HTB root, capacity class and default class. Returns its index."""
    found = ipr.link_lookup(ifname=ifb_name)
    if not found:
        ipr.link("add", ifname=ifb_name, kind="ifb")
        found = ipr.link_lookup(ifname=ifb_name)
    index = int(found[0])
    ipr.link("set", index=index, state="up")
    root = [q for q in ipr.get_qdiscs(index) if q.get("parent") == 0xFFFFFFFF]
    if not root or root[0].get_attr("TCA_KIND") != "htb":
        ipr.tc("replace", "htb", index=index, handle=ROOT_HANDLE, default=DEFAULT_MINOR)
    capacity = min(capacity, RATE_FIELD_MAX)
    _htb_class(ipr, index, CAPACITY_CLASS, ROOT_HANDLE, capacity, capacity)
    _htb_class(ipr, index, ROOT_HANDLE | DEFAULT_MINOR, CAPACITY_CLASS, max(capacity // 100, 1), capacity)
    return index


def _prio(filter_msg: Any) -> int:
    return int(filter_msg["info"]) >> 16


def tap_upload_offset(ipr: IPRoute, tap_index: int) -> int | None:
    """The offset a TAP's upload is classed under (its redirect filter's priority), if any."""
    try:
        filters = ipr.get_filters(tap_index, parent=INGRESS_HANDLE)
    except NetlinkError as err:
        if err.code in _GONE:
            return None
        raise
    prios = {_prio(f) for f in filters if f.get_attr("TCA_KIND") == "u32"}
    return min(prios) if prios else None


def set_upload(ipr: IPRoute, tap_index: int, ifb_index: int, offset: int, ip: IPv4Address,
               rate: int | None, multiplier: int, capacity: int) -> None:
    """Class the VM's upload under 1:offset at ``rate`` (or stop shaping it for None)."""
    previous = tap_upload_offset(ipr, tap_index)
    if previous is not None:
        release_upload(ipr, ifb_index, previous)
        _ignore(_GONE, ipr.tc, "del", "ingress", index=tap_index, handle=INGRESS_HANDLE)
    if rate is None:
        return
    if not 1 < offset < DEFAULT_MINOR:
        raise ValueError(f"address offset {offset} cannot name an upload class")
    classid = ROOT_HANDLE | offset
    _htb_class(ipr, ifb_index, classid, CAPACITY_CLASS, rate,
               upload_ceiling(rate, multiplier, min(capacity, RATE_FIELD_MAX)))
    # fq_codel keeps the class's queue short when the kernel has it; HTB's default leaf
    # (a FIFO) works everywhere else.
    _ignore((errno.ENOENT, errno.EOPNOTSUPP, errno.EINVAL), ipr.tc, "replace", "fq_codel",
            index=ifb_index, parent=classid)
    source = int(ip)
    ipr.tc("add-filter", "u32", index=ifb_index, parent=ROOT_HANDLE, prio=offset,
           protocol=ETH_P_IP, target=classid,
           keys=[f"0x{source:08x}/0xffffffff+12"])
    ipr.tc("add", "ingress", index=tap_index, handle=INGRESS_HANDLE)
    ipr.tc("add-filter", "u32", index=tap_index, parent=INGRESS_HANDLE, prio=offset,
           protocol=ETH_P_ALL, target=classid, keys=["0x0/0x0+0"],
           action={"kind": "mirred", "direction": "egress", "action": "redirect",
                   "ifindex": ifb_index})


def release_upload(ipr: IPRoute, ifb_index: int, offset: int) -> None:
    """Remove the IFB's filter and class for an offset (absent ones are fine)."""
    _ignore(_GONE, ipr.tc, "del-filter", index=ifb_index, parent=ROOT_HANDLE, prio=offset,
            protocol=ETH_P_IP)
    _ignore(_GONE, ipr.tc, "del-class", index=ifb_index, handle=ROOT_HANDLE | offset)


def upload_class_offsets(ipr: IPRoute, ifb_index: int) -> set[int]:
    """Offsets of the per-VM classes present on the IFB."""
    minors = {int(c["handle"]) & 0xFFFF for c in ipr.get_classes(ifb_index)}
    return minors - {0, 1, DEFAULT_MINOR}
