"""Auto-standby in the CLI: the ``auto_standby`` policy of ``hypeman run`` and the
``hypeman auto-standby status|hold <instance>`` commands.

``--auto-standby IDLE`` is the short form (enabled, with that idle timeout); the Go CLI's
``--auto-standby-enabled``, ``--auto-standby-idle-timeout``,
``--auto-standby-ignore-destination-port`` and ``--auto-standby-ignore-source-cidr`` set the
rest. Values are checked by the server (a bad one is its 400, naming the field).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from hypeman_cli import resolve, state
from hypeman_cli.errors import CLIError
from hypeman_cli.output import emit

auto_standby_app = typer.Typer(help="auto-standby of an instance: status, hold", no_args_is_help=True)

InstanceArg = Annotated[str, typer.Argument(help="instance id, name or unique id prefix", show_default=False)]


def policy(
    *, idle: str | None, enabled: bool | None = None, idle_timeout: str | None = None,
    ignore_ports: list[int] | None = None, ignore_cidrs: list[str] | None = None,
) -> dict[str, Any] | None:
    """The create's ``auto_standby`` from the flags; None when no auto-standby flag was given."""
    if idle is not None and idle_timeout is not None and idle != idle_timeout:
        raise CLIError("--auto-standby and --auto-standby-idle-timeout say two idle timeouts; give one")
    timeout = idle if idle is not None else idle_timeout
    given = (timeout, enabled, ignore_ports or None, ignore_cidrs or None)
    if all(value is None for value in given):
        return None
    chosen: dict[str, Any] = {"enabled": enabled if enabled is not None else True}
    if timeout is not None:
        chosen["idle_timeout"] = timeout
    if ignore_ports:
        chosen["ignore_destination_ports"] = ignore_ports
    if ignore_cidrs:
        chosen["ignore_source_cidrs"] = ignore_cidrs
    return chosen


@auto_standby_app.command("status")
def status(ctx: typer.Context, instance: InstanceArg) -> None:
    """Whether the instance is counting down to standby, and why (or why not)."""
    st = state.get(ctx)
    client = st.client()
    found = resolve.instance(client, instance)
    emit(client.instances.auto_standby.status(found.id), st.fmt)


@auto_standby_app.command("hold")
def hold(ctx: typer.Context, instance: InstanceArg) -> None:
    """Keep the instance out of standby for its idle timeout from now; refused in standby."""
    st = state.get(ctx)
    client = st.client()
    found = resolve.instance(client, instance)
    emit(client.instances.auto_standby.hold(found.id), st.fmt)
