"""``ingress create|list|get|delete``: HTTP(S) routes from the server's proxy to instances.

``create <instance>`` follows the Go CLI: ``-H/--hostname`` to match, ``-p/--port`` on the
instance, ``--host-port`` the proxy listens on (80), ``--tls``, ``--redirect-http``,
``--request-header-auth-header/-value``, ``--name``, ``--tag``. The instance is resolved
client-side (id, name, unique id prefix) and the route is made to its *name*, so it follows the
instance; a template such as ``{instance}`` (with ``-H '{instance}.example.com'``) is sent as it
is. ``<ingress>`` arguments go to the server, which takes an id, a name or a unique id prefix.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer
from hypeman import omit
from hypeman.types import IngressRuleParam

from hypeman_cli import resolve, state
from hypeman_cli.errors import CLIError
from hypeman_cli.output import Column, delete_each, emit, emit_listing
from hypeman_cli.units import age, key_values, short_id

ingress_app = typer.Typer(help="Ingresses: hostnames routed to instances by the server's proxy.",
                          no_args_is_help=True)

TagOption = Annotated[list[str] | None, typer.Option("--tag", "-l", help="KEY=VALUE tag (repeatable)")]
IngressArg = Annotated[str, typer.Argument(help="ingress id, name or unique id prefix", show_default=False)]


def _rule_text(rule: dict[str, Any], what: str) -> str:
    match, target = rule.get("match", {}), rule.get("target", {})
    if what == "from":
        scheme = "https" if rule.get("tls") else "http"
        return f"{scheme}://{match.get('hostname')}:{match.get('port', 80)}"
    return f"{target.get('instance')}:{target.get('port')}"


INGRESS_COLUMNS = [
    Column("INGRESS ID", lambda r: short_id(r.get("id", ""))),
    Column("NAME", lambda r: r.get("name")),
    Column("FROM", lambda r: " ".join(_rule_text(x, "from") for x in r.get("rules", []))),
    Column("TO", lambda r: " ".join(_rule_text(x, "to") for x in r.get("rules", []))),
    Column("CREATED", lambda r: age(r.get("created_at"))),
]


def default_name(hostname: str, port: int) -> str:
    """``app.example.com`` on 80 -> ``app-example-com``; another port is appended."""
    base = re.sub(r"[^a-z0-9-]+", "-", hostname.lower()).strip("-") or "ingress"
    suffix = "" if port == 80 else f"-{port}"
    return base[: 63 - len(suffix)].strip("-") + suffix


@ingress_app.command("create")
def create(
    ctx: typer.Context,
    instance: Annotated[str, typer.Argument(
        help="target instance (id, name, id prefix), or a template such as '{instance}'",
        show_default=False)],
    hostname: Annotated[str, typer.Option(
        "--hostname", "-H", help="hostname to match, or a pattern such as '{instance}.example.com'",
        show_default=False)],
    port: Annotated[int, typer.Option("--port", "-p", help="port on the instance", show_default=False)],
    host_port: Annotated[int, typer.Option(help="port the proxy listens on")] = 80,
    tls: Annotated[bool, typer.Option(
        "--tls", help="terminate TLS (certificate from the server's CA, or ACME)")] = False,
    redirect_http: Annotated[bool, typer.Option(
        "--redirect-http", help="with --tls: port 80 redirects to HTTPS")] = False,
    auth_header: Annotated[str | None, typer.Option(
        "--request-header-auth-header", help="a header every request must carry")] = None,
    auth_value: Annotated[str | None, typer.Option(
        "--request-header-auth-value", help="its exact value (32-256 characters)")] = None,
    name: Annotated[str | None, typer.Option(help="ingress name (default: from the hostname)")] = None,
    tag: TagOption = None,
) -> None:
    """Route a hostname to an instance's port."""
    if (auth_header is None) != (auth_value is None):
        raise CLIError("--request-header-auth-header and --request-header-auth-value go together")
    if redirect_http and not tls:
        raise CLIError("--redirect-http needs --tls")
    st = state.get(ctx)
    client = st.client()
    target = instance if "{" in instance else resolve.instance(client, instance).name
    rule: IngressRuleParam = {"match": {"hostname": hostname, "port": host_port},
                              "target": {"instance": target, "port": port},
                              "tls": tls, "redirect_http": redirect_http}
    if auth_header is not None and auth_value is not None:
        rule["request_header_auth"] = {"header": auth_header, "value": auth_value}
    created = client.ingresses.create(name=name or default_name(hostname, host_port), rules=[rule],
                                      tags=key_values(tag or [], "--tag") or omit)
    emit(created, st.fmt, INGRESS_COLUMNS)


@ingress_app.command("list")
def list_(
    ctx: typer.Context,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="ids only")] = False,
    tag: TagOption = None,
) -> None:
    """List ingresses."""
    st = state.get(ctx)
    found = st.client().ingresses.list(tags=key_values(tag or [], "--tag") or omit)
    emit_listing(found, st.fmt, INGRESS_COLUMNS, quiet)


@ingress_app.command("get")
def get(ctx: typer.Context, ingress: IngressArg) -> None:
    """Show one ingress."""
    st = state.get(ctx)
    emit(st.client().ingresses.get(ingress), st.fmt)


IngressesArg = Annotated[list[str], typer.Argument(help="ingresses to delete", show_default=False)]


def _delete(ctx: typer.Context, ingresses: list[str]) -> None:
    st = state.get(ctx)
    client = st.client()
    delete_each(ingresses, client.ingresses.get, client.ingresses.delete, st.fmt)


@ingress_app.command("delete")
def delete(ctx: typer.Context, ingresses: IngressesArg) -> None:
    """Delete ingresses."""
    _delete(ctx, ingresses)


@ingress_app.command("rm", hidden=True)
def rm(ctx: typer.Context, ingresses: IngressesArg) -> None:
    """Delete ingresses (alias of delete)."""
    _delete(ctx, ingresses)
