"""``hypeman build [DIR]`` and ``build list|get|cancel|logs``: images built from a Dockerfile by
the server, inside a builder VM.

``hypeman build`` packs DIR (less its ``.dockerignore``) into a temporary tar.gz, uploads it with
``builds.create`` and follows ``builds.events``: the build's log on stderr, a status line (status,
elapsed time, queue position), and at the end the image reference on stdout (the Build as JSON
with ``--format json``). ``-t/--image-name`` names the image (docker's ``-t``); ``--tag K=V`` are
the build's tags (the Go CLI's ``--tag``). Ctrl-C cancels the build (exit status 130).

``build`` is a group whose subcommands are ``list``, ``get``, ``cancel`` and ``logs``; any other
first argument (a directory, an option, nothing) is the build itself, so a context directory
called ``list`` is written ``./list``. The builders are ``builders.py``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any

import typer
from hypeman import NOT_GIVEN, APIStatusError, Hypeman, omit
from hypeman.types import Build
from rich.markup import escape
from rich.text import Text
from typer.core import TyperCommand, TyperGroup

from hypeman_cli import resolve, state
from hypeman_cli.buildcontext import DOCKERFILE, IgnoreRules, PackedContext, pack_context
from hypeman_cli.builders import resolve_builder
from hypeman_cli.errors import CLIError
from hypeman_cli.output import Column, Format, emit, emit_listing, emit_names
from hypeman_cli.progress import Transfer, interactive, note, stderr
from hypeman_cli.units import age, human_bytes, key_values, parse_duration, parse_size, short_id

FINISHED = ("ready", "failed", "cancelled")
QUEUE_POLL_SECONDS = 1.0
UPLOAD_TIMEOUT_SECONDS = 3600.0
DEFAULT_COMMAND = "__build__"
SUBCOMMANDS_HELP = ("Subcommands: `hypeman build list [--tag K=V]`, `build get ID`, `build cancel ID...`, "
                    "`build logs ID [-f]`.")

BUILD_COLUMNS = [
    Column("BUILD ID", lambda b: short_id(b.get("id", ""))),
    Column("STATUS", lambda b: b.get("status")),
    Column("IMAGE", lambda b: b.get("image_ref")),
    Column("DURATION", lambda b: f"{b['duration_ms'] / 1000:.1f}s" if b.get("duration_ms") is not None
           else None),
    Column("BUILDER", lambda b: short_id(b["builder_id"]) if b.get("builder_id") else None),
    Column("CREATED", lambda b: age(b.get("created_at"))),
]


class BuildGroup(TyperGroup):
    """``hypeman build`` with a default command: ``build ./app -t x`` and ``build -t x`` run the
    build; ``build list`` (any known subcommand name first) runs that subcommand."""

    # The context and formatter are click's (typer's own copy of click in typer >= 0.24): typed
    # loosely so that either works.
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands or args[0] == DEFAULT_COMMAND:
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


class DefaultBuildCommand(TyperCommand):
    """Shows itself as ``hypeman build [OPTIONS] [DIR]`` (not under its internal name)."""

    def format_usage(self, ctx: Any, formatter: Any) -> None:
        path = ctx.parent.command_path if ctx.parent is not None else ctx.command_path
        formatter.write_usage(path, " ".join(self.collect_usage_pieces(ctx)))


build_app = typer.Typer(cls=BuildGroup, help="Build images from Dockerfiles (inside builder VMs).",
                        no_args_is_help=False)

TagOption = Annotated[list[str] | None, typer.Option("--tag", "-l", help="KEY=VALUE tag (repeatable)")]
BuildArg = Annotated[str, typer.Argument(help="build id or unique id prefix", show_default=False)]


def resolve_build(client: Hypeman, query: str) -> Build:
    """A build by its id, else by a unique id prefix (tables show 12 characters)."""
    return resolve.pick(client.builds.list(), query, "build", lambda b: b.id, lambda b: None)


# --- the flags ------------------------------------------------------------------------------

def timeout_seconds(text: str | None) -> int | None:
    """``--timeout``: seconds (``600``) or a Go duration (``10m``)."""
    if text is None:
        return None
    seconds = parse_duration(text)
    if seconds < 1:
        raise CLIError(f"--timeout {text!r}: at least one second")
    return int(seconds)


def memory_mb(text: str | None) -> int | None:
    """``--memory``: MB as the Go CLI takes it (``2048``), or a size (``2GB``, ``512MB``)."""
    if text is None:
        return None
    value = text.strip()
    if value.isdigit():
        return int(value)
    return parse_size(value, "--memory") // (1024 * 1024)


def secrets_json(values: list[str] | None) -> str | None:
    """``--secret`` values as the API's JSON array of ``{"id": ...}``: each value is an id
    (``npm_token``), ``id=npm_token`` (buildx's form), a comma list of those, or a JSON array."""
    ids: list[str] = []
    for value in values or []:
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except ValueError as exc:
                raise CLIError(f"--secret {value!r}: not a JSON array ({exc})") from None
            for item in parsed if isinstance(parsed, list) else [None]:
                if isinstance(item, dict) and isinstance(item.get("id"), str):
                    ids.append(item["id"])
                elif isinstance(item, str):
                    ids.append(item)
                else:
                    raise CLIError(f"--secret {value!r}: a JSON array of ids or of {{\"id\": ...}}")
            continue
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, rest = part.partition("=")
            if sep and key != "id":
                raise CLIError(f"--secret {part!r}: an id, or id=ID")
            ids.append(rest if sep else part)
    return json.dumps([{"id": secret} for secret in ids]) if ids else None


def dockerfile_choice(context: Path, file: str | None, rules: IgnoreRules) -> tuple[str | None, str]:
    """The ``dockerfile`` form field (None: the server reads ``Dockerfile`` in the tarball) and
    the file named, for messages. ``-f`` is taken from the current directory, else from the
    context (the Go CLI's rule). A Dockerfile the ``.dockerignore`` excludes is sent in the
    field, so the server has it and ``COPY .`` does not copy it (as docker does)."""
    if file is None:
        path = context / DOCKERFILE
        if not path.is_file():
            raise CLIError(f"no Dockerfile in {context} (give one with -f PATH)")
    else:
        path = Path(file)
        if not path.is_file() and not path.is_absolute() and (context / file).is_file():
            path = context / file
        if not path.is_file():
            raise CLIError(f"Dockerfile {file} not found")
    in_context = (context / DOCKERFILE).is_file() and path.resolve() == (context / DOCKERFILE).resolve()
    if in_context and not rules.excluded(DOCKERFILE):
        return None, str(path)
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read the Dockerfile {path}: {exc}") from None


# --- following a build ----------------------------------------------------------------------

class _StatusLine:
    """The live line under the log: status, elapsed time, queue position (rendered anew at each
    refresh, so the clock moves while no event comes)."""

    def __init__(self, watch: BuildWatch) -> None:
        self.watch = watch

    def __rich__(self) -> Text:
        return Text(self.watch.summary())


class BuildWatch:
    """The display of one build while it is followed: log lines and status changes on stderr;
    on a terminal a spinner line with the status and the time so far; off a terminal one plain
    line per status (and per new queue position)."""

    def __init__(self, build: Build, quiet: bool = False) -> None:
        self.build_id = build.id
        self.status: str = build.status
        self.queue_position = build.queue_position
        self.started = time.monotonic()
        self.quiet = quiet
        self.live = interactive() and not quiet
        self._spinner: Any = None
        self._announced = ""
        self._lock = threading.Lock()  # the queue poller's thread sets the position

    def _state(self) -> str:
        position = (f" (queue position {self.queue_position})"
                    if self.status == "queued" and self.queue_position else "")
        return f"{self.status}{position}"

    def summary(self) -> str:
        elapsed = int(time.monotonic() - self.started)
        return f"build {short_id(self.build_id)}: {self._state()} {elapsed // 60}:{elapsed % 60:02d}"

    def __enter__(self) -> BuildWatch:
        if self.live:
            self._spinner = stderr.status(_StatusLine(self))
            self._spinner.start()
        self._announce()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._spinner is not None:
            self._spinner.stop()
            self._spinner = None

    def _announce(self) -> None:
        if self.live or self.quiet:
            return
        line = f"build {self.build_id}: {self._state()}"
        if line != self._announced:
            self._announced = line
            note(line)

    def log(self, line: str) -> None:
        if self.quiet:
            return
        if self.live:
            stderr.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
        else:
            note(line)

    def set_status(self, status: str) -> None:
        """A status event: while still queued, the last position known stays."""
        with self._lock:
            self.status = status
            if status != "queued":
                self.queue_position = None
            self._announce()

    def set_position(self, queue_position: int | None) -> None:
        """A polled queue position: shown only while the build is still queued."""
        with self._lock:
            if self.status == "queued" and queue_position is not None:
                self.queue_position = queue_position
                self._announce()


def _poll_queue(poll: Callable[[], Build], watch: BuildWatch, stop: threading.Event) -> None:
    """While the build waits in the queue, its position (the events do not carry it)."""
    while not stop.wait(QUEUE_POLL_SECONDS) and watch.status == "queued":
        try:
            found = poll()
        except Exception:
            return  # only a display: the events stream reports what matters
        if found.status == "queued":
            watch.set_position(found.queue_position)


def follow_build(client: Hypeman, build: Build, watch: BuildWatch, poll_client: Hypeman) -> Build:
    """Print the build's events until it ends; the build as it ended. ``poll_client`` (its own
    connections beside the long-lived stream) asks for the queue position meanwhile."""
    stop = threading.Event()
    poller = threading.Thread(target=_poll_queue, daemon=True,
                              args=(lambda: poll_client.builds.get(build.id), watch, stop))
    poller.start()
    stream = client.builds.events(build.id, follow=True, timeout=None)
    try:
        for event in stream:
            if event.type == "log" and event.content is not None:
                for line in event.content.splitlines() or [""]:
                    watch.log(line)
            elif event.type == "status" and event.status is not None:
                watch.set_status(event.status)
                if event.status in FINISHED:
                    break
    finally:
        stop.set()
        stream.close()
    ended = client.builds.get(build.id)
    if ended.status not in FINISHED:
        raise CLIError(f"the events of build {build.id} ended while it is {ended.status}; "
                       f"`hypeman build logs -f {build.id}` follows it again")
    return ended


def cancel_on_interrupt(client: Hypeman, build_id: str) -> None:
    note(f"cancelling build {build_id}")
    try:
        client.builds.cancel(build_id)
    except APIStatusError as exc:
        if exc.status_code != 409:  # 409: it had already ended
            raise
    note(f"build {build_id} cancelled")


def failure_line(build: Build) -> str:
    """A failed build's error in one line: its first line (the summary) and, when it holds the
    failing step's log too, that log's last line (the step's own error)."""
    lines = [line.strip() for line in (build.error or "").splitlines() if line.strip()]
    if not lines:
        return f"build {build.id} failed (no reason given)"
    summary = lines[0].rstrip(":")
    detail = f": {lines[-1]}" if len(lines) > 1 else ""
    return f"build {build.id} failed: {summary}{detail}"


def report_end(build: Build, fmt: Format, log_shown: bool) -> None:
    """``ready``: the image reference is the last line on stdout; otherwise an error (the whole
    error first when the log was not shown: it holds the failing step's last lines)."""
    if fmt != "table":
        emit(build, fmt)
    if build.status == "ready":
        if fmt == "table":
            print(build.image_ref or f"builds/{build.id}", flush=True)
        return
    if build.status == "cancelled":
        raise CLIError(f"build {build.id} was cancelled")
    if not log_shown and build.error and len(build.error.strip().splitlines()) > 1:
        for line in build.error.strip().splitlines():
            note(line)
    raise CLIError(failure_line(build))


@build_app.command(DEFAULT_COMMAND, hidden=True, cls=DefaultBuildCommand, epilog=SUBCOMMANDS_HELP)
def build(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="the build context (default: the current directory)",
                                              metavar="DIR", show_default=False)] = Path("."),
    file: Annotated[str | None, typer.Option(
        "--file", "-f", help="the Dockerfile (default: DIR/Dockerfile); relative to the current "
        "directory, else to DIR")] = None,
    image_name: Annotated[str | None, typer.Option(
        "--image-name", "-t",
        help="name of the image (default: builds/<id>), e.g. myapp or team/app:v1")] = None,
    tag: TagOption = None,
    timeout: Annotated[str | None, typer.Option(
        help="build timeout: seconds or a Go duration (default: the server's, 600)")] = None,
    cpus: Annotated[int | None, typer.Option(help="vCPUs of the builder VM (default: 2)")] = None,
    memory: Annotated[str | None, typer.Option(
        help="memory of the builder VM: MB (2048) or a size (2GB) (default: 2048 MB)")] = None,
    builder: Annotated[str | None, typer.Option(
        help="builder (id, name or unique id prefix) whose persistent cache backs the build")] = None,
    base_image_digest: Annotated[str | None, typer.Option(help="pin the base image to this digest")] = None,
    cache_scope: Annotated[str | None, typer.Option(help="tenant cache key prefix")] = None,
    global_cache_key: Annotated[str | None, typer.Option(help="global cache to import from")] = None,
    is_admin_build: Annotated[bool, typer.Option(
        "--is-admin-build", help="may write the global cache (operators only)")] = False,
    secrets: Annotated[list[str] | None, typer.Option(
        "--secret", "--secrets", help="secret id for RUN --mount=type=secret (repeatable; id, id=ID, "
        "a comma list or a JSON array)")] = None,
    detach: Annotated[bool, typer.Option(
        "--detach", "-d", "--no-follow", help="print the build id and return")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no log or progress; the result only")] = False,
) -> None:
    """Build an image from a Dockerfile: DIR (less its .dockerignore) is sent to the server,
    which builds it inside a builder VM; the log streams here and the image's name is printed
    at the end. Ctrl-C cancels the build."""
    st = state.get(ctx)
    context = directory
    if not context.is_dir():
        problem = "not a directory" if context.exists() else "no such directory"
        raise CLIError(f"build context {context}: {problem}")
    rules = IgnoreRules.of(context)
    dockerfile, dockerfile_name = dockerfile_choice(context, file, rules)
    fields: dict[str, Any] = {
        "dockerfile": dockerfile, "image_name": image_name,
        "timeout_seconds": timeout_seconds(timeout), "cpus": cpus, "memory_mb": memory_mb(memory),
        "base_image_digest": base_image_digest, "cache_scope": cache_scope,
        "global_cache_key": global_cache_key, "is_admin_build": "true" if is_admin_build else None,
        "secrets": secrets_json(secrets),
        "tags": json.dumps(key_values(tag or [], "--tag")) if tag else None,
    }
    client = st.client()
    if builder is not None:
        fields["builder_id"] = resolve_builder(client, builder).id
    packed = pack_context(context, rules)
    try:
        label = f"{context}" + (f" with {dockerfile_name}" if file is not None else "")
        created = _upload(client, packed, fields, label, quiet)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None  # nothing was created on the server (or it is unknown)
    finally:
        packed.file.close()
    if detach:
        if st.fmt == "table":
            print(created.id, flush=True)
        else:
            emit(created, st.fmt)
        return
    try:
        with BuildWatch(created, quiet) as watch:
            ended = follow_build(client, created, watch, st.settings.client())
    except KeyboardInterrupt:
        cancel_on_interrupt(client, created.id)
        raise typer.Exit(130) from None
    if ended.status == "ready" and not quiet and interactive():
        seconds = (ended.duration_ms or 0) / 1000
        stderr.print(f"[green]✓[/green] built {escape(ended.image_ref or '')} in {seconds:.1f} s")
    report_end(ended, st.fmt, log_shown=not quiet)


