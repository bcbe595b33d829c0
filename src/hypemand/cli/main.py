"""The ``hypemand`` command: run the server, mint tokens."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from hypemand.config import DEFAULT_HOST, DEFAULT_PORT, Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Hypeman VM API server.")

DataDirOption = typer.Option(None, "--data-dir", help="State directory (default /var/lib/hypemand as root).")


@app.command()
def serve(
    host: str = typer.Option(DEFAULT_HOST, help="Address to listen on."),
    port: int = typer.Option(DEFAULT_PORT, help="Port to listen on."),
    data_dir: Path | None = DataDirOption,
    log_level: str = typer.Option("info", help="Log level."),
    network_namespace: str | None = typer.Option(
        None, envvar="HYPEMAND_NETWORK_NAMESPACE",
        help="Build the VM network (bridge, TAPs, NAT, ingress proxy) in this network namespace, "
        "made if missing. Default: the host's namespace.",
    ),
    uplink: str | None = typer.Option(
        None, envvar="UPLINK_INTERFACE", help="NAT out of this interface (default: the default route's)."
    ),
) -> None:
    """Run the API server."""
    import uvicorn

    from hypemand.api.app import create_app
    from hypemand.api.limits import MAX_WEBSOCKET_MESSAGE_BYTES
    from hypemand.errors import DomainError
    from hypemand.network import NetworkConfigError
    from hypemand.runtime import check_host

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.load(data_dir, host=host, port=port).model_copy(
        update={"network_namespace": network_namespace, "uplink": uplink}
    )
    try:
        check_host(settings)
    except (DomainError, NetworkConfigError) as error:
        typer.echo(f"hypemand: cannot start: {error}", err=True)
        raise typer.Exit(1) from None
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        ws="websockets-sansio",
        ws_max_size=MAX_WEBSOCKET_MESSAGE_BYTES,  # one exec/cp message; uvicorn's default is 16 MiB
        # A SIGTERM waits this long for open requests (an exec into a VM paused on a full disk
        # may never end), then cancels them: the server always stops, and VMs outlive it anyway.
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
    )


SHUTDOWN_GRACE_SECONDS = 5


@app.command()
def token(
    data_dir: Path | None = DataDirOption,
    subject: str = typer.Option("admin", "--user-id", help="The token's subject (user id)."),
    ttl: int | None = typer.Option(None, help="Lifetime in seconds (default: no expiry)."),
    scope: list[str] | None = typer.Option(None, "--scope", help="Permission scope, e.g. instance:read."),
) -> None:
    """Print an API token signed with this server's secret."""
    from hypemand.auth import load_secret, mint_token

    settings = Settings.load(data_dir)
    typer.echo(mint_token(load_secret(settings.layout, settings.jwt_secret), subject, ttl, scope))


@app.command("demo-image")
def demo_image(
    url: str = typer.Option(f"http://{DEFAULT_HOST}:{DEFAULT_PORT}", help="The running server."),
    data_dir: Path | None = DataDirOption,
    name: str = typer.Option("demo/busybox:latest", help="Name to push the image as."),
    wait: float = typer.Option(600, help="Seconds to wait for the image to be ready (0: do not wait)."),
    api_key: str | None = typer.Option(None, envvar="HYPEMAN_API_KEY", help="Token (else minted here)."),
) -> None:
    """Build a small busybox image (Debian busybox-static, no internet) and push it into the server.

    Needs the server running (the push goes through its /v2 registry). The token is minted with
    the data dir's secret unless HYPEMAN_API_KEY is set. Safe to run again: same image, same digest.
    """
    from hypemand.auth import load_secret, mint_token
    from hypemand.images import demo

    settings = Settings.load(data_dir)
    api_key = api_key or mint_token(
        load_secret(settings.layout, settings.jwt_secret), "demo-image", ttl_seconds=3600)
    try:
        image = demo.install(url.rstrip("/"), api_key, name, wait)
    except demo.ServerUnreachable as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    status = image.get("status", "pushed")
    typer.echo(f"{image.get('name', name)}: {status}")


if __name__ == "__main__":
    app()
