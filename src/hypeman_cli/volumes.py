"""``volume create|import|list|get|delete(rm)``: disks that outlive instances.

``create`` follows the Go CLI (``--name``, ``--size`` in GB, ``--id``, ``--tag``,
``--from-archive PATH|-``); ``import ARCHIVE`` is the same as ``create --from-archive``, and also
takes a directory, packed as tar.gz on the fly. An archive is streamed to the server as it is
read (a file, stdin or the packing thread), never loaded whole. ``<volume>`` arguments go to the
server, which takes an id, a name or a unique id prefix.
"""

from __future__ import annotations

import os
import sys
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Annotated

import typer
from hypeman import omit

from hypeman_cli import state
from hypeman_cli.errors import CLIError
from hypeman_cli.output import Column, delete_each, emit, emit_listing
from hypeman_cli.units import age, key_values, short_id

volume_app = typer.Typer(help="Volumes: disks that outlive instances.", no_args_is_help=True)

TagOption = Annotated[list[str] | None, typer.Option("--tag", "-l", help="KEY=VALUE tag (repeatable)")]
NameOption = Annotated[str, typer.Option("--name", help="volume name", show_default=False)]
SizeOption = Annotated[int, typer.Option("--size", help="size in GB (an archive's content must fit)",
                                         show_default=False)]
IdOption = Annotated[str | None, typer.Option("--id", help="the volume's id (default: generated)")]
VolumeArg = Annotated[str, typer.Argument(help="volume id, name or unique id prefix", show_default=False)]

VOLUME_COLUMNS = [
    Column("VOLUME ID", lambda v: short_id(v.get("id", ""))),
    Column("NAME", lambda v: v.get("name")),
    Column("SIZE", lambda v: f"{v.get('size_gb')} GB"),
    Column("ATTACHED TO", lambda v: ", ".join(short_id(a["instance_id"]) for a in v.get("attachments") or [])
           or "-"),
    Column("CREATED", lambda v: age(v.get("created_at"))),
]


CHUNK = 1 << 20


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    """A pipe's bytes as they come (sent chunked: httpx would take a pipe's fstat size for its
    length)."""
    while chunk := stream.read(CHUNK):
        yield chunk


@contextmanager
def archive_stream(source: str) -> Iterator[IO[bytes] | Iterator[bytes]]:
    """``source`` as a tar.gz body: ``-`` (stdin), a file (its length known), or a directory
    packed by a thread into a pipe."""
    if source == "-":
        yield _chunks(sys.stdin.buffer)
        return
    path = Path(source)
    if not path.is_dir():
        with path.open("rb") as file:
            yield file
        return
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def pack() -> None:
        try:
            with os.fdopen(write_fd, "wb") as pipe, tarfile.open(fileobj=pipe, mode="w|gz") as archive:
                archive.add(path, arcname=".")
        except BaseException as exc:  # reported by the reading side
            failure.append(exc)

    packer = threading.Thread(target=pack, daemon=True)
    packer.start()
    with os.fdopen(read_fd, "rb") as reader:
        yield _chunks(reader)
    packer.join()
    if failure and not isinstance(failure[0], BrokenPipeError):
        raise CLIError(f"packing {source} failed: {failure[0]}")


def _create(ctx: typer.Context, name: str, size: int, volume_id: str | None, tag: list[str] | None,
            archive: str | None) -> None:
    st = state.get(ctx)
    client = st.client()
    tags = key_values(tag or [], "--tag") or omit
    if archive is None:
        created = client.volumes.create(name=name, size_gb=size, id=volume_id or omit, tags=tags)
    else:
        if archive != "-" and not Path(archive).exists():
            raise CLIError(f"{archive}: no such file or directory")
        with archive_stream(archive) as stream:
            created = client.volumes.create_from_archive(stream, name=name, size_gb=size,
                                                         id=volume_id or omit, tags=tags, timeout=3600)
    emit(created, st.fmt, VOLUME_COLUMNS)


@volume_app.command("create")
def create(
    ctx: typer.Context,
    name: NameOption,
    size: SizeOption,
    volume_id: IdOption = None,
    tag: TagOption = None,
    from_archive: Annotated[str | None, typer.Option(
        "--from-archive", help="fill it from a tar.gz file, a directory, or - (stdin)")] = None,
) -> None:
    """Create a volume: an empty ext4 disk, or one holding an archive's files."""
    _create(ctx, name, size, volume_id, tag, from_archive)


@volume_app.command("import")
def import_(
    ctx: typer.Context,
    archive: Annotated[str, typer.Argument(help="a tar.gz file, a directory, or - (stdin)",
                                           show_default=False)],
    name: NameOption,
    size: SizeOption,
    volume_id: IdOption = None,
    tag: TagOption = None,
) -> None:
    """Create a volume holding the files of an archive or a directory."""
    _create(ctx, name, size, volume_id, tag, archive)


@volume_app.command("list")
def list_(
    ctx: typer.Context,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="ids only")] = False,
    tag: TagOption = None,
) -> None:
    """List volumes."""
    st = state.get(ctx)
    found = st.client().volumes.list(tags=key_values(tag or [], "--tag") or omit)
    emit_listing(found, st.fmt, VOLUME_COLUMNS, quiet)


@volume_app.command("get")
def get(ctx: typer.Context, volume: VolumeArg) -> None:
    """Show one volume."""
    st = state.get(ctx)
    emit(st.client().volumes.get(volume), st.fmt)


VolumesArg = Annotated[list[str], typer.Argument(help="volumes to delete", show_default=False)]


def _delete(ctx: typer.Context, volumes: list[str]) -> None:
    st = state.get(ctx)
    client = st.client()
    delete_each(volumes, client.volumes.get, client.volumes.delete, st.fmt)


@volume_app.command("delete")
def delete(ctx: typer.Context, volumes: VolumesArg) -> None:
    """Delete volumes (not while attached to an instance)."""
    _delete(ctx, volumes)


@volume_app.command("rm", hidden=True)
def rm(ctx: typer.Context, volumes: VolumesArg) -> None:
    """Delete volumes (alias of delete)."""
    _delete(ctx, volumes)
