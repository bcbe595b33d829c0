"""``pull`` and ``image create|list|get|delete``; the pull progress shared with ``run``."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from hypeman import Hypeman, NotFoundError, omit
from hypeman.types import Image

from hypeman_cli import state
from hypeman_cli.errors import CLIError
from hypeman_cli.output import Column, emit, emit_lines, emit_names
from hypeman_cli.progress import Phases
from hypeman_cli.units import age, human_bytes, key_values

POLL_SECONDS = 0.3

IMAGE_COLUMNS = [
    Column("NAME", lambda r: r.get("name")),
    Column("STATUS", lambda r: r.get("status")),
    Column("SIZE", lambda r: human_bytes(r.get("size_bytes"))),
    Column("DIGEST", lambda r: (r.get("digest") or "")[:19]),
    Column("CREATED", lambda r: age(r.get("created_at"))),
]


def image_phase(image: Image) -> str:
    if image.status == "pending":
        position = f" (queue position {image.queue_position})" if image.queue_position else ""
        return f"{image.name}: queued{position}"
    if image.status == "pulling":
        return f"{image.name}: pulling"
    if image.status == "converting":
        return f"{image.name}: converting to a disk image"
    return f"{image.name}: {image.status}"


def wait_image(client: Hypeman, image: Image, phases: Phases) -> Image:
    """Poll until the image is ready (returned) or failed (an error), showing each phase."""
    while image.status not in ("ready", "failed"):
        phases.update(image_phase(image))
        time.sleep(POLL_SECONDS)
        image = client.images.get(image.name)
    if image.status == "failed":
        raise CLIError(f"image {image.name} failed: {image.error or 'no reason given'}")
    return image


def ensure_image(client: Hypeman, name: str, phases: Phases, platform: str | None = None) -> Image:
    """The image, pulled first when the server does not have it (GET, on 404 POST, then poll)."""
    try:
        image = client.images.get(name)
        pulled = False
    except NotFoundError:
        phases.update(f"{name}: requesting a pull")
        image = client.images.create(name=name, platform=platform or omit)
        pulled = True
    shown = pulled or image.status != "ready"
    image = wait_image(client, image, phases)
    if shown:
        phases.done(f"{image.name}: ready ({human_bytes(image.size_bytes)})")
    return image


image_app = typer.Typer(help="Manage images on the server.", no_args_is_help=True)

TagOption = Annotated[list[str] | None, typer.Option("--tag", "-l", help="KEY=VALUE tag (repeatable)")]


def pull(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="image reference, e.g. docker.io/library/alpine:latest")],
    tag: TagOption = None,
    platform: Annotated[str | None, typer.Option(help="os/arch[/variant] to pick from an index")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress")] = False,
) -> None:
    """Pull an image into the server and wait until it is ready (shows queue, pull, convert)."""
    st = state.get(ctx)
    client = st.client()
    with Phases(quiet) as phases:
        image = client.images.create(name=name, platform=platform or omit,
                                     tags=key_values(tag or [], "--tag") or omit)
        image = wait_image(client, image, phases)
        phases.done(f"{image.name}: ready ({human_bytes(image.size_bytes)})")
    emit(image, st.fmt, IMAGE_COLUMNS)


@image_app.command("create")
def image_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="image reference")],
    tag: TagOption = None,
    platform: Annotated[str | None, typer.Option(help="os/arch[/variant] to pick from an index")] = None,
) -> None:
    """Ask the server to pull an image (returns at once; see `hypeman pull` to wait)."""
    st = state.get(ctx)
    image = st.client().images.create(name=name, platform=platform or omit,
                                      tags=key_values(tag or [], "--tag") or omit)
    emit(image, st.fmt, IMAGE_COLUMNS)


@image_app.command("list")
def image_list(
    ctx: typer.Context,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="names only")] = False,
    tag: TagOption = None,
) -> None:
    """List the server's images."""
    st = state.get(ctx)
    images = st.client().images.list(tags=key_values(tag or [], "--tag") or omit)
    if quiet:
        emit_lines(image.name for image in images)
        return
    emit(images, st.fmt, IMAGE_COLUMNS)


@image_app.command("get")
def image_get(ctx: typer.Context, name: Annotated[str, typer.Argument(help="image name")]) -> None:
    """Show one image."""
    st = state.get(ctx)
    emit(st.client().images.get(name), st.fmt)


def _delete(ctx: typer.Context, names: list[str]) -> None:
    st = state.get(ctx)
    client = st.client()
    deleted: list[str] = []
    for name in names:
        client.images.delete(name)
        deleted.append(name)
    emit_names(deleted, st.fmt)


@image_app.command("delete")
def image_delete(ctx: typer.Context,
                 names: Annotated[list[str], typer.Argument(help="image names")]) -> None:
    """Delete images."""
    _delete(ctx, names)


@image_app.command("rm", hidden=True)
def image_rm(ctx: typer.Context, names: Annotated[list[str], typer.Argument(help="image names")]) -> None:
    """Delete images (alias of delete)."""
    _delete(ctx, names)
