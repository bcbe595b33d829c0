"""Instance commands: run, ps, inspect, logs, stats, wait, stop, start, standby, restore, fork, rm."""

from __future__ import annotations

import re
import secrets
import sys
import time
from typing import Annotated, Any, Literal, cast

import typer
from hypeman import NOT_GIVEN, Hypeman, omit
from hypeman.types import Instance
from hypeman.types.shared_params import SnapshotCompressionConfig

from hypeman_cli import autostandby, resolve, state, supervision
from hypeman_cli.errors import CLIError, describe
from hypeman_cli.images import ensure_image
from hypeman_cli.output import Column, emit, emit_lines
from hypeman_cli.progress import Phases, note
from hypeman_cli.units import age, key_values, parse_duration, short_id

InstanceState = Literal["Created", "Initializing", "Running", "Paused", "Shutdown", "Stopped", "Standby",
                        "Unknown"]
STATES: tuple[str, ...] = ("Created", "Initializing", "Running", "Paused", "Shutdown", "Stopped", "Standby",
                           "Unknown")
Hypervisor = Literal["cloud-hypervisor", "firecracker", "qemu", "qemu-microvm", "vz"]
HYPERVISORS = {"cloud-hypervisor": "cloud-hypervisor", "ch": "cloud-hypervisor", "firecracker": "firecracker",
               "fc": "firecracker", "qemu": "qemu", "qemu-microvm": "qemu-microvm", "microvm": "qemu-microvm",
               "vz": "vz"}
# States an instance does not leave by itself: waiting for Running ends there.
SETTLED = ("Stopped", "Shutdown", "Standby", "Unknown", "Paused")
POLL_SECONDS = 0.25

INSTANCE_COLUMNS = [
    Column("INSTANCE ID", lambda r: short_id(r.get("id", ""))),
    Column("NAME", lambda r: r.get("name")),
    Column("IMAGE", lambda r: r.get("image")),
    Column("STATE", lambda r: r.get("state")),
    Column("HV", lambda r: r.get("hypervisor")),
    Column("IP", lambda r: (r.get("network") or {}).get("ip")),
    Column("CREATED", lambda r: age(r.get("created_at"))),
    Column("HEALTH", supervision.health_cell),
    Column("RESTARTS", supervision.restarts_cell),
]

TagOption = Annotated[list[str] | None, typer.Option("--tag", "-l", "--metadata",
                                                     help="KEY=VALUE tag (repeatable)")]
InstanceArg = Annotated[str, typer.Argument(help="instance id, name or unique id prefix", show_default=False)]


def _state(value: str) -> InstanceState:
    for known in STATES:
        if value.lower() == known.lower():
            return cast(InstanceState, known)
    raise CLIError(f"unknown state {value!r}; one of {', '.join(STATES)}")


def hypervisor_name(value: str) -> Hypervisor:
    try:
        return cast(Hypervisor, HYPERVISORS[value.lower()])
    except KeyError:
        known = ", ".join(sorted(set(HYPERVISORS.values())))
        raise CLIError(f"unknown hypervisor {value!r}; one of {known}") from None


def compression_config(enabled: bool | None, algorithm: str | None,
                       level: int | None) -> SnapshotCompressionConfig | None:
    """As the Go CLI: any compression flag turns compression on unless --no-...-enabled says otherwise."""
    if enabled is None and algorithm is None and level is None:
        return None
    config: SnapshotCompressionConfig = {"enabled": True if enabled is None else enabled}
    if algorithm is not None:
        if algorithm not in ("zstd", "lz4"):
            raise CLIError(f"compression algorithm must be zstd or lz4, not {algorithm!r}")
        config["algorithm"] = cast(Literal["zstd", "lz4"], algorithm)
    if level is not None:
        config["level"] = level
    return config


def generate_name(image: str) -> str:
    """``docker.io/library/nginx:alpine`` -> ``nginx-3f2a``."""
    last = image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0]
    slug = re.sub(r"[^a-z0-9]+", "-", last.lower()).strip("-")[:40] or "instance"
    return f"{slug}-{secrets.token_hex(2)}"


def emit_instance(ctx: typer.Context, instance: Instance) -> None:
    st = state.get(ctx)
    emit(instance, st.fmt, INSTANCE_COLUMNS)


