"""``hypeman builder create|list|get|prune|delete(rm)``: builders, the persistent cache disks
that builds name with ``hypeman build --builder ID`` (one build at a time each; a second build
of the same Dockerfile reuses the first one's layers).

``<builder>`` is resolved here as the Go CLI resolves instances: an exact id, an exact name, or
a unique id prefix.
"""

from __future__ import annotations

from typing import Annotated

import typer
from hypeman import Hypeman, omit
from hypeman.types import Builder

from hypeman_cli import resolve, state
from hypeman_cli.output import Column, emit, emit_listing, emit_names
from hypeman_cli.units import age, key_values, short_id

builder_app = typer.Typer(help="Builders: persistent build caches (create, list, get, prune, rm).",
                          no_args_is_help=True)

TagOption = Annotated[list[str] | None, typer.Option("--tag", "-l", help="KEY=VALUE tag (repeatable)")]
BuilderArg = Annotated[str, typer.Argument(help="builder id, name or unique id prefix", show_default=False)]

BUILDER_COLUMNS = [
    Column("BUILDER ID", lambda b: short_id(b.get("id", ""))),
    Column("NAME", lambda b: b.get("name")),
    Column("STATUS", lambda b: b.get("status")),
    Column("DISK", lambda b: f"{b.get('disk_size_gb')} GB"),
    Column("ACTIVE BUILD", lambda b: short_id(b["active_build_id"]) if b.get("active_build_id") else None),
    Column("QUEUED", lambda b: len(b.get("queued_builds") or [])),
    Column("LAST USED", lambda b: age(b.get("last_used_at")) if b.get("last_used_at") else None),
    Column("CREATED", lambda b: age(b.get("created_at"))),
]


def resolve_builder(client: Hypeman, query: str) -> Builder:
    return resolve.pick(client.builders.list(), query, "builder", lambda b: b.id, lambda b: b.name)


@builder_app.command("create")
def create(
    ctx: typer.Context,
    builder_id: Annotated[str | None, typer.Option(
        "--id", help="the builder's id (default: generated)")] = None,
    name: Annotated[str | None, typer.Option(help="display name (need not be unique)")] = None,
    disk_size: Annotated[int | None, typer.Option(
        "--disk-size", help="cache disk size in GB (default: the server's); cannot change later")] = None,
    tag: TagOption = None,
) -> None:
    """Create a builder: a persistent cache disk for builds."""
    st = state.get(ctx)
    created = st.client().builders.create(id=builder_id or omit, name=name or omit,
                                          disk_size_gb=disk_size if disk_size is not None else omit,
                                          tags=key_values(tag or [], "--tag") or omit)
    emit(created, st.fmt, BUILDER_COLUMNS)


@builder_app.command("list")
def list_(
    ctx: typer.Context,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="ids only")] = False,
    tag: TagOption = None,
) -> None:
    """List builders (the build running on each, and those waiting)."""
    st = state.get(ctx)
    found = st.client().builders.list(tags=key_values(tag or [], "--tag") or omit)
    emit_listing(found, st.fmt, BUILDER_COLUMNS, quiet)


@builder_app.command("get")
def get(ctx: typer.Context, builder: BuilderArg) -> None:
    """Show one builder."""
    st = state.get(ctx)
    emit(resolve_builder(st.client(), builder), st.fmt)


@builder_app.command("prune")
def prune(ctx: typer.Context, builder: BuilderArg) -> None:
    """Empty a builder's cache (refused while a build runs on it)."""
    st = state.get(ctx)
    client = st.client()
    emit(client.builders.prune(resolve_builder(client, builder).id), st.fmt, BUILDER_COLUMNS)


BuildersArg = Annotated[list[str], typer.Argument(help="builders to delete", show_default=False)]


def _delete(ctx: typer.Context, builders: list[str]) -> None:
    st = state.get(ctx)
    client = st.client()
    deleted = []
    for query in builders:
        found = resolve_builder(client, query)
        client.builders.delete(found.id)
        deleted.append(found.id)
    emit_names(deleted, st.fmt)


@builder_app.command("delete")
def delete(ctx: typer.Context, builders: BuildersArg) -> None:
    """Delete builders and their caches (refused while a build runs or waits on one)."""
    _delete(ctx, builders)


@builder_app.command("rm", hidden=True)
def rm(ctx: typer.Context, builders: BuildersArg) -> None:
    """Delete builders (alias of delete)."""
    _delete(ctx, builders)
