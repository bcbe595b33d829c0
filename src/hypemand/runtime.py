"""The server's domain services, wired together once at start-up.

The HTTP layer holds one :class:`Runtime` and calls into it; nothing here knows about HTTP.
Domains add their service here: build it in ``__init__``, start it in :meth:`start`,
stop it in :meth:`stop`.
"""

from __future__ import annotations

import asyncio
import logging
import os

from hypemand.auth import load_secret
from hypemand.builds.builders import BuilderService
from hypemand.builds.disks import BuildVolumes
from hypemand.builds.service import BuildService, BuildSettings
from hypemand.config import Settings
from hypemand.hypervisor.base import Accel
from hypemand.hypervisor.qemu import QemuHypervisor
from hypemand.images.disk import DiskFormat
from hypemand.images.service import ImageService
from hypemand.ingress.service import IngressOptions, IngressService
from hypemand.instances.events import EventKind, InstanceEvent
from hypemand.instances.logrotate import LogRotator
from hypemand.instances.manager import InstanceManager
from hypemand.network import NetworkConfig, NetworkConfigError, NetworkHost
from hypemand.network.conntrack import FlowReader
from hypemand.policies.autostandby import AutoStandbyController
from hypemand.policies.health import HealthMonitor
from hypemand.policies.reclaim import MemoryReclaimer
from hypemand.policies.restarts import RestartSupervisor
from hypemand.policies.schedules import SnapshotScheduler
from hypemand.savedvm.jobs import CompressionJobs
from hypemand.snapshots.service import SnapshotService
from hypemand.system.files import SystemFiles, ensure_system_files
from hypemand.units import UnitError, parse_rate
from hypemand.volumes.service import VolumeService

log = logging.getLogger(__name__)


def check_host(settings: Settings) -> SystemFiles:
    """What the server needs before it can boot anything: QEMU, the system files, a network
    configuration that makes sense.

    Raises a DomainError (DependencyMissing names the package to install) or a
    NetworkConfigError instead of letting a missing tool or a bad subnet surface later as a stack
    trace in the middle of a request.
    """
    QemuHypervisor(binary=settings.qemu_binary).version()
    check_network(settings)
    return ensure_system_files(settings.system_dir)


def check_network(settings: Settings) -> None:
    """Blocking; call before the event loop runs. Builds the network (idempotent, the server's
    start does it again with its VMs known) so that a subnet in use or an uplink that does not
    exist is refused with one line before anything is served. Missing privileges are not an
    error here: the server falls back to user-mode networking."""
    host, _ = network_plan(settings)
    if host is None:
        return
    try:
        asyncio.run(host.start(None))
    except NetworkConfigError:
        raise
    except Exception as exc:
        log.debug("network check: %s (the server decides at start)", exc)
    finally:
        host.close()


def network_plan(settings: Settings) -> tuple[NetworkHost | None, str]:
    """The VM network this server builds: a :class:`NetworkHost` (not started yet), or None and
    why the VMs get QEMU's user-mode NIC instead. Raises NetworkConfigError for a setting that
    cannot work (an invalid subnet, bridge or namespace name, a bad NETWORK_LIMIT)."""
    if settings.network_mode == "user":
        return None, "chosen with HYPEMAND_NETWORK_MODE=user"
    if os.geteuid() != 0:
        return None, "the server does not run as root, so it cannot build a bridge"
    config = NetworkConfig.parse(
        subnet=settings.subnet,
        bridge=settings.bridge,
        namespace=settings.network_namespace,
        uplink=settings.uplink,
        dns=settings.dns_server,
    )
    try:
        capacity = parse_rate(settings.network_limit) if settings.network_limit else None
    except UnitError as exc:
        raise NetworkConfigError(f"NETWORK_LIMIT: {exc}") from None
    return NetworkHost(config, upload_capacity=capacity), ""


