"""The data directory's layout: every path the server keeps state in is built here, and only here.

    <data_dir>/
      jwt-secret                 token signing secret (0600), unless JWT_SECRET is set
      images/                    the image domain (see ImageStorePaths)
      system/                    kernel, initrd, guest binary (see SystemPaths), unless
                                 HYPEMAND_SYSTEM_DIR puts them elsewhere
      hypervisor/                host-wide hypervisor caches (see HypervisorStatePaths)
      guests/<instance id>/      one directory per instance (see InstancePaths)
      snapshots/<snapshot id>/   stored snapshots: snapshot.json and guest/ (see hypemand.snapshots)
      snapshot-schedules/<instance id>.json   one snapshot schedule each (see hypemand.policies)
      memory-reclaim-hold.json   the memory reclaim's hold while one is active (hypemand.policies)
      ingresses/<id>.json        one ingress each (see hypemand.ingress)
      builds/<build id>/         one build each: record, source, log, disks (see BuildPaths)
      builders/<builder id>/     one builder each: record and cache disk (see BuilderPaths)
      caddy/                     the ingress proxy's config, pid, log, certificates (see CaddyPaths)

An instance directory is shared by two owners with a fixed split: the instance domain owns
the record, the disks it writes and its operations log; the hypervisor owns the VM files
described by :class:`hypemand.hypervisor.base.VMPaths` (console and VMM logs, process record,
sockets, RAM file, launch record, start lock). Likewise ``hypervisor/`` is described by
:class:`hypemand.hypervisor.base.HypervisorStatePaths`: the hypervisor package does not depend
on this module, so the names of its own files stay there.

Modules receive the path object of their part (a ``DataLayout``, ``ImageStorePaths``,
``SystemPaths``, ...) and never join a name to a root themselves; ``tests/test_layout.py``
checks that.
"""

from __future__ import annotations

from pathlib import Path

from hypemand.hypervisor.base import MEMORY_FILE, VMPaths

INSTANCE_RECORD = "instance.json"
OVERLAY_DISK = "overlay.raw"
CONFIG_DISK = "config.disk"
BOOT_LOCK = ".boot.lock"
DELETE_INTENT = ".deleting"  # a delete began: the next start finishes it, never lists a half instance
OPERATIONS_LOG = "logs/hypeman.log"
STATE_FILE = "vm.state"  # device state of a saved VM (its RAM stays in the hypervisor's RAM file)
STANDBY_RECORD = "standby.json"  # present exactly while the instance is in Standby


def rotated_log(log: Path, number: int) -> Path:
    """``logs/app.log`` -> ``logs/app.log.1``: a rotated log's copies, 1 the newest."""
    return log.with_name(f"{log.name}.{number}")


def rotation_partial(log: Path) -> Path:
    """Where the next ``.1`` copy of ``log`` is written before it takes that name."""
    return log.with_name(f"{log.name}.1.partial")


