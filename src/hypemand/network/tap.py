"""TAP devices and the bridge, through pyroute2. Blocking: run in the namespace's thread.

TAPs are persistent (they outlive the process that made them and the QEMU that uses them), so
a server restart finds them by name and a VM keeps its link while no server runs.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16


class TapError(RuntimeError):
    """A TAP could not be made, found or opened."""


def link_index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def link_kind(ipr: IPRoute, index: int) -> str | None:
    link = ipr.get_links(index)[0]
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else str(info.get_attr("IFLA_INFO_KIND"))


def bridge_mac(bridge: str) -> str:
    """A stable, locally administered MAC for the bridge. Left alone, a bridge takes the
    lowest MAC among its ports, so the gateway's MAC would change as TAPs come and go and
    every guest's ARP entry for the gateway would go stale."""
    digest = hashlib.sha256(b"hypemand bridge " + bridge.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, 0x68, *digest[:4]))


def ensure_bridge(ipr: IPRoute, bridge: str, gateway: str, prefixlen: int) -> int:
    """The bridge, up, with a fixed MAC and the gateway address. Returns its index."""
    index = link_index(ipr, bridge)
    if index is None:
        ipr.link("add", ifname=bridge, kind="bridge", address=bridge_mac(bridge))
        index = link_index(ipr, bridge)
        assert index is not None
    elif link_kind(ipr, index) != "bridge":
        raise TapError(f"{bridge} exists and is not a bridge: give another bridge name")
    present = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=index, family=2)}
    if (gateway, prefixlen) not in present:
        ipr.addr("add", index=index, address=gateway, prefixlen=prefixlen)
    ipr.link("set", index=index, state="up")
    return index


def ensure_tap(ipr: IPRoute, name: str, bridge_index: int) -> tuple[int, bool]:
    """A persistent TAP on the bridge, its port isolated, up. Returns (index, created now)."""
    index = link_index(ipr, name)
    created = index is None
    if index is None:
        # pyroute2 makes a tuntap with the TUN ioctls in this thread, so in this namespace.
        ipr.link("add", ifname=name, kind="tuntap", mode="tap", ifr={"no_pi": True, "vnet_hdr": True})
        index = link_index(ipr, name)
        if index is None:
            raise TapError(f"TAP {name} was created but cannot be found")
    elif link_kind(ipr, index) != "tun":
        raise TapError(f"{name} exists and is not a TAP")
    ipr.link("set", index=index, master=bridge_index)
    # isolated: the bridge forwards nothing between two isolated ports (VM to VM at layer 2),
    # while each still reaches the bridge itself, the gateway.
    ipr.brport("set", index=index, isolated=1)
    ipr.link("set", index=index, state="up")
    return index, created


def delete_link(ipr: IPRoute, name: str) -> bool:
    """Delete the named device if present. True when it was there."""
    index = link_index(ipr, name)
    if index is None:
        return False
    try:
        ipr.link("del", index=index)
    except NetlinkError as err:
        if err.code != errno.ENODEV:
            raise
        return False
    return True


def open_tap_fd(ipr: IPRoute, name: str, vnet_hdr: bool = True) -> int:
    """An open file descriptor on the existing TAP ``name`` (O_CLOEXEC; the caller hands it to
    QEMU and closes its own copy). Must run in the TAP's namespace: TUNSETIFF looks the name up
    in the namespace the descriptor was opened in, and would *create* a new TAP there if the
    name were missing, which the lookup before it rules out."""
    if link_index(ipr, name) is None:
        raise TapError(f"TAP {name} does not exist")
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    request = struct.pack(f"{IFNAMSIZ}sH", name.encode(), flags)
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, request)
    except OSError as err:
        os.close(fd)
        if err.errno == errno.EBUSY:
            raise TapError(f"TAP {name} is already open (a VM still holds it)") from None
        raise TapError(f"cannot open TAP {name}: {err.strerror}") from None
    return fd
