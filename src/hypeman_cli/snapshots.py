"""``snapshot create|restore|list|get|delete|fork``, and ``snapshot schedule`` (schedules.py)."""

from __future__ import annotations

import time
from typing import Annotated, Literal

import typer
from hypeman import Hypeman, omit
from hypeman.types import Snapshot

from hypeman_cli import resolve, state
from hypeman_cli.errors import CLIError
from hypeman_cli.instances import INSTANCE_COLUMNS, compression_config, hypervisor_name, target_state_name
from hypeman_cli.output import Column, emit, emit_lines, emit_names
from hypeman_cli.progress import Phases
from hypeman_cli.schedules import schedule_app
from hypeman_cli.units import age, human_bytes, key_values, parse_duration, short_id

SNAPSHOT_COLUMNS = [
    Column("SNAPSHOT ID", lambda r: short_id(r.get("id", ""))),
    Column("NAME", lambda r: r.get("name")),
    Column("INSTANCE", lambda r: r.get("source_instance_name")),
    Column("KIND", lambda r: r.get("kind")),
    Column("SIZE", lambda r: human_bytes(r.get("size_bytes"))),
    Column("COMPRESSION", lambda r: r.get("compression_state")),
    Column("CREATED", lambda r: age(r.get("created_at"))),
]

snapshot_app = typer.Typer(help="Snapshots of instances: create, list, restore, fork.", no_args_is_help=True)
snapshot_app.add_typer(schedule_app, name="schedule")

Kind = Literal["Standby", "Stopped"]
TagOption = Annotated[list[str] | None, typer.Option("--tag", "-l", help="KEY=VALUE tag (repeatable)")]
InstanceArg = Annotated[str, typer.Argument(help="instance id, name or unique id prefix", show_default=False)]
SnapshotArg = Annotated[str, typer.Argument(help="snapshot id, name or unique id prefix", show_default=False)]


def _kind(value: str) -> Kind:
    for known in ("Standby", "Stopped"):
        if value.lower() == known.lower():
            return known
    raise CLIError(f"--kind must be Standby or Stopped, not {value!r}")


def wait_compression(client: Hypeman, snapshot: Snapshot, phases: Phases, timeout: float) -> Snapshot:
    """Poll until the snapshot's compression is finished (compressed) or failed (error)."""
    deadline = time.monotonic() + timeout
    while snapshot.compression_state not in ("compressed", "error"):
        label = snapshot.name or snapshot.id
        phases.update(f"snapshot {label}: compression {snapshot.compression_state or 'pending'}")
        if time.monotonic() > deadline:
            raise CLIError(f"snapshot {snapshot.id}: compression still {snapshot.compression_state} "
                           f"after {timeout:.0f} s")
        time.sleep(0.5)
        snapshot = client.snapshots.get(snapshot.id)
    if snapshot.compression_state == "error":
        reason = snapshot.compression_error or "no reason given"
        raise CLIError(f"snapshot {snapshot.id}: compression failed: {reason}")
    phases.done(f"snapshot {snapshot.name or snapshot.id}: compressed "
                f"({human_bytes(snapshot.compressed_size_bytes)} of {human_bytes(snapshot.size_bytes)})")
    return snapshot


@snapshot_app.command("create")
def create(
    ctx: typer.Context,
    instance: InstanceArg,
    kind: Annotated[str, typer.Option(help="Standby (memory too) or Stopped (disk only)")] = "Standby",
    name: Annotated[str | None, typer.Option(help="snapshot name")] = None,
    compression_enabled: Annotated[bool | None, typer.Option(
        "--compression-enabled/--no-compression-enabled", help="compress the memory snapshot")] = None,
    compression_algorithm: Annotated[str | None, typer.Option(help="zstd or lz4")] = None,
    compression_level: Annotated[int | None, typer.Option(help="zstd 1-19, lz4 0-9")] = None,
    tag: TagOption = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait until compression has finished")] = False,
    wait_timeout: Annotated[str, typer.Option(help="how long --wait waits")] = "10m",
) -> None:
    """Snapshot an instance."""
    st = state.get(ctx)
    client = st.client()
    found = resolve.instance(client, instance)
    compression = compression_config(compression_enabled, compression_algorithm, compression_level)
    with Phases() as phases:
        phases.update(f"{found.name}: taking a {_kind(kind)} snapshot")
        snapshot = client.instances.snapshots.create(found.id, kind=_kind(kind), name=name or omit,
                                                     compression=compression or omit,
                                                     tags=key_values(tag or [], "--tag") or omit)
        size = human_bytes(snapshot.size_bytes)
        phases.done(f"snapshot {snapshot.name or snapshot.id} of {found.name} ({size})")
        requested = bool(compression and compression["enabled"])
        compressing = snapshot.compression_state not in (None, "none") or requested
        if wait and compressing:
            snapshot = wait_compression(client, snapshot, phases, parse_duration(wait_timeout))
    emit(snapshot, st.fmt, SNAPSHOT_COLUMNS)