def wait_running(client: Hypeman, instance: Instance, phases: Phases, timeout: float) -> Instance:
    """Poll until Running, showing each state (and the server's boot phase when it tells one)."""
    deadline = time.monotonic() + timeout
    while True:
        if instance.state == "Running":
            phases.done(f"{instance.name}: Running")
            return instance
        if instance.state in SETTLED:
            reason = instance.state_error or instance.exit_message or ""
            raise CLIError(f"instance {instance.name} is {instance.state} instead of Running"
                           f"{': ' + reason if reason else ''} (see `hypeman logs {instance.name}`)")
        current = instance.current_phase or ""
        phase = f" ({current})" if current and current.lower() != instance.state.lower() else ""
        phases.update(f"{instance.name}: {instance.state}{phase}")
        if time.monotonic() > deadline:
            raise CLIError(f"instance {instance.name} is still {instance.state} after {timeout:.0f} s "
                           f"(`hypeman ps -a`, `hypeman logs {instance.name}`)")
        time.sleep(POLL_SECONDS)
        instance = client.instances.get(instance.id)


def volume_mount(text: str) -> dict[str, Any]:
    """``NAME:/path[:ro][:overlay=SIZE]`` -> the create's ``VolumeMountParam`` (the server
    resolves NAME as a volume id, name or unique id prefix). ``overlay=SIZE`` gives the VM a
    private copy-on-write layer of SIZE over the read-only volume."""
    parts = text.split(":")
    if len(parts) < 2 or not parts[0] or not parts[1].startswith("/"):
        raise CLIError(f"--volume {text!r}: expected NAME:/path[:ro][:overlay=SIZE]")
    mount: dict[str, Any] = {"volume_id": parts[0], "mount_path": parts[1]}
    for option in parts[2:]:
        if option == "ro":
            mount["readonly"] = True
        elif option == "rw":
            mount["readonly"] = False
        elif option.startswith("overlay=") and option[len("overlay="):]:
            mount.update(readonly=True, overlay=True, overlay_size=option[len("overlay="):])
        else:
            raise CLIError(f"--volume {text!r}: unknown option {option!r} (ro, rw or overlay=SIZE)")
    if mount.get("overlay") and mount.get("readonly") is False:
        raise CLIError(f"--volume {text!r}: an overlay volume is mounted read-only under its overlay")
    return mount