def ingress_options(settings: Settings) -> IngressOptions:
    return IngressOptions(
        namespace=settings.network_namespace,
        caddy_binary=settings.caddy_binary,
        listen_address=settings.caddy_listen_address,
        stop_on_shutdown=settings.caddy_stop_on_shutdown,
        api_port=settings.port,
        dns_port=settings.ingress_dns_port,
        acme_email=settings.acme_email,
        acme_ca=settings.acme_ca,
        tls_allowed_domains=settings.tls_allowed_domains,
    )


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.layout = settings.layout
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # The data dir holds the token secret and private images' disks: only the server reads it.
        settings.data_dir.chmod(0o700)
        self.jwt_secret = load_secret(self.layout, settings.jwt_secret)
        self.images = ImageService(
            self.layout,
            max_concurrent=settings.max_concurrent_pulls,
            disk_format=DiskFormat(settings.image_format),
            allowed_registries=settings.allowed_registries,
        )
        self.hypervisor = QemuHypervisor(
            state_dir=self.layout.hypervisor_state,
            binary=settings.qemu_binary,
            forced_accel=Accel(settings.accel) if settings.accel else None,
        )
        self.compression = CompressionJobs()
        network_host, user_mode_reason = network_plan(settings)
        self.volumes = VolumeService(self.layout)  # its attachments come from the instance manager
        self.instances = InstanceManager(
            self.layout,
            self.hypervisor,
            self.images,
            self.system_files,
            self.compression,
            network_host=network_host,
            user_mode_reason=user_mode_reason,
        )
        # QEMU runs in the server's namespace and gets each VM's TAP as an open descriptor.
        self.hypervisor.tap_opener = self.instances.network.open_tap
        # Attachments live in instance records: the volumes ask the instance manager for them.
        # Builder VMs mount their build's disks through the same catalog (builds/disks.py).
        self.build_volumes = BuildVolumes(self.volumes)
        self.instances.use_volumes(self.build_volumes)
        self.volumes.attachments = self.instances
        self.builders = BuilderService(self.layout)
        self.builds = BuildService(
            self.layout, self.images, self.instances, self.build_volumes, self.builders,
            BuildSettings(max_concurrent=settings.max_concurrent_builds,
                          max_source_bytes=settings.max_build_source_bytes,
                          secrets_dir=settings.build_secrets_dir),
            system_dir=settings.system_dir,
        )
        self.snapshots = SnapshotService(self.layout, self.instances, self.compression)
        self.schedules = SnapshotScheduler(
            self.layout, self.instances, self.snapshots, minimum_interval=settings.schedule_min_interval
        )
        # Listening to the instances' events from now on: an exit recorded while the instances
        # are taken charge of is planned for like any other.
        self.health = HealthMonitor(self.instances)
        self.restarts = RestartSupervisor(self.instances, self.health)
        # Its connection tracking reader comes at start, once the network's model is known.
        self.auto_standby = AutoStandbyController(
            self.instances, None, max_concurrent=settings.auto_standby_max_concurrent
        )
        self.memory_reclaim = MemoryReclaimer(self.instances, self.layout.memory_reclaim_hold)
        self.ingresses = IngressService(
            self.layout, ingress_options(settings), self.instances, self._ingress_unavailable,
            restore=self._wake,  # a request through the ingress wakes an instance in standby
        )
        self.instances.events.subscribe(self._instance_event)
        self.log_rotator = LogRotator(
            lambda: self.instances.table,
            max_size=settings.log_max_size,
            max_files=settings.log_max_files,
            interval=settings.log_rotate_interval,
        )
        self.system: SystemFiles | None = None

    async def _wake(self, instance_id: str) -> None:
        await self.instances.restore(instance_id, manual=False)

    def _instance_event(self, event: InstanceEvent) -> None:
        if event.kind is not EventKind.STANDBY:  # it runs, or is gone: a failed wake is history
            self.ingresses.instance_changed(event.instance_id)

    def _ingress_unavailable(self) -> str | None:
        """Why ingress has no bridge network to route to, or None when it has one."""
        network = self.instances.network
        return None if network.model == "bridge" else (network.user_mode_reason or "user-mode networking")

    def _flow_reader(self) -> FlowReader | None:
        """Connection tracking of the VM network's namespace, for auto-standby; None when VMs
        have QEMU's user-mode NIC (no address of their own)."""
        host = self.instances.network.host
        return FlowReader(host.config.namespace) if host is not None else None

    def system_files(self) -> SystemFiles:
        if self.system is None:
            raise RuntimeError("system files are not prepared yet")
        return self.system

    async def start(self) -> None:
        log.info("hypemand starting with data dir %s", self.settings.data_dir)
        # Startup order: system files, then the instances (adopting VMs that outlived the last
        # server), then the image queues.
        self.system = await asyncio.to_thread(ensure_system_files, self.settings.system_dir)
        log.info("guest kernel %s, initrd %s", self.system.kernel_version, self.system.initrd_version)
        # Every VMM runs under a small supervisor; build it now, not in the first create.
        await self.hypervisor.vmm_shim()
        await self.volumes.start()  # before the instances, whose VMs use the volumes' disks
        await self.instances.take_charge()
        self.health.start()
        await self.restarts.start()
        self.auto_standby.flows = self._flow_reader()
        self.auto_standby.start()
        await self.ingresses.start()  # after the network, whose namespace Caddy runs in
        await self.memory_reclaim.start()  # after the instances: it ends a hold that expired
        self.log_rotator.start()
        await self.snapshots.start()
        await self.schedules.start()  # after the instances and the snapshots it goes by
        await self.images.start()
        await self.builders.start()
        await self.builds.start()  # after the images and instances its builds use

    async def stop(self) -> None:
        """Stop the server's own work. VMs are never stopped here: they outlive the server."""
        await self.auto_standby.close()
        await self.builds.stop()  # a build in flight is run again by the next start
        await self.schedules.stop()  # first: a run in flight still has every service it uses
        await self.ingresses.stop()  # Caddy too only with CADDY_STOP_ON_SHUTDOWN
        await self.restarts.stop()
        await self.health.stop()
        await self.memory_reclaim.stop()
        await self.log_rotator.close()
        await self.images.stop()
        await self.compression.close()
        await self.instances.release_all()