class SavedVMPaths:
    """The files of a saved VM, named the same wherever it lies: an instance's own directory
    (its standby), a stored snapshot's payload, a fork's staging copy. Which of them make up the
    payload is :mod:`hypemand.savedvm`'s decision (``savedvm.files.PAYLOAD``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def file(self, name: str) -> Path:
        """One of the saved VM's files, by its name (one of the names above)."""
        return self.directory / name

    @property
    def memory_file(self) -> Path:
        return self.directory / MEMORY_FILE

    @property
    def state_file(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def standby_record(self) -> Path:
        return self.directory / STANDBY_RECORD


class InstancePaths:
    """The files of one instance; ``vm`` is the hypervisor's share of the directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.vm = VMPaths(directory)

    @property
    def record(self) -> Path:
        return self.directory / INSTANCE_RECORD

    @property
    def overlay_disk(self) -> Path:
        return self.directory / OVERLAY_DISK

    @property
    def config_disk(self) -> Path:
        return self.directory / CONFIG_DISK

    @property
    def boot_lock(self) -> Path:
        return self.directory / BOOT_LOCK

    @property
    def delete_intent(self) -> Path:
        return self.directory / DELETE_INTENT

    @property
    def operations_log(self) -> Path:
        return self.directory / OPERATIONS_LOG

    @property
    def state_file(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def standby_record(self) -> Path:
        return self.directory / STANDBY_RECORD

    @property
    def memory_file(self) -> Path:
        return self.vm.memory_file

    @property
    def launch_record(self) -> Path:
        return self.vm.launch_record

    @property
    def console_log(self) -> Path:
        return self.vm.console_log

    @property
    def vmm_log(self) -> Path:
        return self.vm.vmm_log

    @property
    def saved(self) -> SavedVMPaths:
        """The instance's own saved VM (its standby) and the disks a snapshot copies."""
        return SavedVMPaths(self.directory)

    @property
    def volume_overlays(self) -> Path:
        return self.directory / VOLUME_OVERLAYS

    def volume_overlay(self, volume_id: str) -> Path:
        return volume_overlay(self.directory, volume_id)


VOLUME_OVERLAYS = "vol-overlays"


def volume_overlay(instance_directory: Path, volume_id: str) -> Path:
    """An instance's private copy-on-write upper disk over a shared volume (overlay mode)."""
    return instance_directory / VOLUME_OVERLAYS / f"{volume_id}.raw"


SNAPSHOT_RECORD = "snapshot.json"
SNAPSHOT_PAYLOAD = "guest"  # the saved VM's files (see hypemand.savedvm)
FORK_STAGING_PREFIX = ".fork-"


class SnapshotPaths:
    """The files of one stored snapshot (or of a fork's staging copy)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def record(self) -> Path:
        return self.directory / SNAPSHOT_RECORD

    @property
    def payload(self) -> SavedVMPaths:
        return SavedVMPaths(self.directory / SNAPSHOT_PAYLOAD)


# ---- volumes/ ------------------------------------------------------------------------------------

VOLUME_RECORD = "volume.json"
VOLUME_DISK = "data.raw"
VOLUME_STAGING_PREFIX = ".staging-"


class VolumePaths:
    """One volume: its record and its disk (a sparse ext4 image)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def record(self) -> Path:
        return self.directory / VOLUME_RECORD

    @property
    def disk(self) -> Path:
        return self.directory / VOLUME_DISK


# ---- builds/ and builders/ -----------------------------------------------------------------------


BUILD_RECORD = "build.json"
BUILDER_RECORD = "builder.json"


class BuildPaths:
    """One build (see ``hypemand/builds/README.md``): what is kept after it ends is the record, the
    source it was given and its log; the disks and trees are its working files while it runs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def record(self) -> Path:
        return self.directory / BUILD_RECORD

    @property
    def source(self) -> Path:
        """The source tarball as the client sent it (its sha256 is the provenance's source_hash)."""
        return self.directory / "source.tar.gz"

    @property
    def log(self) -> Path:
        return self.directory / "logs" / "build.log"

    @property
    def staging(self) -> Path:
        """The tree the source disk is made from: ``context/``, ``Dockerfile``, ``bases/``."""
        return self.directory / "staging"

    @property
    def context(self) -> Path:
        """The source tree, unpacked from the tarball."""
        return self.staging / "context"

    @property
    def dockerfile(self) -> Path:
        """The Dockerfile buildah reads (the form's, or the one of the tree)."""
        return self.staging / "Dockerfile"

    @property
    def bases(self) -> Path:
        """The base images exported from the store, one OCI layout (entries base0, base1, ...)."""
        return self.directory / "bases"

    @property
    def pulled_bases(self) -> Path:
        """The bases' layout on the source disk, for a build that pulls them into its builder's
        store (``/src/bases``)."""
        return self.staging / "bases"

    @property
    def base_store(self) -> Path:
        """The bases unpacked as a containers-storage image store (buildah's additional store)."""
        return self.staging / "store"

    @property
    def base_store_run(self) -> Path:
        """skopeo's run directory while it fills the base store (not part of the disk)."""
        return self.directory / "store-run"

    @property
    def storage_conf(self) -> Path:
        """buildah's storage configuration in the VM (``/src/storage.conf``)."""
        return self.staging / "storage.conf"

    @property
    def secrets(self) -> Path:
        """The build's secrets, one file per id (copied from the server's secret directory)."""
        return self.staging / "secrets"

    @property
    def source_disk(self) -> Path:
        """The read-only ext4 disk the builder VM mounts at /src."""
        return self.directory / "source.ext4"

    @property
    def scratch_disk(self) -> Path:
        """The layer store of a build that has no builder (thrown away when it ends)."""
        return self.directory / "scratch.ext4"

    @property
    def output(self) -> Path:
        """The built image as an OCI layout, copied out of the VM before it is imported."""
        return self.directory / "output"

    @property
    def output_blobs(self) -> Path:
        return self.output / "blobs" / "sha256"


class BuilderPaths:
    """One builder: its record and its persistent cache disk (buildah's layer store)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def record(self) -> Path:
        return self.directory / BUILDER_RECORD

    @property
    def cache_disk(self) -> Path:
        return self.directory / "cache.ext4"

    @property
    def new_cache_disk(self) -> Path:
        """A prune's empty disk, renamed over the cache disk once made."""
        return self.directory / "cache.ext4.new"


# ---- images/ -------------------------------------------------------------------------------------

DELETING_PREFIX = ".deleting-"  # a content directory renamed away before its removal


class BlobPaths:
    """``images/blobs/``: the content-addressed blob store."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def committed(self) -> Path:
        return self.directory / "sha256"

    def blob(self, hex_digest: str) -> Path:
        return self.committed / hex_digest

    @property
    def partials(self) -> Path:
        """Transfers in progress: on the store's filesystem, so a commit is a rename."""
        return self.directory / "tmp"

    def partial(self, token: str) -> Path:
        return self.partials / f"{token}.partial"


class ImageContentPaths:
    """``images/content/<hex>/``: one image's record and disk, by manifest digest."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def record(self) -> Path:
        return self.directory / "record.json"

    def disk(self, disk_format: str) -> Path:
        """The read-only root disk: ``rootfs.ext4`` or ``rootfs.erofs``."""
        return self.directory / f"rootfs.{disk_format}"

    @property
    def work(self) -> Path:
        """Scratch space of a running conversion."""
        return self.directory / "work"

    @property
    def unpacked(self) -> Path:
        """The image's layers applied, the tree a disk is built from."""
        return self.work / "rootfs"

    def partial_disk(self, disk_format: str) -> Path:
        return self.work / f"rootfs.{disk_format}"

    @property
    def doomed(self) -> Path:
        """Where the directory is renamed before removal, so a crash never leaves half of it."""
        return self.directory.with_name(f"{DELETING_PREFIX}{self.directory.name}")


class UploadPaths:
    """``images/uploads/<upload id>/``: one blob upload of the /v2 registry in progress."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def session(self) -> Path:
        return self.directory / "session.json"

    @property
    def data(self) -> Path:
        return self.directory / "data"


class RepositoryPaths:
    """``images/registry/<repository>/_manifests/``: what was pushed to one repository.

    Repository path components never start with ``_``, so ``_manifests`` cannot collide with a
    nested repository's name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def revision(self, hex_digest: str) -> Path:
        return self.directory / "revisions" / "sha256" / f"{hex_digest}.json"

    @property
    def tags(self) -> Path:
        return self.directory / "tags"

    def tag(self, tag: str) -> Path:
        return self.tags / f"{tag}.json"


class ImageStorePaths:
    """``images/``: blobs, converted content, name pointers, and the /v2 registry's own state.
    One tree, so that an upload's data file can be renamed into the blob store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = BlobPaths(root / "blobs")

    @property
    def contents(self) -> Path:
        return self.root / "content"

    def content(self, hex_digest: str) -> ImageContentPaths:
        return ImageContentPaths(self.contents / hex_digest)

    @property
    def names(self) -> Path:
        return self.root / "names"

    def name_pointer(self, key: str) -> Path:
        return self.names / f"{key}.json"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    def upload(self, upload_id: str) -> UploadPaths:
        return UploadPaths(self.uploads / upload_id)

    @property
    def repositories(self) -> Path:
        return self.root / "registry"

    def repository(self, repository: str) -> RepositoryPaths:
        return RepositoryPaths(self.repositories / repository / "_manifests")


# ---- system/ -------------------------------------------------------------------------------------

KERNEL_INFO = "kernel.json"
INITRD_ARCHIVE = "initrd"
INITRD_INFO = "initrd.json"
ROOTFS_INFO = "rootfs.json"
GUEST_BINARY = "hypeman-init"


class KernelPaths:
    """``system/kernel/<kernel version>/`` (or its staging copy while it is being installed)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def vmlinux(self) -> Path:
        return self.directory / "vmlinux"

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def config(self) -> Path:
        return self.directory / "config"

    @property
    def modules(self) -> Path:
        return self.directory / "modules"

    @property
    def info(self) -> Path:
        """Written last: its presence means the directory is complete."""
        return self.directory / KERNEL_INFO


class InitrdPaths:
    """``system/initrd/<content hash>/``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def archive(self) -> Path:
        return self.directory / INITRD_ARCHIVE

    @property
    def info(self) -> Path:
        return self.directory / INITRD_INFO


class OciLayoutPaths:
    """An OCI image layout directory (image-spec ``image-layout.md``), wherever it lies: a Debian
    root in the system dir, a build's base images or its output."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def marker(self) -> Path:
        """``oci-layout``: ``{"imageLayoutVersion": "1.0.0"}``."""
        return self.directory / "oci-layout"

    @property
    def index(self) -> Path:
        return self.directory / "index.json"

    @property
    def blobs(self) -> Path:
        return self.directory / "blobs" / "sha256"

    def blob(self, digest: str) -> Path:
        """The blob of ``sha256:<hex>`` (the caller has checked the digest's form)."""
        return self.blobs / digest.removeprefix("sha256:")

    def partial_blob(self, token: str) -> Path:
        """A blob being written, before its digest is known (renamed to :meth:`blob`)."""
        return self.blobs / f".{token}.partial"


class RootfsPaths:
    """``system/rootfs/<name>-<spec hash>/`` (or its staging copy while it is being made): a Debian
    root filesystem made by ``hypemand.builds.rootfs``, as an OCI layout plus what it holds."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def layout(self) -> Path:
        """The OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/``)."""
        return self.directory / "layout"

    @property
    def info(self) -> Path:
        """Written last (before the rename): the spec, the manifest digest, package versions."""
        return self.directory / ROOTFS_INFO

    @property
    def dpkg_status(self) -> Path:
        """The root's ``/var/lib/dpkg/status``, copied out while it is made (staging only)."""
        return self.directory / "dpkg-status"

    @property
    def tarball(self) -> Path:
        """mmdebstrap's output before it becomes the layer (staging only)."""
        return self.directory / "rootfs.tar"

    @property
    def extra_files(self) -> Path:
        """Files the spec adds to the root, written here first for mmdebstrap's hooks (staging only)."""
        return self.directory / "files"

    def extra_file(self, index: int) -> Path:
        return self.extra_files / str(index)


class SystemPaths:
    """The system files: content-versioned, so several data directories may share one set."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def kernels(self) -> Path:
        return self.root / "kernel"

    def kernel(self, version: str) -> KernelPaths:
        return KernelPaths(self.kernels / version)

    @property
    def initrds(self) -> Path:
        return self.root / "initrd"

    def initrd(self, version: str) -> InitrdPaths:
        return InitrdPaths(self.initrds / version)

    @property
    def guest_binaries(self) -> Path:
        """``guest/<source hash>/<binary>``: the guest init, built by ``hypemand.guest.build``."""
        return self.root / "guest"

    def guest_binary(self, version: str) -> Path:
        return self.guest_binaries / version / GUEST_BINARY

    @property
    def rootfs_root(self) -> Path:
        """``rootfs/<name>-<spec hash>/``: Debian roots as OCI layouts (``hypemand.builds.rootfs``)."""
        return self.root / "rootfs"

    @property
    def rootfs_lock(self) -> Path:
        """Held while a root is made (tens of seconds), apart from :attr:`lock` so that a server
        starting meanwhile need not wait for it."""
        return self.rootfs_root / ".lock"

    def rootfs(self, key: str) -> RootfsPaths:
        return RootfsPaths(self.rootfs_root / key)

    def rootfs_staging(self, key: str, token: str) -> RootfsPaths:
        """Where a root is made before it is renamed to :meth:`rootfs` (same filesystem)."""
        return RootfsPaths(self.rootfs_root / f".staging-{key}-{token}")


# ---- ingresses/ and caddy/ ---------------------------------------------------------------------


class CaddyPaths:
    """``caddy/``: the ingress proxy's own directory (see hypemand/ingress/README.md). Caddy runs
    with it as its working directory, so its admin socket has a short relative name."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @property
    def boot_config(self) -> Path:
        """What Caddy starts with: its admin socket, log and storage, no ingress yet."""
        return self.directory / "boot.json"

    @property
    def config(self) -> Path:
        """The complete configuration Caddy accepted last (for people; never read back)."""
        return self.directory / "config.json"

    @property
    def pid_file(self) -> Path:
        return self.directory / "caddy.pid"

    @property
    def log(self) -> Path:
        """Caddy's own log, rolled by Caddy."""
        return self.directory / "caddy.log"

    @property
    def output(self) -> Path:
        """The process' stdout and stderr: what it says before its log is open, or when it dies."""
        return self.directory / "caddy.out"

    @property
    def admin_socket(self) -> Path:
        return self.directory / "admin.sock"

    @property
    def storage(self) -> Path:
        """Certificates and the internal CA (also Caddy's XDG_DATA_HOME)."""
        return self.directory / "data"

    @property
    def xdg_config(self) -> Path:
        return self.directory / "config"

    @property
    def local_ca_root(self) -> Path:
        """The internal CA's root certificate, for clients to trust."""
        return self.storage / "pki/authorities/local/root.crt"


class DataLayout:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def jwt_secret(self) -> Path:
        return self.root / "jwt-secret"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def image_store(self) -> ImageStorePaths:
        return ImageStorePaths(self.images)

    @property
    def system(self) -> SystemPaths:
        """The default place of the system files (``Settings.system_dir`` may be elsewhere)."""
        return SystemPaths(self.root / "system")

    @property
    def hypervisor_state(self) -> Path:
        return self.root / "hypervisor"

    @property
    def guests(self) -> Path:
        return self.root / "guests"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    def instance(self, instance_id: str) -> InstancePaths:
        return InstancePaths(self.guests / instance_id)

    def snapshot(self, snapshot_id: str) -> SnapshotPaths:
        return SnapshotPaths(self.snapshots / snapshot_id)

    @property
    def snapshot_schedules(self) -> Path:
        return self.root / "snapshot-schedules"

    def snapshot_schedule(self, instance_id: str) -> Path:
        """``snapshot-schedules/<instance id>.json``: the instance's schedule, as the API shows it."""
        return self.snapshot_schedules / f"{instance_id}.json"

    @property
    def memory_reclaim_hold(self) -> Path:
        """``memory-reclaim-hold.json``: the reclaim held until its expiry, when it deflates."""
        return self.root / "memory-reclaim-hold.json"

    def fork_staging(self, token: str) -> SnapshotPaths:
        """A fork of an instance copies its saved VM here first (removed after, or at start)."""
        return SnapshotPaths(self.snapshots / f"{FORK_STAGING_PREFIX}{token}")

    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    def volume(self, volume_id: str) -> VolumePaths:
        return VolumePaths(self.volumes / volume_id)

    def volume_staging(self, token: str) -> Path:
        """Where a volume from an archive is unpacked and built before it becomes a volume
        (removed after, or at the next start)."""
        return self.volumes / f"{VOLUME_STAGING_PREFIX}{token}"

    @property
    def builds(self) -> Path:
        return self.root / "builds"

    def build(self, build_id: str) -> BuildPaths:
        return BuildPaths(self.builds / build_id)

    @property
    def build_uploads(self) -> Path:
        """Where ``POST /builds`` spools a source sent before the form's fields: unnamed
        temporary files only (``api/builds.py``), nothing that outlives a request."""
        return self.root / "build-uploads"

    @property
    def builders(self) -> Path:
        return self.root / "builders"

    def builder(self, builder_id: str) -> BuilderPaths:
        return BuilderPaths(self.builders / builder_id)

    @property
    def ingresses(self) -> Path:
        return self.root / "ingresses"

    def ingress(self, ingress_id: str) -> Path:
        """``ingresses/<id>.json``: one ingress, as the API shows it."""
        return self.ingresses / f"{ingress_id}.json"

    @property
    def caddy(self) -> CaddyPaths:
        return CaddyPaths(self.root / "caddy")