def run(
    ctx: typer.Context,
    image: Annotated[str, typer.Argument(help="image reference; pulled first when the server lacks it")],
    name: Annotated[str | None, typer.Option(help="instance name (default: image name + 4 hex)")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE (repeatable)")] = None,
    memory: Annotated[str | None, typer.Option(help="memory, e.g. 512MB (default: the server's)")] = None,
    cpus: Annotated[int | None, typer.Option(help="virtual CPUs (default: the server's)")] = None,
    overlay_size: Annotated[str | None, typer.Option(help="writable overlay disk, e.g. 1GB")] = None,
    hotplug_size: Annotated[str | None, typer.Option(help="memory that can be hot-plugged later")] = None,
    entrypoint: Annotated[list[str] | None, typer.Option(help="override the entrypoint (one per argument)")]
    = None,
    cmd: Annotated[list[str] | None, typer.Option(help="override CMD (repeat per argument)")] = None,
    hypervisor: Annotated[str | None, typer.Option(help="qemu, qemu-microvm, cloud-hypervisor, ...")] = None,
    tag: TagOption = None,
    network: Annotated[bool | None, typer.Option("--network/--no-network", help="guest networking")] = None,
    bandwidth_down: Annotated[str | None, typer.Option(help="download limit: 100Mbps, 125MB/s")] = None,
    bandwidth_up: Annotated[str | None, typer.Option(help="upload limit: 100Mbps, 125MB/s")] = None,
    platform: Annotated[str | None, typer.Option(help="platform to pull, os/arch")] = None,
    volume: Annotated[list[str] | None, typer.Option(
        "--volume", "-v",
        help="attach a volume: NAME:/path[:ro][:overlay=SIZE] (repeatable; overlay implies ro)")] = None,
    skip_guest_agent: Annotated[bool | None, typer.Option(help="no guest agent (exec and cp will not work)")]
    = None,
    snapshot_compression_enabled: Annotated[bool | None, typer.Option(
        "--snapshot-compression-enabled/--no-snapshot-compression-enabled",
        help="compress standby snapshots' memory")] = None,
    snapshot_compression_algorithm: Annotated[str | None, typer.Option(help="zstd or lz4")] = None,
    snapshot_compression_level: Annotated[int | None, typer.Option(help="zstd 1-19, lz4 0-9")] = None,
    snapshot_compression_delay: Annotated[str | None, typer.Option(help="delay before compressing, e.g. 30s")]
    = None,
    health_cmd: Annotated[str | None, typer.Option(
        help="health check: run this shell command in the guest, healthy on exit 0")] = None,
    health_http: Annotated[str | None, typer.Option(
        help="health check: GET PORT or PORT/PATH on the VM's address, healthy on 200")] = None,
    health_tcp: Annotated[int | None, typer.Option(
        "--health-tcp", "--health-tcp-port", help="health check: connect to this port")] = None,
    health_type: Annotated[str | None, typer.Option(help="none, http, tcp or exec")] = None,
    health_interval: Annotated[str | None, typer.Option(help="between probes (default 10s)")] = None,
    health_timeout: Annotated[str | None, typer.Option(help="of one probe (default 2s)")] = None,
    health_start_period: Annotated[str | None, typer.Option(
        help="failures after boot not counted for this long (default 30s)")] = None,
    health_failure_threshold: Annotated[int | None, typer.Option(help="failures in a row to be unhealthy")]
    = None,
    health_success_threshold: Annotated[int | None, typer.Option(help="successes in a row to be healthy")]
    = None,
    health_http_port: Annotated[int | None, typer.Option(help="health check: GET this port")] = None,
    health_http_path: Annotated[str | None, typer.Option(help="the health check's path (default /)")] = None,
    health_http_scheme: Annotated[str | None, typer.Option(help="http or https")] = None,
    health_http_expected_status: Annotated[int | None, typer.Option(help="the healthy status (200)")] = None,
    health_exec_working_dir: Annotated[str | None, typer.Option(help="the health command's directory")]
    = None,
    restart: Annotated[str | None, typer.Option(
        "--restart", "--restart-policy", help="never, always or on_failure")] = None,
    restart_backoff: Annotated[str | None, typer.Option(help="wait before a restart, doubled each time")]
    = None,
    restart_max_attempts: Annotated[int | None, typer.Option(help="restarts in a row (0: unlimited)")]
    = None,
    restart_stable_after: Annotated[str | None, typer.Option(help="a run this long resets the count")]
    = None,
    auto_standby: Annotated[str | None, typer.Option(
        "--auto-standby", help="standby after this long without inbound TCP connections, e.g. 10m")] = None,
    auto_standby_enabled: Annotated[bool | None, typer.Option(
        "--auto-standby-enabled/--no-auto-standby-enabled", help="auto-standby on or off")] = None,
    auto_standby_idle_timeout: Annotated[str | None, typer.Option(help="the same as --auto-standby")] = None,
    auto_standby_ignore_destination_port: Annotated[list[int] | None, typer.Option(
        help="connections to this guest port keep it awake no longer (repeatable)")] = None,
    auto_standby_ignore_source_cidr: Annotated[list[str] | None, typer.Option(
        help="connections from this CIDR keep it awake no longer (repeatable)")] = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="return once created, not Running")] = False,
    wait_timeout: Annotated[str, typer.Option(help="how long to wait for Running")] = "5m",
) -> None:
    """Create and start an instance from an image (pull -> create -> Initializing -> Running).

    Prints the instance id (table format) or the instance (json, yaml).
    """
    st = state.get(ctx)
    client = st.client()
    timeout = parse_duration(wait_timeout)
    params: dict[str, Any] = {}
    if env:
        params["env"] = key_values(env, "--env")
    if tag:
        params["tags"] = key_values(tag, "--tag")
    for key, value in (("size", memory), ("vcpus", cpus), ("overlay_size", overlay_size),
                       ("hotplug_size", hotplug_size), ("skip_guest_agent", skip_guest_agent)):
        if value is not None:
            params[key] = value
    if entrypoint:
        params["entrypoint"] = entrypoint
    if cmd:
        params["cmd"] = cmd
    if hypervisor:
        params["hypervisor"] = hypervisor_name(hypervisor)
    nic: dict[str, Any] = {} if network is None else {"enabled": network}
    if bandwidth_down:
        nic["bandwidth_download"] = bandwidth_down
    if bandwidth_up:
        nic["bandwidth_upload"] = bandwidth_up
    if nic:
        params["network"] = nic
    if volume:
        params["volumes"] = [volume_mount(text) for text in volume]
    compression = compression_config(snapshot_compression_enabled, snapshot_compression_algorithm,
                               snapshot_compression_level)
    if compression is not None or snapshot_compression_delay:
        policy: dict[str, Any] = {}
        if compression is not None:
            policy["compression"] = compression
        if snapshot_compression_delay:
            policy["standby_compression_delay"] = snapshot_compression_delay
        params["snapshot_policy"] = policy
    check = supervision.health_check(
        cmd=health_cmd, http=health_http, tcp=health_tcp, kind=health_type, interval=health_interval,
        timeout=health_timeout, start_period=health_start_period,
        failure_threshold=health_failure_threshold, success_threshold=health_success_threshold,
        http_port=health_http_port, http_path=health_http_path, http_scheme=health_http_scheme,
        http_expected_status=health_http_expected_status, exec_working_dir=health_exec_working_dir)
    if check is not None:
        params["health_check"] = check
    restart_policy = supervision.restart_policy(
        policy=restart, backoff=restart_backoff, max_attempts=restart_max_attempts,
        stable_after=restart_stable_after)
    if restart_policy is not None:
        params["restart_policy"] = restart_policy
    standby_policy = autostandby.policy(
        idle=auto_standby, enabled=auto_standby_enabled, idle_timeout=auto_standby_idle_timeout,
        ignore_ports=auto_standby_ignore_destination_port, ignore_cidrs=auto_standby_ignore_source_cidr)
    if standby_policy is not None:
        params["auto_standby"] = standby_policy
    with Phases() as phases:
        ready = ensure_image(client, image, phases, platform)
        instance_name = name or generate_name(image)
        phases.update(f"{instance_name}: creating")
        instance = client.instances.create(image=ready.name, name=instance_name, platform=platform or omit,
                                           **params)
        phases.done(f"{instance.name}: created ({instance.id})")
        if not detach:
            instance = wait_running(client, instance, phases, timeout)
    if st.fmt == "table":
        print(instance.id)
    else:
        emit(instance, st.fmt)


