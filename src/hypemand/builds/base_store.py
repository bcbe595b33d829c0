"""A build's base images as a ready layer store, and the result's base layers taken back from it.

Under TCG a guest unpacks and hashes ~3 MB/s: buildah pulling a 170 MB Debian base in the VM
took 50 s, and pushing the result compressed that base's layer again (another 40 s). Neither is
the untrusted part of a build (no `RUN` is involved), so both are done where they are cheap:

* **in**: the host unpacks the bases with skopeo into a containers-storage image store (overlay
  driver, as buildah uses in the VM) under ``staging/store``; it goes on the read-only source
  disk, and buildah in the VM reads it as an *additional image store* (``/src/storage.conf``).
  `FROM` finds the base already unpacked; nothing is pulled in the VM. skopeo unpacks images
  the way podman does for any untrusted image; these are images of the server's own store.
* **out**: before ``buildah push`` the VM writes an empty placeholder named by each base
  layer's uncompressed digest into the output layout; buildah, finding a blob by that digest
  there, reuses it instead of compressing the layer again. The host then swaps each placeholder
  descriptor for the base's own stored blob (same content: the digest the config's ``diff_ids``
  names), so only the layers the build made leave the VM.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from hypemand.builds.oci_layout import ExportedBase, read_layout
from hypemand.errors import DependencyMissing, DomainError
from hypemand.fsutil import write_atomic
from hypemand.layout import BuildPaths, OciLayoutPaths


def storage_conf(with_store: bool) -> str:
    """The storage buildah uses in the VM: the cache disk for what it builds, the bases (when
    there are any: ``FROM scratch`` has none) read-only from the source disk."""
    text = '[storage]\ndriver = "overlay"\ngraphroot = "/mnt/cache/storage"\n'
    text += 'runroot = "/run/containers/storage"\n'
    if with_store:
        text += '\n[storage.options]\nadditionalimagestores = ["/src/store"]\n'
    return text


class BaseStoreFailed(DomainError):
    status = 500
    code = "base_store_failed"


def stage_bases(paths: BuildPaths, bases: list[ExportedBase], names: list[str],
                persistent_cache: bool) -> dict[str, dict[str, Any]]:
    """Put the bases on the source disk, as a ready image store, or (``persistent_cache``) as
    the OCI layout the VM pulls from, and write buildah's storage configuration; returns every
    base layer's descriptor by its uncompressed digest. Blocking.

    A builder's cache disk outlives the build, and the layers it keeps must not stand on a
    base that lives elsewhere: buildah 1.28's overlay driver records a child layer's lower
    layers by the short link names of the store it saw them in (``overlay/l/<name>``), and the
    next build's additional store has new names. So a builder's builds pull their bases into
    the builder's own store (once: the cache keeps them), and only builds without a builder
    use the ready store.
    """
    layers = base_layers(paths.bases, bases)
    if persistent_cache:
        paths.bases.rename(paths.pulled_bases)
    elif bases:
        make_base_store(paths.bases, bases, names, paths.base_store, paths.base_store_run)
    write_atomic(paths.storage_conf, storage_conf(with_store=bool(bases) and not persistent_cache).encode())
    return layers


def make_base_store(layout: Path, bases: list[ExportedBase], names: list[str], store: Path,
                    run: Path) -> None:
    """Unpack each exported base (``layout``'s ``baseN``) into the image store at ``store`` under
    its Dockerfile name; returns every base layer's descriptor by its uncompressed digest.
    Blocking."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise DependencyMissing("skopeo not found; install the Debian package skopeo")
    destination = f"containers-storage:[overlay@{store}+{run}:overlay.skip_mount_home=true]"
    for base, name in zip(bases, names, strict=True):
        argv = [skopeo, "copy", "--quiet", f"oci:{layout}:{base.layout_name}", destination + name]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BaseStoreFailed(f"unpacking base image {name} failed: {result.stderr.strip()[-500:]}")


def base_layers(layout: Path, bases: list[ExportedBase]) -> dict[str, dict[str, Any]]:
    """``diff_id`` -> the stored layer's descriptor, for every layer of ``bases``."""
    paths = OciLayoutPaths(layout)
    found: dict[str, dict[str, Any]] = {}
    for base in bases:
        manifest = json.loads(paths.blob(base.layout_digest).read_bytes())
        config = json.loads(paths.blob(manifest["config"]["digest"]).read_bytes())
        for descriptor, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
            found[diff_id] = {key: descriptor[key] for key in ("mediaType", "digest", "size")}
    return found


def substitute_base_layers(output: Path, layers: dict[str, dict[str, Any]]) -> int:
    """Rewrite the output layout's manifest: each layer that is a base's placeholder becomes that
    base's stored blob. Returns how many were swapped. Blocking.

    The layout came from the VM: it is read through ``read_layout`` first (sizes, digests,
    regular files, one image manifest), and only descriptors whose digest is one of this build's
    base layers are replaced, by descriptors from the server's own store."""
    image = read_layout(output)
    manifest = json.loads(image.body)
    swapped = 0
    for number, descriptor in enumerate(manifest["layers"]):
        stored = layers.get(descriptor.get("digest"))
        if stored is not None and descriptor != stored:
            manifest["layers"][number] = stored
            swapped += 1
    if not swapped:
        return 0
    paths = OciLayoutPaths(output)
    body = json.dumps(manifest, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    write_atomic(paths.blob(digest), body)
    entry = {"mediaType": image.media_type, "digest": digest, "size": len(body)}
    write_atomic(paths.index, json.dumps({"schemaVersion": 2, "manifests": [entry]}).encode())
    return swapped
