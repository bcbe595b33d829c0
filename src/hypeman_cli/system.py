"""``health``, ``resources`` and ``resources reclaim-memory``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from hypeman_cli import state
from hypeman_cli.output import Column, emit, print_table, to_data
from hypeman_cli.units import human_bytes, parse_size

resources_app = typer.Typer(help="capacity and allocation of the server; memory reclaim")


def health(ctx: typer.Context) -> None:
    """Is the server up? (GET /health; works without a key.)"""
    st = state.get(ctx)
    result = st.client(require_key=False).health.check()
    if st.fmt == "table":
        print(f"{result.status} ({st.settings.base_url})")
    else:
        emit(result, st.fmt)


def _amount(kind: str, value: Any) -> str:
    if not isinstance(value, int):
        return "-" if value is None else str(value)
    if kind in ("memory", "disk"):
        return human_bytes(value)
    if kind in ("network", "disk_io"):
        return f"{human_bytes(value)}/s"
    return str(value)


@resources_app.callback(invoke_without_command=True)
def resources(ctx: typer.Context) -> None:
    """Capacity and allocation of the server's CPU, memory, disk and network."""
    if ctx.invoked_subcommand is not None:
        return
    st = state.get(ctx)
    result = st.client().resources.get()
    if st.fmt != "table":
        emit(result, st.fmt)
        return
    data = to_data(result)
    rows = [{"kind": kind, **data[kind]} for kind in ("cpu", "memory", "disk", "disk_io", "network")
            if isinstance(data.get(kind), dict)]
    print_table(rows, [
        Column("RESOURCE", lambda r: r["kind"]),
        Column("CAPACITY", lambda r: _amount(r["kind"], r.get("capacity"))),
        Column("LIMIT", lambda r: _amount(r["kind"], r.get("effective_limit"))),
        Column("ALLOCATED", lambda r: _amount(r["kind"], r.get("allocated"))),
        Column("AVAILABLE", lambda r: _amount(r["kind"], r.get("available"))),
        Column("OVERSUB", lambda r: r.get("oversub_ratio")),
    ])
    allocations = data.get("allocations") or []
    if allocations:
        print()
        print_table(allocations, [
            Column("INSTANCE", lambda r: r.get("instance_name") or r.get("instance_id")),
            Column("CPU", lambda r: r.get("cpu")),
            Column("MEMORY", lambda r: human_bytes(r.get("memory_bytes"))),
            Column("DISK", lambda r: human_bytes(r.get("disk_bytes"))),
        ])


@resources_app.command("reclaim-memory")
def reclaim_memory(
    ctx: typer.Context,
    reclaim_bytes: Annotated[str, typer.Option(
        "--reclaim-bytes", help="guest memory to take back in total (512MB, 1GB, bytes)",
        show_default=False)],
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="only plan: change nothing, set no hold")] = False,
    hold_for: Annotated[str | None, typer.Option(
        "--hold-for", help="how long the reclaim holds before the balloons deflate (Go duration; server "
        "default 5m)", show_default=False)] = None,
    reason: Annotated[str | None, typer.Option("--reason", help="why (kept in the server's log)")] = None,
) -> None:
    """Take guest memory back through the running VMs' balloons (POST /resources/memory/reclaim)."""
    st = state.get(ctx)
    amount = parse_size(reclaim_bytes, "--reclaim-bytes")
    options: dict[str, Any] = {"dry_run": dry_run}
    if hold_for is not None:
        options["hold_for"] = hold_for
    if reason is not None:
        options["reason"] = reason
    result = st.client().resources.reclaim_memory(reclaim_bytes=amount, **options)
    if st.fmt != "table":
        emit(result, st.fmt)
        return
    data = to_data(result)
    print(f"requested {human_bytes(data['requested_reclaim_bytes'])}, "
          f"planned {human_bytes(data['planned_reclaim_bytes'])}, "
          f"in effect {human_bytes(data['applied_reclaim_bytes'])}; "
          f"host {data['host_pressure_state']}, {human_bytes(data['host_available_bytes'])} available; "
          f"hold until {data.get('hold_until') or '-'}")
    if data["actions"]:
        print()
        print_table(data["actions"], [
            Column("INSTANCE", lambda r: r["instance_name"]),
            Column("ASSIGNED", lambda r: human_bytes(r["assigned_memory_bytes"])),
            Column("FLOOR", lambda r: human_bytes(r["protected_floor_bytes"])),
            Column("BEFORE", lambda r: human_bytes(r["previous_target_guest_memory_bytes"])),
            Column("PLANNED", lambda r: human_bytes(r["planned_target_guest_memory_bytes"])),
            Column("TARGET", lambda r: human_bytes(r["target_guest_memory_bytes"])),
            Column("STATUS", lambda r: r["status"]),
            Column("ERROR", lambda r: r.get("error") or ""),
        ])