def ps(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", "-a", help="all instances (default: Running only)")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="ids only")] = False,
    state_filter: Annotated[str | None, typer.Option("--state", help="only this state")] = None,
    tag: TagOption = None,
) -> None:
    """List instances."""
    st = state.get(ctx)
    wanted = _state(state_filter) if state_filter else None
    instances = st.client().instances.list(state=wanted or omit, tags=key_values(tag or [], "--tag") or omit)
    if not all_ and wanted is None:
        instances = [i for i in instances if i.state == "Running"]
    if quiet:
        emit_lines(i.id for i in instances)
        return
    if not instances and st.fmt == "table" and not all_ and wanted is None:
        note("no running instances (-a shows all)")
        return
    emit(instances, st.fmt, INSTANCE_COLUMNS)


def inspect(
    ctx: typer.Context,
    instance: InstanceArg,
    show_env: Annotated[bool, typer.Option(help="show environment values (hidden by default)")] = False,
) -> None:
    """Show everything about one instance."""
    st = state.get(ctx)
    found = resolve.instance(st.client(), instance)
    data = found.to_dict(mode="json")
    env = data.get("env")
    if not show_env and isinstance(env, dict):
        data["env"] = {key: "<hidden: --show-env>" for key in env}
    emit(data, st.fmt)


