"""Server settings: where state lives, where the API listens, and every knob the environment sets.

The environment is read here and nowhere else: ``Settings.load`` turns it into typed values
that the services receive as arguments.

    HYPEMAND_DATA_DIR              state directory (default /var/lib/hypemand as root)
    HYPEMAND_SYSTEM_DIR            kernel, initrd, guest binary (default <data dir>/system)
    JWT_SECRET                     token signing secret (default: <data dir>/jwt-secret)
    HYPEMAND_IMAGE_FORMAT          ext4 (default) or erofs: the disk images are converted to
    HYPEMAND_MAX_CONCURRENT_PULLS  image pulls run at once (default 1)
    HYPEMAND_QEMU                  the QEMU binary (default: found in /usr/bin, /usr/local/bin, PATH)
    HYPEMAND_ACCEL                 kvm or tcg: skip the acceleration probe
    HYPEMAND_LOG_MAX_SIZE          an instance log (app, vmm, hypeman) above this is rotated
                                   (default 50MB, the reference's)
    HYPEMAND_LOG_MAX_FILES         rotated copies kept: app.log.1 ... (default 1, the reference's)
    HYPEMAND_LOG_ROTATE_INTERVAL   how often the log sizes are checked (default 10s)
    HYPEMAND_CADDY                 the Caddy binary of the ingress proxy (default /usr/bin/caddy)
    CADDY_LISTEN_ADDRESS           where Caddy listens on the ingresses' ports (default 0.0.0.0)
    CADDY_STOP_ON_SHUTDOWN         true: Caddy stops with the server (default: it outlives it)
    ACME_EMAIL, ACME_CA            certificates from an ACME CA (default: Caddy's internal CA)
    TLS_ALLOWED_DOMAINS            hostnames tls may be asked for: name, *.example.com or *
    HYPEMAND_INGRESS_DNS_PORT      the UDP port of the ingress's DNS responder (default 5353)
    HYPEMAND_AUTO_STANDBY_MAX_CONCURRENT  auto-standbys committed at once; the others queue
                                   (default 16, the reference's auto_standby.max_concurrent)
    HYPEMAND_MAX_BUILD_SOURCE_BYTES  the largest build source (tar.gz) POST /builds takes, bytes
                                   or a size like 512MB (default 1GB); larger is 413 too_large

Test-only (the test suite sets them; a deployment never should):

    HYPEMAND_TEST_SCHEDULE_MIN_INTERVAL  the shortest snapshot schedule interval accepted, in
                                   place of the reference's 1m (e.g. 1s), so that schedule tests
                                   see several runs without waiting minutes
"""

from __future__ import annotations

import os
from ipaddress import ip_address
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from hypemand.ingress.hostnames import check_allowed_domain
from hypemand.layout import DataLayout
from hypemand.units import parse_duration, parse_size

DEFAULT_PORT = 4973
DEFAULT_HOST = "127.0.0.1"
# The reference's size and count. Its interval is 5 minutes; a check here costs one stat per
# file, so it runs far more often: a console at full speed outgrows the cap by less.
DEFAULT_LOG_MAX_SIZE = 50 << 20
DEFAULT_LOG_MAX_FILES = 1
DEFAULT_LOG_ROTATE_INTERVAL = 10.0
# A build's source tarball (the Dockerfile's context): 1 GiB is far beyond a real context and
# still bounds what one request may make the server store.
DEFAULT_MAX_BUILD_SOURCE_BYTES = 1 << 30


def default_data_dir() -> Path:
    if env := os.environ.get("HYPEMAND_DATA_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/hypemand")
    return Path.home() / ".local/share/hypemand"


def default_system_dir(data_dir: Path) -> Path:
    """System files (kernel, initrd, guest binary) are content-versioned and may be shared.

    ``HYPEMAND_SYSTEM_DIR`` lets several data directories (the test suite's, say) share one
    prepared set instead of each downloading the kernel again.
    """
    if env := os.environ.get("HYPEMAND_SYSTEM_DIR"):
        return Path(env)
    return DataLayout(data_dir).system.root


def _registries(text: str | None) -> frozenset[str] | None:
    if text is None or not text.strip():
        return None
    return frozenset(part.strip().lower() for part in text.split(",") if part.strip())


def _domains(text: str | None) -> list[str] | None:
    if text is None or not text.strip():
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


