"""Wire format of the guest-agent protocol (pure: no I/O). The C side is ``init/agent_proto.h``.

Frame: ``u32 payload_len | u32 session | u8 type | payload``, big-endian, payload <= 64 KiB.
Strings are NUL-terminated UTF-8 (bytes pass through unchanged with surrogateescape).
See ``guest/README.md`` ("Agent protocol") for the message catalogue and the session rules.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from ipaddress import IPv4Address

from hypemand.guest.models import EntryType, ExecResult, FileEntry, PathInfo

VERSION = 1
MAGIC = b"HYPEMAN!"
HEADER = struct.Struct(">IIB")
MAX_PAYLOAD = 65536
INITIAL_WINDOW = 256 * 1024
# HELLO_ACK nonce of the notice an agent sends unasked when it (re)starts; never a host's nonce.
AGENT_STARTED_NONCE = 0
CONTROL_SESSION = 0


class Msg(IntEnum):
    PAD = 0x00  # empty PAD frames are all-zero bytes: the host's resync filler, ignored
    # host -> guest
    HELLO = 0x01
    PING = 0x02
    EXEC = 0x10
    STDIN = 0x11
    STDIN_EOF = 0x12
    RESIZE = 0x13
    SIGNAL = 0x14
    PUT = 0x20
    FILE_DATA = 0x21  # both directions
    FILE_END = 0x22
    MKDIR = 0x23
    SYMLINK = 0x24
    GET = 0x25
    STAT = 0x26
    SET_CLOCK = 0x30
    IDENTITY = 0x31
    WINDOW = 0x40  # both directions
    CANCEL = 0x41
    # guest -> host
    HELLO_ACK = 0x81
    PONG = 0x82
    STARTED = 0x90
    STDOUT = 0x91
    STDERR = 0x92
    EXIT = 0x93
    PUT_DONE = 0xA0
    ENTRY = 0xA1
    ENTRY_END = 0xA2
    GET_DONE = 0xA3
    ENTRY_ERROR = 0xA4
    STAT_RESULT = 0xA5
    OK = 0xAF
    ERROR = 0xFF


# Replies after which the guest has forgotten the session.
TERMINAL = frozenset({Msg.PONG, Msg.EXIT, Msg.PUT_DONE, Msg.GET_DONE, Msg.STAT_RESULT, Msg.OK, Msg.ERROR})
# Frames whose payload counts against the receiver's window.
WINDOWED = frozenset({Msg.STDIN, Msg.STDOUT, Msg.STDERR, Msg.FILE_DATA})

EXEC_TTY = 0x01
EXEC_MERGE_STDERR = 0x02
PUT_HAS_MTIME = 0x01
MKDIR_PARENTS = 0x01
MKDIR_HAS_MTIME = 0x02
SYMLINK_REPLACE = 0x01
FOLLOW_LINKS = 0x01
GET_RECURSIVE = 0x02
# IDENTITY: the agent refuses more (EINVAL) before changing anything.
IDENTITY_MAX_ENTROPY = 512
IDENTITY_MAX_HOSTNAME = 64
IDENTITY_NET_LEN = 9  # u32 ip, u8 prefix, u32 gateway
IDENTITY_DONE_NETWORK = 0x01  # in the OK of an IDENTITY: the address was replaced

_ENTRY_TYPES = (EntryType.FILE, EntryType.DIR, EntryType.SYMLINK, EntryType.OTHER)


class ProtocolError(Exception):
    """The peer sent something that does not parse."""


@dataclass(frozen=True, slots=True)
class Frame:
    session: int
    type: int
    payload: bytes = b""


def encode_frame(session: int, msg_type: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), session, msg_type) + payload


def _cstr(value: str | bytes) -> bytes:
    raw = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    if b"\0" in raw:
        raise ValueError(f"NUL byte in string {value!r}")
    return raw + b"\0"


class _Reader:
    """Bounds-checked cursor over a payload."""

    def __init__(self, payload: bytes) -> None:
        self._data = payload
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            raise ProtocolError("truncated payload")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def unpack(self, fmt: str) -> tuple[int, ...]:
        s = struct.Struct(">" + fmt)
        return s.unpack(self.take(s.size))

    def cstr(self) -> str:
        end = self._data.find(b"\0", self._pos)
        if end < 0:
            raise ProtocolError("unterminated string")
        raw = self._data[self._pos : end]
        self._pos = end + 1
        return raw.decode("utf-8", "surrogateescape")


# ---------- host -> guest ----------


def resync_padding() -> bytes:
    """Zero bytes that complete any half-received frame in the guest and then parse as PAD
    frames; sent before a retried HELLO when the first one got no answer."""
    return bytes(HEADER.size * ((MAX_PAYLOAD + HEADER.size) // HEADER.size + 1))


def hello(nonce: int) -> bytes:
    return encode_frame(CONTROL_SESSION, Msg.HELLO, MAGIC + struct.pack(">IQ", VERSION, nonce))


def ping(session: int, token: int) -> bytes:
    return encode_frame(session, Msg.PING, struct.pack(">Q", token))


def exec_request(
    session: int,
    argv: Sequence[str],
    env: dict[str, str] | None = None,
    cwd: str = "",
    tty: bool = False,
    rows: int = 24,
    cols: int = 80,
    timeout_ms: int = 0,
    merge_stderr: bool = False,
) -> bytes:
    """``env`` overrides the agent's own environment (the image's) for this process only."""
    if not argv:
        raise ValueError("argv must not be empty")
    flags = (EXEC_TTY if tty else 0) | (EXEC_MERGE_STDERR if merge_stderr else 0)
    env_items = [f"{k}={v}" for k, v in (env or {}).items()]
    for key in env or {}:
        if not key or "=" in key:
            raise ValueError(f"invalid environment variable name {key!r}")
    body = struct.pack(">BHHIHH", flags, rows, cols, timeout_ms, len(argv), len(env_items))
    body += _cstr(cwd) + b"".join(_cstr(a) for a in argv) + b"".join(_cstr(e) for e in env_items)
    return encode_frame(session, Msg.EXEC, body)


def resize(session: int, rows: int, cols: int) -> bytes:
    return encode_frame(session, Msg.RESIZE, struct.pack(">HH", rows, cols))


def signal(session: int, signo: int) -> bytes:
    return encode_frame(session, Msg.SIGNAL, struct.pack(">B", signo))


def window(session: int, increment: int) -> bytes:
    return encode_frame(session, Msg.WINDOW, struct.pack(">I", increment))


def put_request(
    session: int, path: str, mode: int, uid: int | None, gid: int | None, mtime_ns: int | None
) -> bytes:
    flags = PUT_HAS_MTIME if mtime_ns is not None else 0
    body = struct.pack(
        ">IiiBq", mode & 0o7777, -1 if uid is None else uid, -1 if gid is None else gid, flags, mtime_ns or 0
    )
    return encode_frame(session, Msg.PUT, body + _cstr(path))


def mkdir_request(
    session: int,
    path: str,
    mode: int,
    uid: int | None,
    gid: int | None,
    mtime_ns: int | None,
    parents: bool,
) -> bytes:
    flags = (MKDIR_PARENTS if parents else 0) | (MKDIR_HAS_MTIME if mtime_ns is not None else 0)
    body = struct.pack(
        ">IiiBq", mode & 0o7777, -1 if uid is None else uid, -1 if gid is None else gid, flags, mtime_ns or 0
    )
    return encode_frame(session, Msg.MKDIR, body + _cstr(path))


def symlink_request(
    session: int, target: str, path: str, uid: int | None, gid: int | None, replace: bool
) -> bytes:
    flags = SYMLINK_REPLACE if replace else 0
    body = struct.pack(">iiB", -1 if uid is None else uid, -1 if gid is None else gid, flags)
    return encode_frame(session, Msg.SYMLINK, body + _cstr(target) + _cstr(path))


def get_request(session: int, path: str, follow_links: bool, recursive: bool) -> bytes:
    flags = (FOLLOW_LINKS if follow_links else 0) | (GET_RECURSIVE if recursive else 0)
    return encode_frame(session, Msg.GET, struct.pack(">B", flags) + _cstr(path))


def stat_request(session: int, path: str, follow_links: bool) -> bytes:
    flags = FOLLOW_LINKS if follow_links else 0
    return encode_frame(session, Msg.STAT, struct.pack(">B", flags) + _cstr(path))


def set_clock_request(session: int, unix_ns: int) -> bytes:
    return encode_frame(session, Msg.SET_CLOCK, struct.pack(">q", unix_ns))


def parse_mac(text: str) -> bytes:
    """``"52:54:00:12:34:56"`` (``-`` also accepted as separator) -> 6 bytes."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(part) == 2 and part.isascii() and part.isalnum() for part in parts):
        raise ValueError(f"invalid MAC address {text!r}")
    try:
        return bytes.fromhex("".join(parts))
    except ValueError:
        raise ValueError(f"invalid MAC address {text!r}") from None


