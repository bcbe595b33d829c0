"""Pure tests of the framing and message codecs (no I/O)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from hypemand.guest import protocol as p
from hypemand.guest.models import EntryType


def test_frame_layout_is_big_endian_header_then_payload() -> None:
    raw = p.encode_frame(7, p.Msg.STDIN, b"abc")
    assert raw == struct.pack(">IIB", 3, 7, 0x11) + b"abc"


def test_payload_limit_is_enforced_on_encode() -> None:
    p.encode_frame(1, p.Msg.STDIN, bytes(p.MAX_PAYLOAD))
    with pytest.raises(ValueError):
        p.encode_frame(1, p.Msg.STDIN, bytes(p.MAX_PAYLOAD + 1))


def _ack(nonce: int) -> bytes:
    payload = p.MAGIC + struct.pack(">IQII", 1, nonce, p.MAX_PAYLOAD, p.INITIAL_WINDOW)
    return p.encode_frame(0, p.Msg.HELLO_ACK, payload)


def test_decoder_skips_garbage_until_hello_ack_then_parses_split_frames() -> None:
    decoder = p.FrameDecoder()
    stream = b"\x00\x00\x10tail of an old frame" + _ack(42) + p.encode_frame(5, p.Msg.STDOUT, b"hello")
    frames = []
    for i in range(len(stream)):  # byte by byte: every split point
        frames += decoder.feed(stream[i : i + 1])
    assert [(f.session, f.type) for f in frames] == [(0, p.Msg.HELLO_ACK), (5, p.Msg.STDOUT)]
    assert p.decode_hello_ack(frames[0].payload).nonce == 42
    assert frames[1].payload == b"hello"


def test_decoder_without_ack_yields_nothing_and_keeps_memory_bounded() -> None:
    decoder = p.FrameDecoder()
    for _ in range(100):
        assert decoder.feed(p.encode_frame(3, p.Msg.STDOUT, b"x" * 1000)) == []
    assert len(decoder._buf) < len(p.hello_ack_prefix())


def test_decoder_rejects_oversized_frame() -> None:
    decoder = p.FrameDecoder(hunting=False)
    with pytest.raises(p.ProtocolError):
        decoder.feed(struct.pack(">IIB", p.MAX_PAYLOAD + 1, 1, p.Msg.STDOUT))


def test_resync_padding_parses_as_pad_frames_after_completing_a_partial_one() -> None:
    pad = p.resync_padding()
    assert len(pad) % p.HEADER.size == 0
    assert len(pad) >= p.MAX_PAYLOAD + p.HEADER.size
    assert set(pad) == {0}


def test_exec_request_layout() -> None:
    raw = p.exec_request(9, ["sh", "-c", "echo hi"], {"A": "1"}, "/tmp", tty=True, rows=30, cols=100,
                         timeout_ms=1500)
    length, session, msg_type = p.HEADER.unpack_from(raw)
    body = raw[p.HEADER.size :]
    assert (length, session, msg_type) == (len(body), 9, p.Msg.EXEC)
    flags, rows, cols, timeout, argc, envc = struct.unpack_from(">BHHIHH", body)
    assert (flags, rows, cols, timeout, argc, envc) == (p.EXEC_TTY, 30, 100, 1500, 3, 1)
    assert body[struct.calcsize(">BHHIHH") :] == b"/tmp\0sh\0-c\0echo hi\0A=1\0"


@pytest.mark.parametrize("env", [{"A=B": "x"}, {"": "x"}])
def test_exec_request_rejects_bad_env_names(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        p.exec_request(1, ["true"], env)


def test_strings_with_nul_are_rejected() -> None:
    with pytest.raises(ValueError):
        p.stat_request(1, "/a\0b", False)


def test_decode_exit_signal_maps_to_shell_style_code() -> None:
    assert p.decode_exit(struct.pack(">BiB", 0, 3, 0)).exit_code == 3
    killed = p.decode_exit(struct.pack(">BiB", 1, 9, 1))
    assert (killed.exit_code, killed.signal, killed.timed_out) == (137, 9, True)


def test_decode_entry_and_stat() -> None:
    fields = struct.pack(">BIQqII", 2, 0o777, 4, 123, 1000, 1001)
    entry = p.decode_entry(fields + b"dir/link\0target\0")
    assert entry.type is EntryType.SYMLINK and entry.is_symlink
    assert (entry.path, entry.link_target, entry.uid, entry.gid, entry.mtime_ns) == (
        "dir/link", "target", 1000, 1001, 123)
    info = p.decode_stat_result(b"\x01" + struct.pack(">BIQqII", 1, 0o755, 0, 5, 0, 0) + b"\0\0")
    assert info.exists and info.is_dir and not info.is_file and info.mode == 0o755
    missing = p.decode_stat_result(b"\x00" + struct.pack(">BIQqII", 3, 0, 0, 0, 0, 0) + b"\0\0")
    assert not missing.exists and not missing.is_dir


@pytest.mark.parametrize("payload", [b"", b"\x01\x02", struct.pack(">BIQqII", 0, 0, 0, 0, 0, 0) + b"no-nul"])
def test_truncated_payloads_raise_protocol_error(payload: bytes) -> None:
    with pytest.raises(p.ProtocolError):
        p.decode_entry(payload)


def test_error_decoding() -> None:
    assert p.decode_error(struct.pack(">i", 2) + b"exec nope: No such file or directory\0") == (
        2, "exec nope: No such file or directory")


def test_non_utf8_names_round_trip() -> None:
    raw = p.stat_request(1, "/tmp/\udcff", False)
    assert raw.endswith(b"/tmp/\xff\0")
    fields = struct.pack(">BIQqII", 0, 0o644, 0, 0, 0, 0)
    assert p.decode_entry(fields + b"\xff\0\0").path == "\udcff"


def test_identity_request_layout() -> None:
    entropy = bytes(range(64))
    raw = p.identity_request(4, entropy, p.parse_mac("52:54:00:AB:cd:0f"), "fork-1")
    length, session, msg_type = p.HEADER.unpack_from(raw)
    body = raw[p.HEADER.size :]
    assert (length, session, msg_type) == (len(body), 4, 0x31)
    assert body == b"\x00\x40" + entropy + b"\x06" + bytes.fromhex("525400abcd0f") + b"fork-1\0"


def test_identity_request_keeps_what_is_empty() -> None:
    raw = p.identity_request(1, b"")
    assert raw[p.HEADER.size :] == b"\x00\x00" + b"\x00" + b"\0"


def test_identity_request_leaves_limits_to_the_agent_but_not_the_layout() -> None:
    # Over the agent's limits still encodes: the agent answers EINVAL (tested against the binary).
    assert len(p.identity_request(1, bytes(1000), hostname="h" * 100)) > 1000
    with pytest.raises(ValueError):
        p.identity_request(1, bytes(0x10000))
    with pytest.raises(ValueError):
        p.identity_request(1, b"x", mac=b"\x52\x54")
    with pytest.raises(ValueError):
        p.identity_request(1, b"x", hostname="a\0b")


@pytest.mark.parametrize(
    "text",
    ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "5254.0012.3456", "52:54:00:12:34:zz", "52:54:00:12:34:5",
     "+2:54:00:12:34:56"],
)
def test_parse_mac_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        p.parse_mac(text)


def test_parse_mac_accepts_colons_and_dashes() -> None:
    expected = bytes.fromhex("02000000000a")
    assert p.parse_mac("02-00-00-00-00-0A") == p.parse_mac("02:00:00:00:00:0a") == expected


def test_c_header_agrees_on_identity() -> None:
    """agent_proto.h and protocol.py are kept in step by hand: pin the new request's constants."""
    header = (Path(p.__file__).parent / "init" / "agent_proto.h").read_text()
    defines = dict(re.findall(r"^#define (AP_\w+) (\w+)", header, re.MULTILINE))
    assert int(defines["AP_IDENTITY"], 0) == p.Msg.IDENTITY
    assert int(defines["AP_IDENTITY_MAX_ENTROPY"]) == p.IDENTITY_MAX_ENTROPY
    assert int(defines["AP_IDENTITY_MAX_HOSTNAME"]) == p.IDENTITY_MAX_HOSTNAME
    assert int(defines["AP_OK"], 0) == p.Msg.OK
