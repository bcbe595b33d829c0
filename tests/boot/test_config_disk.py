"""Config disk: Python encoder, a Python mirror of the C reader, and the C reader itself."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from pydantic import ValidationError

from hypemand.errors import BadRequest
from hypemand.guest import build as guest_build
from hypemand.guest.config_disk import (
    HEADER_SIZE,
    MAGIC,
    GuestConfig,
    GuestNetwork,
    RecordType,
    encode_config,
    make_overlay_disk,
    write_config_disk,
)

HERE = Path(__file__).parent

SAMPLE = GuestConfig(
    entrypoint=["/docker-entrypoint.sh"],
    cmd=["nginx", "-g", "daemon off;", "ünïcode arg", ""],
    env={"PATH": "/usr/bin:/bin", "QUOTE": 'a "b" = c', "EMPTY": ""},
    working_dir="/srv/app",
    hostname="web-1",
    network=GuestNetwork.user_mode(),
)


class DecodeError(Exception):
    pass


def decode_config(image: bytes) -> GuestConfig:
    """Mirror of init/config_disk.c: same checks, same order."""
    if len(image) < HEADER_SIZE or image[:8] != MAGIC:
        raise DecodeError("no header")
    version, length, crc = struct.unpack_from("<III", image, 8)
    if version != 1:
        raise DecodeError("version")
    if length > len(image) - HEADER_SIZE:
        raise DecodeError("length")
    payload = image[HEADER_SIZE : HEADER_SIZE + length]
    if zlib.crc32(payload) != crc:
        raise DecodeError("crc")
    fields: dict[str, object] = {"entrypoint": [], "cmd": [], "env": {}}
    net: dict[str, object] = {"dns": []}
    pos = 0
    while pos < length:
        if length - pos < 8:
            raise DecodeError("truncated record header")
        kind, _zero, size = struct.unpack_from("<HHI", payload, pos)
        pos += 8
        if size > length - pos:
            raise DecodeError("record overruns")
        raw = payload[pos : pos + size]
        pos += size
        if b"\0" in raw:
            raise DecodeError("NUL")
        value = raw.decode()
        if kind == RecordType.ENTRYPOINT_ARG:
            fields["entrypoint"].append(value)  # type: ignore[attr-defined]
        elif kind == RecordType.CMD_ARG:
            fields["cmd"].append(value)  # type: ignore[attr-defined]
        elif kind == RecordType.ENV:
            key, _, val = value.partition("=")
            fields["env"][key] = val  # type: ignore[index]
        elif kind == RecordType.WORKDIR:
            fields["working_dir"] = value
        elif kind == RecordType.HOSTNAME:
            fields["hostname"] = value
        elif kind == RecordType.NET_IP:
            net["ip"] = value
        elif kind == RecordType.NET_PREFIX:
            net["prefix"] = int(value)
        elif kind == RecordType.NET_GATEWAY:
            net["gateway"] = value
        elif kind == RecordType.NET_DNS:
            net["dns"].append(value)  # type: ignore[attr-defined]
    if "ip" in net:
        fields["network"] = net
    return GuestConfig.model_validate(fields)


def test_round_trip_through_python_mirror() -> None:
    image = encode_config(SAMPLE)
    assert len(image) % 4096 == 0
    assert decode_config(image) == SAMPLE


def test_round_trip_without_network() -> None:
    config = GuestConfig(cmd=["/bin/true"])
    assert decode_config(encode_config(config)) == config


def test_unknown_records_are_skipped() -> None:
    image = bytearray(encode_config(GuestConfig(cmd=["x"])))
    length = struct.unpack_from("<I", image, 12)[0]
    payload = bytes(image[HEADER_SIZE : HEADER_SIZE + length]) + struct.pack("<HHI", 999, 0, 3) + b"new"
    rebuilt = MAGIC + struct.pack("<III", 1, len(payload), zlib.crc32(payload))
    assert decode_config(rebuilt.ljust(HEADER_SIZE, b"\0") + payload).cmd == ["x"]


def test_values_with_nul_or_bad_env_are_refused() -> None:
    with pytest.raises(BadRequest):
        encode_config(GuestConfig(cmd=["a\0b"]))
    with pytest.raises(ValidationError):
        GuestConfig(env={"A=B": "x"})
    with pytest.raises(ValidationError):
        GuestNetwork(ip="10.0.2.300", prefix=24)


@pytest.fixture(scope="module")
def c_reader(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guest's C parser compiled for the host with a small printing main().

    With gcc it is built with AddressSanitizer, so an out-of-bounds read on a damaged image
    fails the test instead of passing silently.
    """
    out = tmp_path_factory.mktemp("creader") / "config_dump"
    gcc = shutil.which("gcc")
    compiler = (
        [gcc, "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        if gcc
        else (guest_build.find_compiler())
    )
    subprocess.run(
        [
            *compiler,
            "-O1",
            "-g",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-D_GNU_SOURCE",
            "-I",
            str(guest_build.SOURCE_DIR),
            "-o",
            str(out),
            str(HERE / "config_dump.c"),
            str(guest_build.SOURCE_DIR / "config_disk.c"),
        ],
        check=True,
        capture_output=True,
    )
    return out


def run_reader(reader: Path, image: Path) -> tuple[int, list[tuple[str, str]]]:
    # The parsed config lives as long as PID 1 by design: leaks are not errors here.
    env = {"ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "halt_on_error=1"}
    result = subprocess.run(
        [str(reader), str(image)], capture_output=True, text=True, check=False, timeout=10, env=env
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, [tuple(line.split("\t", 1)) for line in result.stdout.splitlines()]  # type: ignore[misc]


def test_c_reader_reads_what_python_writes(c_reader: Path, tmp_path: Path) -> None:
    disk = tmp_path / "config.raw"
    write_config_disk(disk, SAMPLE)
    code, lines = run_reader(c_reader, disk)
    assert code == 0
    assert [v for k, v in lines if k == "entrypoint"] == ["/docker-entrypoint.sh"]
    assert [v for k, v in lines if k == "cmd"] == ["nginx", "-g", "daemon off;", "ünïcode arg", ""]
    assert [v for k, v in lines if k == "env"] == ["PATH=/usr/bin:/bin", 'QUOTE=a "b" = c', "EMPTY="]
    assert ("workdir", "/srv/app") in lines
    assert ("hostname", "web-1") in lines
    assert ("net", "10.0.2.15/24 via 10.0.2.2") in lines
    assert ("dns", "10.0.2.3") in lines


@pytest.mark.parametrize("damage", ["truncate", "flip", "length", "magic", "record_overrun"])
def test_c_reader_rejects_damaged_images(c_reader: Path, tmp_path: Path, damage: str) -> None:
    image = bytearray(encode_config(SAMPLE))
    length = struct.unpack_from("<I", image, 12)[0]
    if damage == "truncate":
        image = image[: HEADER_SIZE + length // 2]
    elif damage == "flip":
        image[HEADER_SIZE + 5] ^= 0x40
    elif damage == "length":
        struct.pack_into("<I", image, 12, 0xFFFFFFF0)
    elif damage == "magic":
        image[0:8] = b"NOTMAGIC"
    elif damage == "record_overrun":
        # A record claiming more bytes than the payload holds, with a valid checksum.
        payload = struct.pack("<HHI", RecordType.CMD_ARG, 0, 1000) + b"short"
        image = bytearray(
            (MAGIC + struct.pack("<III", 1, len(payload), zlib.crc32(payload))).ljust(HEADER_SIZE, b"\0")
            + payload
        )
    disk = tmp_path / "bad.raw"
    disk.write_bytes(bytes(image))
    code, lines = run_reader(c_reader, disk)
    assert code == 1
    assert lines and lines[0][0] == "error"
    with pytest.raises(DecodeError):
        decode_config(bytes(image))


def test_overlay_disk_is_sparse_ext4(tmp_path: Path) -> None:
    disk = tmp_path / "overlay.raw"
    make_overlay_disk(disk, 256 << 20)
    assert disk.stat().st_size == 256 << 20
    assert disk.stat().st_blocks * 512 < 16 << 20
    subprocess.run(["e2fsck", "-fn", str(disk)], check=True, capture_output=True)
    header = subprocess.run(["dumpe2fs", "-h", str(disk)], capture_output=True, text=True, check=True).stdout
    assert "has_journal" in header
