"""``snapshot schedule set|get|delete(rm) <instance>``: an instance's snapshot schedule, with the
Go CLI's flags. Values are checked by the server (a bad one is its 400, naming the field); only
a schedule without any retention is refused here, before anything is sent."""

from __future__ import annotations

from typing import Annotated

import typer
from hypeman import omit
from hypeman.types import SnapshotScheduleRetentionParam

from hypeman_cli import resolve, state
from hypeman_cli.errors import CLIError
from hypeman_cli.output import emit, emit_names
from hypeman_cli.units import key_values

schedule_app = typer.Typer(help="Snapshot schedules: a snapshot of an instance every interval.",
                           no_args_is_help=True)

InstanceArg = Annotated[str, typer.Argument(help="instance id, name or unique id prefix", show_default=False)]


@schedule_app.command("set")
def set_(
    ctx: typer.Context,
    instance: InstanceArg,
    interval: Annotated[str, typer.Option(help="how often, a Go duration (at least 1m): 1h, 30m",
                                          show_default=False)],
    max_count: Annotated[int | None, typer.Option(
        help="keep the newest N of the schedule's snapshots (0: no count limit)")] = None,
    max_age: Annotated[str | None, typer.Option(
        help="delete the schedule's snapshots older than this Go duration (168h)")] = None,
    name_prefix: Annotated[str | None, typer.Option(
        help="the snapshots are named <prefix>-YYYYMMDD-HHMMSS (at most 47 characters)")] = None,
    metadata: Annotated[list[str] | None, typer.Option(
        "--metadata", help="KEY=VALUE tag of the snapshots (repeatable)")] = None,
) -> None:
    """Snapshot the instance every interval (replaces its schedule; retention: its own only)."""
    retention: SnapshotScheduleRetentionParam = {}
    if max_count is not None:
        retention["max_count"] = max_count
    if max_age is not None:
        retention["max_age"] = max_age
    if not retention:
        raise CLIError("a schedule needs a retention: give --max-count, --max-age or both")
    st = state.get(ctx)
    client = st.client()
    found = resolve.instance(client, instance)
    schedule = client.instances.snapshot_schedule.update(
        found.id, interval=interval, retention=retention, name_prefix=name_prefix or omit,
        metadata=key_values(metadata or [], "--metadata") or omit)
    emit(schedule, st.fmt)


@schedule_app.command("get")
def get(ctx: typer.Context, instance: InstanceArg) -> None:
    """Show the instance's schedule: interval, retention, next and last run, last error."""
    st = state.get(ctx)
    client = st.client()
    found = resolve.instance(client, instance)
    emit(client.instances.snapshot_schedule.get(found.id), st.fmt)


def _delete(ctx: typer.Context, instance: str) -> None:
    st = state.get(ctx)
    client = st.client()
    found = resolve.instance(client, instance)
    client.instances.snapshot_schedule.delete(found.id)
    emit_names([found.id], st.fmt)


@schedule_app.command("delete")
def delete(ctx: typer.Context, instance: InstanceArg) -> None:
    """Stop snapshotting the instance (its snapshots stay)."""
    _delete(ctx, instance)


@schedule_app.command("rm", hidden=True)
def rm(ctx: typer.Context, instance: InstanceArg) -> None:
    """Stop snapshotting the instance (alias of delete)."""
    _delete(ctx, instance)