def logs(
    ctx: typer.Context,
    instance: InstanceArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
    tail: Annotated[int, typer.Option(help="lines from the end to start with")] = 100,
    source: Annotated[str, typer.Option("--source", "-s", help="app, vmm or hypeman")] = "app",
) -> None:
    """Print an instance's logs (app: the program's console; hypeman: operations)."""
    if source not in ("app", "vmm", "hypeman"):
        raise CLIError(f"--source must be app, vmm or hypeman, not {source!r}")
    st = state.get(ctx)
    client = st.client()
    found = resolve.instance(client, instance)
    stream = client.instances.logs(found.id, follow=follow, tail=tail,
                                   source=cast(Literal["app", "vmm", "hypeman"], source),
                                   timeout=None if follow else NOT_GIVEN)
    try:
        for line in stream:
            sys.stdout.write(f"{line}\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    finally:
        stream.close()


def stats(ctx: typer.Context, instance: InstanceArg) -> None:
    """CPU, memory and network counters of an instance."""
    st = state.get(ctx)
    client = st.client()
    emit(client.instances.stats(resolve.instance(client, instance).id), st.fmt)


def wait(
    ctx: typer.Context,
    instance: InstanceArg,
    state_name: Annotated[str, typer.Option("--state", help="the state to wait for, e.g. Running")],
    timeout: Annotated[str, typer.Option(help="Go duration; the server allows at most 5m")] = "60s",
) -> None:
    """Wait until an instance reaches a state (exit status 1 when it timed out)."""
    st = state.get(ctx)
    client = st.client()
    wanted = _state(state_name)
    seconds = parse_duration(timeout)
    found = resolve.instance(client, instance)
    result = client.instances.wait(found.id, state=wanted, api_timeout=f"{seconds:g}s", timeout=seconds + 30)
    emit(result, st.fmt)
    if result.timed_out or result.state != wanted:
        raise typer.Exit(1)


def stop(ctx: typer.Context, instance: InstanceArg) -> None:
    """Stop an instance (its overlay stays)."""
    client = state.get(ctx).client()
    emit_instance(ctx, client.instances.stop(resolve.instance(client, instance).id))


def start(
    ctx: typer.Context,
    instance: InstanceArg,
    entrypoint: Annotated[list[str] | None, typer.Option(help="entrypoint for this start")] = None,
    cmd: Annotated[list[str] | None, typer.Option(help="override CMD for this start")] = None,
) -> None:
    """Start a stopped instance."""
    client = state.get(ctx).client()
    found = resolve.instance(client, instance)
    emit_instance(ctx, client.instances.start(found.id, entrypoint=entrypoint or omit, cmd=cmd or omit))


def standby(
    ctx: typer.Context,
    instance: InstanceArg,
    compression_enabled: Annotated[bool | None, typer.Option(
        "--compression-enabled/--no-compression-enabled", help="compress the memory snapshot")] = None,
    compression_algorithm: Annotated[str | None, typer.Option(help="zstd or lz4")] = None,
    compression_level: Annotated[int | None, typer.Option(help="zstd 1-19, lz4 0-9")] = None,
    compression_delay: Annotated[str | None, typer.Option(help="delay before compressing, e.g. 30s")] = None,
) -> None:
    """Put an instance to sleep: pause, snapshot memory, release the VM."""
    client = state.get(ctx).client()
    found = resolve.instance(client, instance)
    compression = compression_config(compression_enabled, compression_algorithm, compression_level)
    emit_instance(ctx, client.instances.standby(found.id, compression=compression or omit,
                                                compression_delay=compression_delay or omit))


def restore(ctx: typer.Context, instance: InstanceArg) -> None:
    """Wake an instance from standby."""
    client = state.get(ctx).client()
    emit_instance(ctx, client.instances.restore(resolve.instance(client, instance).id))


def fork(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="instance to fork")],
    name: Annotated[str, typer.Argument(help="name of the new instance")],
    from_running: Annotated[bool, typer.Option(help="allow a Running source (standby, fork, restore)")]
    = False,
    target_state: Annotated[str | None, typer.Option(help="Stopped, Standby or Running")] = None,
) -> None:
    """Fork an instance into a new one."""
    client = state.get(ctx).client()
    found = resolve.instance(client, source)
    target = target_state_name(target_state)
    emit_instance(ctx, client.instances.fork(found.id, name=name, from_running=from_running or omit,
                                             target_state=target or omit))


def target_state_name(value: str | None) -> Literal["Stopped", "Standby", "Running"] | None:
    if value is None:
        return None
    for known in ("Stopped", "Standby", "Running"):
        if value.lower() == known.lower():
            return known
    raise CLIError(f"--target-state must be Stopped, Standby or Running, not {value!r}")


def rm(
    ctx: typer.Context,
    instances: Annotated[list[str] | None, typer.Argument(help="instances to delete")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="also delete Running instances")] = False,
    all_: Annotated[bool, typer.Option("--all", help="every instance")] = False,
) -> None:
    """Delete instances; a Running one only with -f."""
    st = state.get(ctx)
    client = st.client()
    if not instances and not all_:
        raise CLIError("name the instances to delete, or use --all")
    listed = client.instances.list()
    targets: list[Instance] = []
    if all_:
        targets = list(listed)
    for query in instances or []:
        found = resolve.pick(listed, query, "instance", lambda i: i.id, lambda i: i.name)
        if found.id not in {t.id for t in targets}:
            targets.append(found)
    deleted: list[str] = []
    failures: list[str] = []
    for target in targets:
        if target.state == "Running" and not force:
            failures.append(f"instance {target.name} ({short_id(target.id)}) is Running; "
                            "stop it first or use rm -f")
            continue
        try:
            client.instances.delete(target.id)
        except Exception as exc:  # one failure does not stop the others; reported below
            failures.append(f"{target.name}: {describe(exc, st.base_url)}")
            continue
        deleted.append(target.id)
    if st.fmt == "table":
        emit_lines(deleted)
    else:
        emit(deleted, st.fmt)
    if failures:
        raise CLIError("; ".join(failures))
