"""``cp``: files in and out of a running instance with the SDK's ``hypeman.lib.cp``.

One side is ``<instance>:<path>``. As ``docker cp``: copying into an existing directory puts the
source inside it under its own name, otherwise the destination is the new name. The guest side
is looked at first with ``GET /instances/{id}/stat``, as the Go CLI does. Progress (bytes and
speed) comes from the SDK's ``CopyCallbacks``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Annotated

import typer
from hypeman import Hypeman
from hypeman.lib import CopyCallbacks, cp_from_instance, cp_to_instance

from hypeman_cli import resolve, state
from hypeman_cli.errors import CLIError
from hypeman_cli.progress import Transfer


def split_remote(spec: str) -> tuple[str, str] | None:
    """``web:/etc/hosts`` -> ("web", "/etc/hosts"); a local path (``./a:b``, ``/x``) -> None."""
    head, sep, tail = spec.partition(":")
    if not sep or not head or "/" in head or head in (".", ".."):
        return None
    return head, tail


def _local_size(path: Path, follow_links: bool) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path, followlinks=follow_links):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue
    return total


def _callbacks(transfer: Transfer) -> CopyCallbacks:
    base = {"done": 0}

    def on_file_start(name: str, size: int) -> None:
        base["done"] = transfer.completed
        transfer.describe(PurePosixPath(name).name or name)

    def on_progress(copied: int) -> None:
        transfer.advance_to(base["done"] + copied)

    return CopyCallbacks(on_file_start=on_file_start, on_progress=on_progress)


def upload(client: Hypeman, instance_id: str, source: Path, guest: str, *, archive: bool, follow_links: bool,
           quiet: bool) -> None:
    if not source.exists():
        raise CLIError(f"no such local file or directory: {source}")
    info = client.instances.stat(instance_id, path=guest, follow_links=True)
    if (info.exists and info.is_dir) or guest.endswith("/"):
        guest = str(PurePosixPath(guest) / source.resolve().name)
    with Transfer(f"{source} -> {guest}", _local_size(source, follow_links), quiet) as transfer:
        cp_to_instance(client, instance_id, source, guest, archive=archive, follow_symlinks=follow_links,
                       callbacks=_callbacks(transfer))


def download(client: Hypeman, instance_id: str, guest: str, destination: Path, *, archive: bool,
             follow_links: bool, quiet: bool) -> None:
    info = client.instances.stat(instance_id, path=guest, follow_links=follow_links)
    if not info.exists:
        raise CLIError(f"no such file or directory in the instance: {guest}"
                       + (f" ({info.error})" if info.error else ""))
    name = PurePosixPath(guest.rstrip("/") or "/").name
    total = info.size if info.is_file and info.size is not None else None
    with Transfer(f"{guest} -> {destination}", total, quiet) as transfer:
        callbacks = _callbacks(transfer)
        if destination.is_dir():
            cp_from_instance(client, instance_id, guest, destination, archive=archive,
                             follow_symlinks=follow_links, callbacks=callbacks)
            return
        parent = destination.parent
        if not parent.is_dir():
            raise CLIError(f"no such local directory: {parent}")
        if not name:
            raise CLIError("copying / needs an existing local directory as the destination")
        # Into a scratch directory beside the destination, then renamed: the destination is
        # the new name, as with docker cp.
        scratch = Path(tempfile.mkdtemp(prefix=".hypeman-cp-", dir=parent))
        try:
            cp_from_instance(client, instance_id, guest, scratch, archive=archive,
                             follow_symlinks=follow_links, callbacks=callbacks)
            os.replace(scratch / name, destination)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def cp(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="local path or <instance>:<path>", show_default=False)],
    destination: Annotated[str, typer.Argument(help="local path or <instance>:<path>", show_default=False)],
    archive: Annotated[bool, typer.Option("--archive", "-a", help="keep owner uid/gid")] = False,
    follow_links: Annotated[bool, typer.Option("--follow-links", "-L", help="follow symbolic links")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress")] = False,
) -> None:
    """Copy files between this machine and an instance: `cp ./app web:/srv/`, `cp web:/var/log ./logs`."""
    remote_source, remote_destination = split_remote(source), split_remote(destination)
    if (remote_source is None) == (remote_destination is None):
        raise CLIError("exactly one of the two paths must be <instance>:<path>")
    client = state.get(ctx).client()
    if remote_destination is not None:
        query, guest = remote_destination
        found = resolve.instance(client, query)
        upload(client, found.id, Path(source), guest or "/", archive=archive, follow_links=follow_links,
               quiet=quiet)
    else:
        assert remote_source is not None
        query, guest = remote_source
        if not guest:
            raise CLIError("name the path in the instance: <instance>:<path>")
        found = resolve.instance(client, query)
        download(client, found.id, guest, Path(destination), archive=archive, follow_links=follow_links,
                 quiet=quiet)