@snapshot_app.command("restore")
def restore(
    ctx: typer.Context,
    instance: InstanceArg,
    snapshot: SnapshotArg,
    target_hypervisor: Annotated[str | None, typer.Option(help="hypervisor to restore into")] = None,
    target_state: Annotated[str | None, typer.Option(help="Stopped, Standby or Running")] = None,
) -> None:
    """Restore an instance in place from one of its snapshots."""
    st = state.get(ctx)
    client = st.client()
    found = resolve.instance(client, instance)
    chosen = resolve.snapshot(client, snapshot)
    restored = client.instances.snapshots.restore(
        chosen.id, id=found.id,
        target_hypervisor=hypervisor_name(target_hypervisor) if target_hypervisor else omit,
        target_state=target_state_name(target_state) or omit)
    emit(restored, st.fmt, INSTANCE_COLUMNS)


@snapshot_app.command("list")
def list_(
    ctx: typer.Context,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="ids only")] = False,
    name: Annotated[str | None, typer.Option(help="only this snapshot name")] = None,
    source_instance: Annotated[str | None, typer.Option(
        "--source-instance", "--source-instance-id", help="only snapshots of this instance")] = None,
    kind: Annotated[str | None, typer.Option(help="Standby or Stopped")] = None,
    tag: TagOption = None,
) -> None:
    """List snapshots."""
    st = state.get(ctx)
    client = st.client()
    source_id = resolve.instance(client, source_instance).id if source_instance else None
    snapshots = client.snapshots.list(name=name or omit, source_instance_id=source_id or omit,
                                      kind=_kind(kind) if kind else omit,
                                      tags=key_values(tag or [], "--tag") or omit)
    if quiet:
        emit_lines(s.id for s in snapshots)
        return
    emit(snapshots, st.fmt, SNAPSHOT_COLUMNS)


@snapshot_app.command("get")
def get(ctx: typer.Context, snapshot: SnapshotArg) -> None:
    """Show one snapshot."""
    st = state.get(ctx)
    client = st.client()
    emit(client.snapshots.get(resolve.snapshot(client, snapshot).id), st.fmt)


SnapshotsArg = Annotated[list[str], typer.Argument(help="snapshots to delete", show_default=False)]


def _delete(ctx: typer.Context, snapshots: list[str]) -> None:
    st = state.get(ctx)
    client = st.client()
    deleted = []
    for query in snapshots:
        chosen = resolve.snapshot(client, query)
        client.snapshots.delete(chosen.id)
        deleted.append(chosen.id)
    emit_names(deleted, st.fmt)


@snapshot_app.command("delete")
def delete(ctx: typer.Context, snapshots: SnapshotsArg) -> None:
    """Delete snapshots."""
    _delete(ctx, snapshots)


@snapshot_app.command("rm", hidden=True)
def rm(ctx: typer.Context, snapshots: SnapshotsArg) -> None:
    """Delete snapshots (alias of delete)."""
    _delete(ctx, snapshots)


@snapshot_app.command("fork")
def fork(
    ctx: typer.Context,
    snapshot: SnapshotArg,
    name: Annotated[str, typer.Argument(help="name of the new instance")],
    target_hypervisor: Annotated[str | None, typer.Option(help="hypervisor of the new instance")] = None,
    target_state: Annotated[str | None, typer.Option(help="Stopped, Standby or Running")] = None,
) -> None:
    """Make a new instance from a snapshot."""
    st = state.get(ctx)
    client = st.client()
    chosen = resolve.snapshot(client, snapshot)
    hypervisor = hypervisor_name(target_hypervisor) if target_hypervisor else None
    forked = client.snapshots.fork(chosen.id, name=name, target_hypervisor=hypervisor or omit,
                                   target_state=target_state_name(target_state) or omit)
    emit(forked, st.fmt, INSTANCE_COLUMNS)