class Settings(BaseModel):
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path
    system_dir: Path
    jwt_secret: str | None = None
    image_format: Literal["ext4", "erofs"] = "ext4"
    max_concurrent_pulls: int = Field(default=1, ge=1, le=64)
    qemu_binary: Path | None = None
    accel: Literal["kvm", "tcg"] | None = None
    log_max_size: int = Field(default=DEFAULT_LOG_MAX_SIZE, ge=64 << 10)
    log_max_files: int = Field(default=DEFAULT_LOG_MAX_FILES, ge=1, le=100)
    log_rotate_interval: float = Field(default=DEFAULT_LOG_ROTATE_INTERVAL, gt=0, le=3600)
    # Registries pulls may reach (host or host:port); None: any. A closed network (or a test
    # suite that must send nothing beyond loopback) names its own, and a pull of anything else
    # is refused before a single lookup or connection is made.
    allowed_registries: frozenset[str] | None = None
    # The VM network (network/README.md). None: the host's namespace, as the reference; a name:
    # the bridge, TAPs, rules and the ingress proxy live in that namespace (made if missing).
    network_namespace: str | None = None
    # "bridge": build the VM network (falling back to user mode without the privileges);
    # "user": QEMU's user-mode NIC, egress only, chosen.
    network_mode: Literal["bridge", "user"] = "bridge"
    uplink: str | None = None  # None: the namespace's default route
    subnet: str = "10.100.0.0/16"
    bridge: str = "vmbr0"
    dns_server: str = "1.1.1.1"
    network_limit: str | None = None  # the uplink's capacity ("10Gbps", "125MB/s"); None: read it
    # Ingress (ingress/README.md): Caddy, run in the network's namespace.
    caddy_binary: Path = Path("/usr/bin/caddy")
    caddy_listen_address: str = "0.0.0.0"  # where Caddy listens on every ingress port
    caddy_stop_on_shutdown: bool = False  # else Caddy outlives the server (and is adopted back)
    acme_email: str | None = None  # None: certificates from Caddy's internal CA, never ACME
    acme_ca: str | None = None  # the ACME directory URL; None: Caddy's default (Let's Encrypt)
    tls_allowed_domains: tuple[str, ...] | None = None  # None: any hostname may have tls
    ingress_dns_port: int = Field(default=5353, ge=1, le=65535)  # UDP, 127.0.0.1 in the namespace
    auto_standby_max_concurrent: int = Field(default=16, ge=1, le=1024)  # policies/README.md
    # Snapshot schedules (policies/README.md): the shortest interval, seconds. Lowered by tests only.
    schedule_min_interval: float = Field(default=60.0, gt=0)
    # Builds (builds/README.md): the largest source tarball a build may be given.
    max_build_source_bytes: int = Field(default=DEFAULT_MAX_BUILD_SOURCE_BYTES, ge=1)
    # Builds (builds/README.md): how many run at once (the reference's MAX_CONCURRENT_BUILDS),
    # and the directory of the secrets builds may mount (one file per secret id).
    max_concurrent_builds: int = Field(default=1, ge=1, le=64)
    build_secrets_dir: Path | None = None

    @field_validator("caddy_listen_address")
    @classmethod
    def _listen_address_ok(cls, value: str) -> str:
        return str(ip_address(value))

    @field_validator("tls_allowed_domains")
    @classmethod
    def _allowed_domains_ok(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else tuple(check_allowed_domain(entry) for entry in value)

    @classmethod
    def load(
        cls, data_dir: Path | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
    ) -> Settings:
        data = (data_dir or default_data_dir()).absolute()
        env = os.environ
        accel = env.get("HYPEMAND_ACCEL", "").strip().lower() or None
        size, every = env.get("HYPEMAND_LOG_MAX_SIZE"), env.get("HYPEMAND_LOG_ROTATE_INTERVAL")
        schedule_minimum = env.get("HYPEMAND_TEST_SCHEDULE_MIN_INTERVAL")
        build_source = env.get("HYPEMAND_MAX_BUILD_SOURCE_BYTES")
        log_rotation = {  # unset: the field's default
            "log_max_size": parse_size(size) if size else None,
            "log_max_files": env.get("HYPEMAND_LOG_MAX_FILES") or None,
            "log_rotate_interval": parse_duration(every) if every else None,
        }
        return cls.model_validate({
            "host": host,
            "port": port,
            "data_dir": data,
            "system_dir": default_system_dir(data).absolute(),
            "jwt_secret": env.get("JWT_SECRET") or None,
            "image_format": env.get("HYPEMAND_IMAGE_FORMAT", "ext4"),
            "max_concurrent_pulls": env.get("HYPEMAND_MAX_CONCURRENT_PULLS", "1"),
            "qemu_binary": env.get("HYPEMAND_QEMU") or None,
            "accel": accel,
            "allowed_registries": _registries(env.get("HYPEMAND_REGISTRIES")),
            "network_namespace": env.get("HYPEMAND_NETWORK_NAMESPACE") or None,
            "network_mode": env.get("HYPEMAND_NETWORK_MODE") or "bridge",
            "uplink": env.get("UPLINK_INTERFACE") or None,
            "subnet": env.get("SUBNET_CIDR") or "10.100.0.0/16",
            "bridge": env.get("BRIDGE_NAME") or "vmbr0",
            "dns_server": env.get("DNS_SERVER") or "1.1.1.1",
            "network_limit": env.get("NETWORK_LIMIT") or None,
            "caddy_binary": env.get("HYPEMAND_CADDY") or "/usr/bin/caddy",
            "caddy_listen_address": env.get("CADDY_LISTEN_ADDRESS") or "0.0.0.0",
            "caddy_stop_on_shutdown": env.get("CADDY_STOP_ON_SHUTDOWN") or False,
            "acme_email": env.get("ACME_EMAIL") or None,
            "acme_ca": env.get("ACME_CA") or None,
            "tls_allowed_domains": _domains(env.get("TLS_ALLOWED_DOMAINS")),
            "ingress_dns_port": env.get("HYPEMAND_INGRESS_DNS_PORT") or 5353,
            "auto_standby_max_concurrent": env.get("HYPEMAND_AUTO_STANDBY_MAX_CONCURRENT") or 16,
            "max_concurrent_builds": env.get("MAX_CONCURRENT_BUILDS") or 1,
            "build_secrets_dir": env.get("HYPEMAND_BUILD_SECRETS_DIR") or None,
            **{key: value for key, value in log_rotation.items() if value is not None},
            **({"schedule_min_interval": parse_duration(schedule_minimum)} if schedule_minimum else {}),
            **({"max_build_source_bytes": parse_size(build_source)} if build_source else {}),
        })

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.data_dir)