@dataclass(frozen=True, slots=True)
class IdentityNetwork:
    """The IPv4 address an IDENTITY gives eth0 instead of its old one."""

    ip: IPv4Address
    prefix: int
    gateway: IPv4Address | None = None


def identity_request(
    session: int, entropy: bytes, mac: bytes = b"", hostname: str = "", network: IdentityNetwork | None = None
) -> bytes:
    """``u16 entropy_len | entropy | u8 mac_len (0 keep, 6) | mac | hostname\\0 (empty: keep)``,
    then, only with a network, ``u8 9 | u32 ip | u8 prefix | u32 gateway (0.0.0.0: none)`` (a
    request without it is the one agents before the network part know). Limits (entropy, hostname
    length, unicast MAC, a host address and a gateway in its subnet) are the agent's to enforce."""
    if len(entropy) > 0xFFFF:
        raise ValueError(f"{len(entropy)} bytes of entropy do not fit a u16 length")
    if len(mac) not in (0, 6):
        raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
    body = struct.pack(">H", len(entropy)) + entropy + struct.pack(">B", len(mac)) + mac + _cstr(hostname)
    if network is not None:
        if not 0 <= network.prefix <= 0xFF:
            raise ValueError(f"prefix {network.prefix} does not fit a byte")
        gateway = network.gateway or IPv4Address(0)
        body += struct.pack(">B4sB4s", IDENTITY_NET_LEN, network.ip.packed, network.prefix, gateway.packed)
    return encode_frame(session, Msg.IDENTITY, body)


