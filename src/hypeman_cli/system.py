"""``health`` and ``resources``."""

from __future__ import annotations

from typing import Any

import typer

from hypeman_cli import state
from hypeman_cli.output import Column, emit, print_table, to_data
from hypeman_cli.units import human_bytes


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


def resources(ctx: typer.Context) -> None:
    """Capacity and allocation of the server's CPU, memory, disk and network."""
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
