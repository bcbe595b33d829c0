"""Debian root filesystems made with ``mmdebstrap``, as one-layer OCI layouts in the system dir.

Two are made here: :data:`BUILDER`, the image of the builder VMs (buildah, no network, a storage
config for the cache disk at ``/var/lib/containers``), and :data:`DEBIAN_TEST`, a small Debian
with bash and python3 for tests that need a real distribution. Nothing is downloaded from
anywhere but Debian's archive.

A root is kept in ``<system_dir>/rootfs/<name>-<spec hash>/`` (``hypemand.layout.RootfsPaths``):
made in a staging directory next to it and renamed into place when complete, under an ``flock``
of its own (several processes may prepare the same system dir at once; a server starting
meanwhile does not wait for the minute this can take, see ``SystemPaths.rootfs_lock``). It is
made again only when its spec changes (the hash covers the spec and :data:`RECIPE_VERSION`).

Blocking throughout: call it through ``asyncio.to_thread`` from async code.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field

from hypemand.errors import DependencyMissing, DomainError
from hypemand.fsutil import fsync_dir, write_atomic
from hypemand.images.media_types import OCI_INDEX, OCI_MANIFEST
from hypemand.layout import OciLayoutPaths, RootfsPaths, SystemPaths

# Bumped whenever the way a root is made changes (options, hooks, layout writing): every cached
# root is then made again.
RECIPE_VERSION = 1
SUITE = "bookworm"
DEBIAN_SOURCES = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# Every timestamp mmdebstrap controls (and the image config's ``created``): the same inputs and
# the same archive give the same layer.
SOURCE_DATE_EPOCH = 1704067200
CREATED = "2024-01-01T00:00:00Z"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
# Level 1: the layer is read once per import on this machine; speed beats ~10% of size.
GZIP_LEVEL = 1
_CHUNK = 1 << 20
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Documentation, manual pages and translations are not needed in a VM nobody logs into
# (a fifth of the builder's size); the copyright files stay.
_DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)


class RootfsSpec(BaseModel):
    """What a root holds and how its image runs. The layout's own tag is ``tag``."""

    model_config = ConfigDict(frozen=True)

    repository: str  # the /v2 repository it is pushed to, e.g. ``hypeman/builder``
    tag: str
    packages: tuple[str, ...]
    cmd: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = (("PATH", DEFAULT_PATH),)
    working_dir: str = "/"
    # Files written into the root after the packages (path in the root -> content); they
    # replace what a package put there.
    files: tuple[tuple[str, str], ...] = Field(default=())

    @property
    def name(self) -> str:
        """``hypeman/builder:latest``: how a client would push it (``docker.io/`` is implied)."""
        return f"{self.repository}:{self.tag}"

    def spec_hash(self) -> str:
        """16 hex digits of sha256 over the spec and the recipe's version."""
        canonical = json.dumps({"recipe": RECIPE_VERSION, "suite": SUITE, "dpkg": _DPKG_OPTIONS,
                                "spec": self.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def key(self) -> str:
        """The cache directory's name: ``hypeman-builder-latest-<spec hash>``."""
        slug = self.name.replace("/", "-").replace(":", "-")
        return f"{slug}-{self.spec_hash()}"


# buildah in the builder VM resolves a short name (``FROM alpine``) the way the server does
# (``docker.io/library/alpine``) and finds it in local storage, where the build loaded its bases
# first. docker.io is blocked so that a base that was not loaded fails at once with a clear
# message instead of trying a network the VM does not have; other hosts have no network either.
BUILDER_REGISTRIES_CONF = """\
# Written by hypemand: the builder VM has no network. Every base image is loaded into local
# storage from /src/bases before a build runs, so no registry is ever contacted.
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"

[[registry]]
location = "docker.io"
blocked = true
"""

# The build's cache disk is mounted at /var/lib/containers: the layer store lives on it.
BUILDER_STORAGE_CONF = """\
# Written by hypemand: buildah's layer store is the builder's cache disk (/var/lib/containers).
[storage]
driver = "overlay"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
"""

BUILDER = RootfsSpec(
    repository="hypeman/builder",
    tag="latest",
    packages=("buildah", "ca-certificates"),
    # Nothing to run: the build service execs buildah into the VM through the guest agent.
    cmd=("sleep", "infinity"),
    files=(("/etc/containers/registries.conf", BUILDER_REGISTRIES_CONF),
           ("/etc/containers/storage.conf", BUILDER_STORAGE_CONF)),
)

DEBIAN_TEST = RootfsSpec(
    repository="hypeman/debian",
    tag="bookworm",
    packages=("bash", "python3", "ca-certificates"),
    cmd=("bash",),
    env=(("PATH", DEFAULT_PATH), ("LANG", "C.UTF-8")),
)


class RootfsInfo(BaseModel):
    """``rootfs.json``: what a prepared root is."""

    name: str
    spec_hash: str
    manifest_digest: str
    packages: dict[str, str]  # the spec's packages -> their installed Debian versions
    tar_bytes: int
    layer_bytes: int
    seconds: float  # how long making it took


class PreparedRootfs(BaseModel):
    spec: RootfsSpec
    layout: Path  # an OCI layout with one manifest, tagged ``spec.tag``
    info: RootfsInfo


class RootfsFailed(DomainError):
    """mmdebstrap failed (its last output lines say why)."""


# ---- the cache -----------------------------------------------------------------------------------


def ensure_rootfs(spec: RootfsSpec, system_dir: Path) -> PreparedRootfs:
    """The prepared root of ``spec`` in ``system_dir``, made first if it is not there (about half
    a minute and 200 MB of downloads for the builder). Fast (a file read) when it is."""
    system = SystemPaths(system_dir)
    paths = system.rootfs(spec.key())
    prepared = _read_prepared(spec, paths)
    if prepared is not None:
        return prepared
    with _rootfs_lock(system):
        prepared = _read_prepared(spec, paths)  # another process may have made it meanwhile
        if prepared is not None:
            return prepared
        staging = system.rootfs_staging(spec.key(), uuid.uuid4().hex[:12])
        try:
            make_debian_layout(spec, staging.directory)
            os.replace(staging.directory, paths.directory)
            fsync_dir(paths.directory.parent)
        finally:
            shutil.rmtree(staging.directory, ignore_errors=True)
        _remove_stale(system, spec, keep=paths.directory)
    prepared = _read_prepared(spec, paths)
    if prepared is None:  # pragma: no cover - only if someone removed it under the lock
        raise RootfsFailed(f"the root {spec.name} vanished right after it was made")
    return prepared


def builder_version(system_dir: Path) -> str:
    """The Debian version of buildah in the prepared builder root (``1.28.2+ds1-3+...``), for a
    build's provenance. Made first if missing, like :func:`ensure_rootfs`."""
    return ensure_rootfs(BUILDER, system_dir).info.packages["buildah"]


def _read_prepared(spec: RootfsSpec, paths: RootfsPaths) -> PreparedRootfs | None:
    try:
        info = RootfsInfo.model_validate_json(paths.info.read_bytes())
    except FileNotFoundError:
        return None
    return PreparedRootfs(spec=spec, layout=paths.layout, info=info)


def _remove_stale(system: SystemPaths, spec: RootfsSpec, keep: Path) -> None:
    """Roots of older specs of the same name, and staging left by a crash. (Unlike kernels, a
    root is imported into the image store, which keeps its own copy: nothing boots from here.)"""
    slug = spec.key().removesuffix(spec.spec_hash())
    for entry in system.rootfs_root.iterdir():
        stale = entry.name.startswith(slug) or entry.name.startswith(f".staging-{slug}")
        if stale and entry != keep and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def _rootfs_lock(system: SystemPaths) -> Iterator[None]:
    system.rootfs_root.mkdir(parents=True, exist_ok=True)
    fd = os.open(system.rootfs_lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---- making one ----------------------------------------------------------------------------------


def make_debian_layout(spec: RootfsSpec, dest: Path) -> Path:
    """Make ``spec``'s root with mmdebstrap and write it at ``dest`` (created; must not exist) as
    an OCI layout (``dest/layout``) with ``dest/rootfs.json``; returns the layout directory.

    Working files (mmdebstrap's tarball, the status file) are removed once the layer is written.
    """
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise DependencyMissing("mmdebstrap not found; install the Debian package mmdebstrap")
    started = time.monotonic()
    paths = RootfsPaths(dest)
    dest.mkdir(parents=True)
    try:
        _write_extra_files(spec, paths)
        _run_mmdebstrap(mmdebstrap, mmdebstrap_args(spec, paths))
        config = image_config(spec)
        layout = OciLayoutPaths(paths.layout)
        manifest_digest, layer_bytes = write_layout(paths.tarball, config, layout, spec.tag)
        info = RootfsInfo(
            name=spec.name, spec_hash=spec.spec_hash(), manifest_digest=manifest_digest,
            packages=installed_versions(paths.dpkg_status.read_text(), spec.packages),
            tar_bytes=paths.tarball.stat().st_size, layer_bytes=layer_bytes,
            seconds=round(time.monotonic() - started, 1),
        )
    finally:
        for working in (paths.tarball, paths.dpkg_status):
            working.unlink(missing_ok=True)
        shutil.rmtree(paths.extra_files, ignore_errors=True)
    write_atomic(paths.info, info.model_dump_json(indent=2).encode())
    return paths.layout


def mmdebstrap_args(spec: RootfsSpec, paths: RootfsPaths) -> list[str]:
    """mmdebstrap's arguments (after the program) for ``spec``, writing ``paths.tarball``.

    mmdebstrap already leaves out apt's package lists and caches (its ``cleanup/apt`` step) and
    the logs that would make the result differ between runs; resolv.conf and hostname (copied
    from the host) go too: the guest's init writes its own.
    """
    hooks = ['rm -f "$1/etc/resolv.conf" "$1/etc/hostname"']
    for index, (target, _content) in enumerate(spec.files):
        source = shlex.quote(str(paths.extra_file(index)))
        where = shlex.quote(target)
        hooks.append(f'mkdir -p "$1$(dirname {where})" && cp {source} "$1"{where}')
    hooks.append(f'cp "$1/var/lib/dpkg/status" {shlex.quote(str(paths.dpkg_status))}')
    return [
        "--variant=minbase",
        f"--include={','.join(spec.packages)}",
        "--format=tar",
        '--aptopt=Apt::Install-Recommends "false"',
        *(f"--dpkgopt={option}" for option in _DPKG_OPTIONS),
        *(f"--customize-hook={hook}" for hook in hooks),
        SUITE,
        str(paths.tarball),
        *DEBIAN_SOURCES,
    ]


def _write_extra_files(spec: RootfsSpec, paths: RootfsPaths) -> None:
    paths.extra_files.mkdir()
    for index, (_target, content) in enumerate(spec.files):
        paths.extra_file(index).write_text(content)


def _run_mmdebstrap(program: str, args: list[str]) -> None:
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH))
    result = subprocess.run([program, *args], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise RootfsFailed(f"mmdebstrap failed ({result.returncode}):\n{tail}")


def image_config(spec: RootfsSpec) -> dict[str, Any]:
    """The OCI image config without ``rootfs`` (``write_layout`` adds the layer's diff_id)."""
    return {
        "created": CREATED,
        "architecture": _GOARCH.get(platform.machine(), platform.machine()),
        "os": "linux",
        "config": {
            "Env": [f"{key}={value}" for key, value in spec.env],
            "Cmd": list(spec.cmd),
            "WorkingDir": spec.working_dir,
        },
        "history": [{"created": CREATED,
                     "created_by": f"mmdebstrap --variant=minbase {SUITE} +{','.join(spec.packages)}"}],
    }


def installed_versions(dpkg_status: str, packages: tuple[str, ...]) -> dict[str, str]:
    """``{package: version}`` for ``packages``, from a dpkg status file's text; a package that
    is not installed is an error (mmdebstrap would have failed first)."""
    versions: dict[str, str] = {}
    for stanza in dpkg_status.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if ": " in line and not line.startswith(" "))
        if fields.get("Package") in packages and fields.get("Status", "").endswith(" installed"):
            versions[fields["Package"]] = fields.get("Version", "")
    missing = [p for p in packages if p not in versions]
    if missing:
        raise RootfsFailed(f"packages missing from the root's dpkg status: {', '.join(missing)}")
    return versions


# ---- writing the OCI layout ----------------------------------------------------------------------


class _HashingWriter:
    """Counts and hashes what gzip writes before passing it on to the blob file."""

    def __init__(self, target: IO[bytes]) -> None:
        self.target = target
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return self.target.write(data)

    def flush(self) -> None:
        self.target.flush()


def write_layout(tarball: Path, config: dict[str, Any], layout: OciLayoutPaths, tag: str) -> tuple[str, int]:
    """Write an OCI layout at ``layout`` (created) whose one image has ``tarball`` as its only
    layer (gzip, fixed header, so the same tarball gives the same digest) and ``config`` (its
    ``rootfs`` added); the index names it ``tag``. Returns the manifest digest and the layer's
    size. Blocking: one read of the tarball, hashing both sides while compressing.
    """
    layout.blobs.mkdir(parents=True)
    partial = layout.partial_blob(uuid.uuid4().hex)
    diff_id = hashlib.sha256()
    with tarball.open("rb") as source, partial.open("wb") as sink:
        counted = _HashingWriter(sink)
        with gzip.GzipFile(fileobj=counted, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as packed:
            while chunk := source.read(_CHUNK):
                diff_id.update(chunk)
                packed.write(chunk)
        sink.flush()
        os.fsync(sink.fileno())
    layer_digest = "sha256:" + counted.hasher.hexdigest()
    os.replace(partial, layout.blob(layer_digest))
    layer = {"mediaType": OCI_LAYER_GZIP, "digest": layer_digest, "size": counted.size}

    full_config = dict(config, rootfs={"type": "layers", "diff_ids": ["sha256:" + diff_id.hexdigest()]})
    config_descriptor = _write_json_blob(layout, full_config, OCI_CONFIG)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_descriptor, "layers": [layer]}
    manifest_descriptor = _write_json_blob(layout, manifest, OCI_MANIFEST)
    manifest_descriptor["annotations"] = {REF_NAME_ANNOTATION: tag}
    write_atomic(layout.marker, json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [manifest_descriptor]}
    write_atomic(layout.index, json.dumps(index, indent=2).encode())
    return str(manifest_descriptor["digest"]), counted.size


def _write_json_blob(layout: OciLayoutPaths, document: dict[str, Any], media_type: str) -> dict[str, Any]:
    data = json.dumps(document, separators=(",", ":"), sort_keys=True).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    write_atomic(layout.blob(digest), data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


# ---- python -m hypemand.builds.rootfs ------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``python -m hypemand.builds.rootfs [--test] [SYSTEM_DIR]``: prepare the builder root (and
    with ``--test`` the Debian test root) in the server's system dir, or in ``SYSTEM_DIR``."""
    from hypemand.config import Settings

    specs = [BUILDER, DEBIAN_TEST] if "--test" in argv else [BUILDER]
    rest = [arg for arg in argv if arg != "--test"]
    system_dir = Path(rest[0]).absolute() if rest else Settings.load().system_dir
    for spec in specs:
        started = time.monotonic()
        try:
            prepared = ensure_rootfs(spec, system_dir)
        except DomainError as error:
            print(f"hypemand rootfs {spec.name}: {error}", file=sys.stderr)
            return 1
        info = prepared.info
        versions = " ".join(f"{name}={version}" for name, version in info.packages.items())
        print(f"{spec.name:<26} {info.manifest_digest[:19]}  layer {info.layer_bytes / 1e6:.0f} MB "
              f"(tar {info.tar_bytes / 1e6:.0f} MB, made in {info.seconds:.0f} s)  {versions}")
        print(f"{'':<26} {prepared.layout}  (ready in {time.monotonic() - started:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
