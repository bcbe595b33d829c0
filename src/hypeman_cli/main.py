"""The ``hypeman`` command: global options, the command table, and one-line errors.

``app`` is the console script's entry point (``hypeman = "hypeman_cli.main:app"``). Calling it
runs click in standalone mode; anything that escapes a command becomes ``error: <one line>`` on
stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any

import typer

from hypeman_cli import (
    __version__,
    autostandby,
    builders,
    builds,
    images,
    ingress,
    instances,
    snapshots,
    state,
    system,
    volumes,
)
from hypeman_cli.copy import cp
from hypeman_cli.errors import CLIError, describe
from hypeman_cli.execute import exec_
from hypeman_cli.output import FORMATS
from hypeman_cli.progress import interactive, stderr
from hypeman_cli.push import push

GLOBAL_OPTIONS = ("--format", "--base-url")


def hoist_global_options(argv: list[str]) -> list[str]:
    """``hypeman ps --format json`` as well as ``hypeman --format json ps``: the global options
    are moved to the front wherever they are, up to ``--`` and, for ``exec``, up to the
    instance (everything after it is the command's own)."""
    hoisted: list[str] = []
    rest: list[str] = []
    command: str | None = None
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--":
            rest.extend(argv[index:])
            break
        name = token.split("=", 1)[0]
        if name in GLOBAL_OPTIONS:
            if "=" in token:
                hoisted.append(token)
            else:
                hoisted.extend(argv[index:index + 2])
                index += 1
            index += 1
            continue
        if not token.startswith("-"):
            if command is None:
                command = token
            elif command == "exec":
                rest.extend(argv[index:])  # the instance, then the command and its arguments
                break
        rest.append(token)
        index += 1
    return hoisted + rest


class HypemanApp(typer.Typer):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not args and "args" not in kwargs:
            kwargs["args"] = hoist_global_options(sys.argv[1:])
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit:
            raise
        except KeyboardInterrupt:
            sys.exit(130)
        except BrokenPipeError:
            # The reader went away (`hypeman ps | head -1`): not an error worth a message.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(0)
        except Exception as exc:
            message = describe(exc, state.CURRENT.base_url)
            if interactive():
                stderr.print(f"[bold red]error:[/bold red] {message}", markup=True, highlight=False)
            else:
                print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(exc.exit_code if isinstance(exc, CLIError) else 1)


app = HypemanApp(
    name="hypeman",
    help="Run OCI images as virtual machines on a Hypeman server (docker-like commands).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"hypeman {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    base_url: Annotated[str | None, typer.Option(
        "--base-url", help="server URL (else HYPEMAN_BASE_URL, cli.yaml base_url, http://localhost:4973)",
        show_default=False)] = None,
    format_: Annotated[str, typer.Option(
        "--format", help="table, json or yaml (auto: table on a terminal, JSON when piped)")] = "auto",
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version")] = False,
) -> None:
    if format_ not in FORMATS:
        raise typer.BadParameter(f"one of {', '.join(FORMATS)}", param_hint="--format")
    state.CURRENT.base_url_flag = base_url
    state.CURRENT.format_name = format_
    ctx.obj = state.CURRENT


app.command("run")(instances.run)
app.command("ps")(instances.ps)
app.command("inspect")(instances.inspect)
app.command("logs")(instances.logs)
app.command("exec", context_settings={"allow_interspersed_args": False})(exec_)
app.command("cp")(cp)
app.command("stats")(instances.stats)
app.command("wait")(instances.wait)
app.command("stop")(instances.stop)
app.command("start")(instances.start)
app.command("standby")(instances.standby)
app.command("restore")(instances.restore)
app.command("fork")(instances.fork)
app.command("rm")(instances.rm)
app.command("pull")(images.pull)
app.command("push")(push)
app.add_typer(builds.build_app, name="build")
app.add_typer(builders.builder_app, name="builder")
app.add_typer(images.image_app, name="image")
app.add_typer(snapshots.snapshot_app, name="snapshot")
app.add_typer(ingress.ingress_app, name="ingress")
app.add_typer(volumes.volume_app, name="volume")
app.add_typer(autostandby.auto_standby_app, name="auto-standby")
app.add_typer(system.resources_app, name="resources")
app.command("health")(system.health)


if __name__ == "__main__":
    app()
