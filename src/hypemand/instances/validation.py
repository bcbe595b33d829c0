"""What a create (or an update) asks for, checked before anything is made: 400 with a code that
names the field, and the request's sizes and times in the form the record keeps."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hypemand.errors import BadRequest
from hypemand.hypervisor.base import Board
from hypemand.instances.models import (
    UNSUPPORTED_CREATE_FIELDS,
    CreateInstanceRequest,
    SnapshotPolicy,
    validate_env,
)
from hypemand.savedvm.codec import normalize
from hypemand.savedvm.models import SnapshotCompressionConfig
from hypemand.units import UnitError, format_size, parse_duration, parse_size, round_up

DEFAULT_HYPERVISOR = Board.QEMU_MICROVM
BOARDS = (Board.QEMU_MICROVM, Board.QEMU)
# The smallest guest that boots, measured through the API with this project's kernel and initrd:
# the demo image (busybox) reached Running with its agent answering at 75 MiB and up on
# qemu-microvm (75: 5 of 5, 76: 8 of 8; 74 MiB and below stopped at boot, 3 of 3 tries each) and
# at 72 MiB and up on qemu/q35 (72: 8 of 8; 71: 0 of 5, 70: 2 of 3). 128 MiB leaves room for a
# larger kernel or initrd and for the program itself.
MIN_MEMORY = 128 << 20
MIN_OVERLAY = 16 << 20
# One rounding rule for every size (memory, hotplug, overlay): up to a whole MiB. QEMU takes
# memory in MiB, and a disk of whole MiB is whole 4 KiB file-system blocks; the record stores
# the rounded bytes, so the API shows exactly what the guest gets.
SIZE_GRANULE = 1 << 20
MAX_OVERLAY = 100 << 30


def new_instance_id() -> str:
    """24 lowercase alphanumerics starting with a letter, like the reference's CUID2 ids."""
    alphabet = string.ascii_lowercase + string.digits
    return secrets.choice(string.ascii_lowercase) + "".join(secrets.choice(alphabet) for _ in range(23))


@dataclass(frozen=True)
class Shape:
    """The machine a create asks for, in bytes and enums."""

    board: Board
    vcpus: int
    memory_bytes: int
    hotplug_bytes: int
    overlay_bytes: int
    expires_at: datetime | None

    @property
    def memory_demand(self) -> int:
        return self.memory_bytes + self.hotplug_bytes


def validate_create(request: CreateInstanceRequest, *, platform: str, hotplug_memory: bool) -> Shape:
    """Pure, but for the clock (``ttl``). ``hotplug_memory``: the hypervisor can hotplug."""
    for name in UNSUPPORTED_CREATE_FIELDS:
        if getattr(request, name) not in (None, [], {}):
            raise BadRequest(f"{name} is not supported yet by this server", code="not_supported")
    egress = request.network.egress if request.network is not None else None
    if egress and egress.get("enabled"):
        raise BadRequest("network.egress (egress control) is not supported yet by this server",
                         code="not_supported")
    board = choose_board(request.hypervisor)
    if request.platform is not None and request.platform != platform:
        raise BadRequest(
            f"platform {request.platform!r} is not available on this host (it runs {platform})",
            code="invalid_platform",
        )
    memory = size(request.size, "size", "invalid_size")
    if memory < MIN_MEMORY:
        message = f"size must be at least {format_size(MIN_MEMORY)}: a smaller guest cannot boot"
        raise BadRequest(message, code="invalid_size")
    overlay = size(request.overlay_size, "overlay_size", "invalid_overlay_size")
    if not MIN_OVERLAY <= overlay <= MAX_OVERLAY:
        raise BadRequest(
            f"overlay_size must be between {format_size(MIN_OVERLAY)} and {format_size(MAX_OVERLAY)}",
            code="invalid_overlay_size",
        )
    hotplug = 0
    if request.hotplug_size:
        hotplug = size(request.hotplug_size, "hotplug_size", "invalid_hotplug_size")
    if hotplug and not hotplug_memory:
        raise BadRequest(
            f"hotplug_size: memory hotplug is not supported by {board.value} on this server",
            code="invalid_hotplug_size",
        )
    return Shape(
        board=board,
        vcpus=request.vcpus,
        memory_bytes=memory,
        hotplug_bytes=hotplug,
        overlay_bytes=overlay,
        expires_at=expiry(request.ttl, request.expires_at),
    )


def merged_env(current: dict[str, str], patch: dict[str, str]) -> dict[str, str]:
    """The environment an update leaves: ``patch`` over ``current``, checked against the limits
    of a create (count, names, sizes), since the merge is what the guest will be given. 400
    ``invalid_request`` when it does not fit; the caller stores nothing then."""
    merged = {**current, **patch}
    try:
        validate_env(merged)
    except ValueError as exc:
        raise BadRequest(f"env: after this update, {exc}", code="invalid_request") from None
    return merged


def choose_board(name: str | None) -> Board:
    if name is None:
        return DEFAULT_HYPERVISOR
    offered = {board.value: board for board in BOARDS}
    if name not in offered:
        raise BadRequest(
            f"hypervisor {name!r} is not available on this host; it offers: {', '.join(offered)}",
            code="invalid_hypervisor",
        )
    return offered[name]


def size(text: str, field_name: str, code: str) -> int:
    """A size in bytes, rounded up to SIZE_GRANULE."""
    try:
        return round_up(parse_size(text), SIZE_GRANULE)
    except UnitError as exc:
        raise BadRequest(f"{field_name}: {exc}", code=code) from None


def expiry(ttl: str | None, expires_at: datetime | None) -> datetime | None:
    if ttl is not None:
        try:
            seconds = parse_duration(ttl)
        except UnitError as exc:
            raise BadRequest(f"ttl: {exc}", code="invalid_ttl") from None
        try:
            return None if seconds == 0 else datetime.now(UTC) + timedelta(seconds=seconds)
        except OverflowError:
            raise BadRequest(f"ttl {ttl!r} reaches past the year 9999", code="invalid_ttl") from None
    if expires_at is not None:
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        if expires_at <= datetime.now(UTC):
            raise BadRequest("expires_at must be in the future", code="invalid_expires_at")
        return expires_at
    return None


def normalized_policy(policy: SnapshotPolicy | None) -> SnapshotPolicy | None:
    """Checked at create (400 before anything is made) and stored in its normal form."""
    if policy is None:
        return None
    compression = policy.compression
    if compression is not None:
        normal = normalize(compression)
        compression = SnapshotCompressionConfig(
            enabled=normal is not None,
            algorithm=normal.algorithm if normal else None,
            level=normal.level if normal else None,
        )
    if policy.standby_compression_delay is not None:
        try:
            parse_duration(policy.standby_compression_delay)
        except UnitError as exc:
            message = f"snapshot_policy.standby_compression_delay: {exc}"
            raise BadRequest(message, code="invalid_request") from None
    return policy.model_copy(update={"compression": compression})