def identity_replaced_network(ok_payload: bytes) -> bool:
    """Whether the OK of an IDENTITY says the address was replaced (an agent older than the
    network part answers an empty OK)."""
    return bool(ok_payload[:1]) and bool(ok_payload[0] & IDENTITY_DONE_NETWORK)


# ---------- guest -> host ----------


@dataclass(frozen=True, slots=True)
class HelloAck:
    version: int
    nonce: int
    max_payload: int
    initial_window: int


def decode_hello_ack(payload: bytes) -> HelloAck:
    r = _Reader(payload)
    if r.take(len(MAGIC)) != MAGIC:
        raise ProtocolError("bad magic in HELLO_ACK")
    version, nonce, max_payload, initial_window = r.unpack("IQII")
    return HelloAck(version, nonce, max_payload, initial_window)


def hello_ack_prefix() -> bytes:
    """The first bytes of every HELLO_ACK: what the host scans for to regain frame sync."""
    return HEADER.pack(len(MAGIC) + struct.calcsize(">IQII"), CONTROL_SESSION, Msg.HELLO_ACK) + MAGIC


def decode_u32(payload: bytes) -> int:
    (value,) = _Reader(payload).unpack("I")
    return value


def decode_u64(payload: bytes) -> int:
    (value,) = _Reader(payload).unpack("Q")
    return value


def decode_exit(payload: bytes) -> ExecResult:
    kind, value, timed_out = _Reader(payload).unpack("BiB")
    if kind == 1:
        return ExecResult(exit_code=128 + value, signal=value, timed_out=bool(timed_out))
    return ExecResult(exit_code=value, timed_out=bool(timed_out))


def decode_error(payload: bytes) -> tuple[int, str]:
    r = _Reader(payload)
    (errno,) = r.unpack("i")
    return errno, r.cstr()


def _decode_stat_fields(r: _Reader) -> tuple[EntryType, int, int, int, int, int]:
    type_code, mode, size, mtime_ns, uid, gid = r.unpack("BIQqII")
    if type_code >= len(_ENTRY_TYPES):
        raise ProtocolError(f"unknown entry type {type_code}")
    return _ENTRY_TYPES[type_code], mode, size, mtime_ns, uid, gid


def decode_entry(payload: bytes) -> FileEntry:
    r = _Reader(payload)
    kind, mode, size, mtime_ns, uid, gid = _decode_stat_fields(r)
    path = r.cstr()
    link = r.cstr()
    return FileEntry(
        path=path, type=kind, mode=mode, size=size, mtime_ns=mtime_ns, uid=uid, gid=gid, link_target=link
    )


def decode_entry_error(payload: bytes) -> tuple[str, str]:
    r = _Reader(payload)
    return r.cstr(), r.cstr()


def decode_stat_result(payload: bytes) -> PathInfo:
    r = _Reader(payload)
    (exists,) = r.unpack("B")
    kind, mode, size, mtime_ns, uid, gid = _decode_stat_fields(r)
    link = r.cstr()
    error = r.cstr()
    if not exists:
        return PathInfo(exists=False, error=error)
    return PathInfo(
        exists=True,
        is_dir=kind is EntryType.DIR,
        is_file=kind is EntryType.FILE,
        is_symlink=kind is EntryType.SYMLINK,
        link_target=link,
        mode=mode,
        size=size,
        mtime_ns=mtime_ns,
        uid=uid,
        gid=gid,
        error=error,
    )


class FrameDecoder:
    """Incremental frame parser. Starts (and restarts after ``resync``) by hunting for a
    HELLO_ACK, because a new connection may begin in the middle of a frame the guest was
    sending to the previous one (e.g. right after a restore)."""

    def __init__(self, hunting: bool = True) -> None:
        self._buf = bytearray()
        self._hunting = hunting
        self._prefix = hello_ack_prefix()

    def resync(self) -> None:
        self._buf.clear()
        self._hunting = True

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while True:
            if self._hunting:
                at = self._buf.find(self._prefix)
                if at < 0:
                    keep = len(self._prefix) - 1
                    if len(self._buf) > keep:
                        del self._buf[: len(self._buf) - keep]
                    return frames
                del self._buf[:at]
                self._hunting = False
            if len(self._buf) < HEADER.size:
                return frames
            length, session, msg_type = HEADER.unpack_from(self._buf)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
            end = HEADER.size + length
            if len(self._buf) < end:
                return frames
            frames.append(Frame(session, msg_type, bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