def _upload(client: Hypeman, packed: PackedContext, fields: dict[str, Any], label: str, quiet: bool) -> Build:
    """``builds.create`` with the tarball read from its temporary file as httpx sends it."""
    given = {key: value for key, value in fields.items() if value is not None}
    if not quiet and not interactive():
        note(f"sending {label}: {packed.entries} entries, {human_bytes(packed.size)}")
    with Transfer(f"sending {label}", packed.size, quiet=quiet or not interactive()) as transfer:
        reader = _CountingReader(packed, transfer)
        return client.builds.create(source=("context.tar.gz", reader, "application/gzip"),  # type: ignore[arg-type]
                                    timeout=UPLOAD_TIMEOUT_SECONDS, **given)


class _CountingReader:
    """The spooled tarball as httpx reads it, advancing the upload bar. It keeps ``fileno`` and
    ``seek`` so httpx sends a Content-Length (from fstat) instead of chunks."""

    def __init__(self, packed: PackedContext, transfer: Transfer) -> None:
        self._file = packed.file
        self._transfer = transfer

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self._transfer.advance(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        position = self._file.seek(offset, whence)
        self._transfer.advance_to(position)
        return position

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()


# --- list, get, cancel, logs ----------------------------------------------------------------

@build_app.command("list")
def list_(
    ctx: typer.Context,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="ids only")] = False,
    tag: TagOption = None,
) -> None:
    """List builds (filtered by tags)."""
    st = state.get(ctx)
    found = st.client().builds.list(tags=key_values(tag or [], "--tag") or omit)
    emit_listing(found, st.fmt, BUILD_COLUMNS, quiet)


@build_app.command("get")
def get(ctx: typer.Context, build_id: BuildArg) -> None:
    """Show one build (status, image, error, provenance)."""
    st = state.get(ctx)
    emit(resolve_build(st.client(), build_id), st.fmt)


@build_app.command("cancel")
def cancel(ctx: typer.Context, build_ids: Annotated[list[str], typer.Argument(
        help="builds to cancel", show_default=False)]) -> None:
    """Cancel builds (queued or running; the builder VM goes)."""
    st = state.get(ctx)
    client = st.client()
    cancelled = []
    for query in build_ids:
        found = resolve_build(client, query)
        client.builds.cancel(found.id)
        cancelled.append(found.id)
    emit_names(cancelled, st.fmt)


@build_app.command("logs")
def logs(
    ctx: typer.Context,
    build_id: BuildArg,
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="keep printing until the build ends")] = False,
) -> None:
    """Print a build's log (stdout) and its status changes (stderr)."""
    st = state.get(ctx)
    client = st.client()
    found = resolve_build(client, build_id)
    stream = client.builds.events(found.id, follow=follow, timeout=None if follow else NOT_GIVEN)
    shown = ""
    try:
        for event in stream:
            if event.type == "log" and event.content is not None:
                print(event.content, flush=True)
            elif event.type == "status" and event.status is not None and event.status != shown:
                shown = event.status
                note(f"build {found.id}: {event.status}")
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    finally:
        stream.close()
