"""``push``: a local image into the server's own registry (``/v2``) with the API key.

Sources: an OCI image layout directory (``skopeo``/``umoci``/``buildah`` output), a tar of one
(``docker save`` since Docker 25 writes that), or the older ``docker save`` tar (``manifest.json``
plus ``<id>/layer.tar``), from which an OCI manifest is made here. The OCI distribution push is
done with httpx (the SDK's HTTP client): per blob ``HEAD`` (skip what the server has), else
``POST /v2/<repo>/blobs/uploads/`` -> ``Location`` -> ``PUT <Location>?digest=`` with the bytes;
then ``PUT /v2/<repo>/manifests/<tag>``. An index's manifests go first, by digest. The server
turns the pushed image into an ``/images`` entry; ``push`` waits for it unless ``-d``.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any

import httpx
import typer
from hypeman import NotFoundError

from hypeman_cli import state
from hypeman_cli.config import USER_AGENT
from hypeman_cli.errors import TOKEN_HINT, CLIError, error_body_line, unreachable
from hypeman_cli.images import IMAGE_COLUMNS, wait_image
from hypeman_cli.output import emit
from hypeman_cli.progress import Phases, Transfer
from hypeman_cli.units import human_bytes

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
CHUNK = 1 << 20

Opener = Callable[[], IO[bytes]]


@dataclass
class Blob:
    digest: str
    size: int
    open: Opener


@dataclass
class Manifest:
    media_type: str
    data: bytes
    digest: str
    blobs: list[Blob] = field(default_factory=list)
    children: list[Manifest] = field(default_factory=list)

    def total_bytes(self) -> int:
        return sum(b.size for b in self.blobs) + sum(c.total_bytes() for c in self.children)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hash_stream(opener: Opener) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with opener() as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return "sha256:" + digest.hexdigest(), size


class _Files:
    """Read access to the files of a directory or a tar archive, by relative path."""

    def __init__(self, path: Path, stack: ExitStack) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        if path.is_file():
            try:
                archive = tarfile.open(path)  # noqa: SIM115 - closed by the caller's ExitStack
            except tarfile.TarError as exc:
                raise CLIError(f"{path} is neither an OCI layout directory nor a tar archive ({exc})") \
                    from None
            self.tar = stack.enter_context(archive)
            self.members = {m.name.removeprefix("./"): m for m in self.tar.getmembers() if m.isfile()}

    def exists(self, name: str) -> bool:
        return name in self.members if self.tar is not None else (self.path / name).is_file()

    def size(self, name: str) -> int:
        return self.members[name].size if self.tar is not None else (self.path / name).stat().st_size

    def opener(self, name: str) -> Opener:
        if self.tar is not None:
            tar, member = self.tar, self.members[name]

            def open_member() -> IO[bytes]:
                stream = tar.extractfile(member)
                if stream is None:
                    raise CLIError(f"cannot read {name} in {self.path}")
                return stream

            return open_member
        target = self.path / name
        return lambda: target.open("rb")

    def read(self, name: str) -> bytes:
        if not self.exists(name):
            raise CLIError(f"{self.path} has no {name}")
        with self.opener(name)() as stream:
            return stream.read()

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.read(name))
        except ValueError as exc:
            raise CLIError(f"{name} in {self.path} is not JSON: {exc}") from None


def _blob_name(digest: str) -> str:
    algorithm, _, encoded = digest.partition(":")
    if not encoded or "/" in encoded or "/" in algorithm:
        raise CLIError(f"not a digest: {digest!r}")
    return f"blobs/{algorithm}/{encoded}"


def _layout_manifest(files: _Files, descriptor: dict[str, Any]) -> Manifest:
    digest = str(descriptor.get("digest", ""))
    data = files.read(_blob_name(digest))
    document = json.loads(data)
    media_type = str(descriptor.get("mediaType") or document.get("mediaType") or OCI_MANIFEST)
    manifest = Manifest(media_type=media_type, data=data, digest=digest)
    if media_type in INDEX_TYPES:
        for child in document.get("manifests", []):
            if not files.exists(_blob_name(str(child.get("digest", "")))):
                raise CLIError(f"the index {digest[:19]} lists a manifest the layout lacks: "
                               f"{child.get('digest')} ({child.get('platform')}); "
                               "copy the image with all its platforms")
            manifest.children.append(_layout_manifest(files, child))
        return manifest
    for entry in [document.get("config", {}), *document.get("layers", [])]:
        name = _blob_name(str(entry.get("digest", "")))
        if not files.exists(name):
            raise CLIError(f"the layout lacks the blob {entry.get('digest')}")
        manifest.blobs.append(Blob(str(entry["digest"]), files.size(name), files.opener(name)))
    return manifest


def _ref_names(entry: dict[str, Any]) -> list[str]:
    annotations = entry.get("annotations") or {}
    return [str(annotations[key]) for key in (REF_NAME, CONTAINERD_NAME) if annotations.get(key)]


def load_layout(files: _Files, ref: str | None) -> tuple[Manifest, str | None]:
    """The manifest (or index) an OCI layout's ``index.json`` names ``ref`` (or its only one),
    and the full image name the layout records for it, if any."""
    entries = files.json("index.json").get("manifests", [])
    if not entries:
        raise CLIError(f"{files.path}: index.json lists no image")
    if ref is not None:
        chosen = [e for e in entries if any(n == ref or n.endswith(f":{ref}") for n in _ref_names(e))]
    elif len(entries) == 1:
        chosen = entries
    else:
        chosen = [e for e in entries if "latest" in _ref_names(e)]
    if len(chosen) != 1:
        names = sorted({n for e in entries for n in _ref_names(e)})
        wanted = f"no image named {ref!r}" if ref is not None else "several images"
        raise CLIError(f"{files.path}: {wanted}; pick one as PATH:NAME (names: {', '.join(names) or 'none'})")
    entry = chosen[0]
    full_names = [n for n in _ref_names(entry) if "/" in n or ":" in n]
    return _layout_manifest(files, entry), (full_names[0] if full_names else None)


def load_docker_archive(files: _Files, ref: str | None) -> tuple[Manifest, str | None]:
    """An OCI manifest made from the older ``docker save`` format (manifest.json, layer.tar)."""
    images = files.json("manifest.json")
    if not isinstance(images, list) or not images:
        raise CLIError(f"{files.path}: manifest.json lists no image")
    if ref is not None:
        chosen = [i for i in images
                  if any(t == ref or t.endswith(f":{ref}") for t in i.get("RepoTags") or [])]
    else:
        chosen = images if len(images) == 1 else []
    if len(chosen) != 1:
        tags = sorted(t for i in images for t in i.get("RepoTags") or [])
        raise CLIError(f"{files.path}: pick one image as PATH:NAME (tags: {', '.join(tags) or 'none'})")
    image = chosen[0]
    config_name = str(image["Config"])
    config = files.read(config_name)
    blobs = [Blob(sha256_digest(config), len(config), files.opener(config_name))]
    layers = []
    for layer_name in image.get("Layers", []):
        opener = files.opener(str(layer_name))
        digest, size = _hash_stream(opener)
        with opener() as stream:
            gzipped = stream.read(2) == b"\x1f\x8b"
        blobs.append(Blob(digest, size, opener))
        layers.append({"mediaType": OCI_LAYER_GZIP if gzipped else OCI_LAYER, "digest": digest, "size": size})
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": blobs[0].digest, "size": blobs[0].size},
        "layers": layers,
    }
    data = json.dumps(document, separators=(",", ":")).encode()
    tags = image.get("RepoTags") or []
    return Manifest(OCI_MANIFEST, data, sha256_digest(data), blobs), (str(tags[0]) if tags else None)


def load_source(spec: str, stack: ExitStack) -> tuple[Manifest, str | None]:
    """``PATH`` or ``PATH:NAME`` (a tag or full name inside a layout or archive with several)."""
    path, ref = Path(spec), None
    if not path.exists() and ":" in spec:
        head, _, tail = spec.rpartition(":")
        if Path(head).exists():
            path, ref = Path(head), tail
    if not path.exists():
        raise CLIError(f"no such file or directory: {spec}")
    files = _Files(path, stack)
    if files.exists("oci-layout") or files.exists("index.json"):
        return load_layout(files, ref)
    if files.exists("manifest.json"):
        return load_docker_archive(files, ref)
    raise CLIError(f"{spec} is not an OCI image layout (no index.json) nor a `docker save` archive "
                   "(no manifest.json)")


def split_target(target: str) -> tuple[str, str, str]:
    """``team/app:v1`` -> (repository ``team/app``, reference ``v1``, image name
    ``docker.io/team/app:v1``), the name the server gives the pushed image."""
    name, at, digest = target.partition("@")
    reference = digest if at else "latest"
    last = name.rsplit("/", 1)[-1]
    if not at and ":" in last:
        name, _, reference = name.rpartition(":")
    repository = name
    for prefix in ("docker.io/", "index.docker.io/"):
        repository = repository.removeprefix(prefix)
    if not repository or not reference:
        raise CLIError(f"not an image name: {target!r}")
    full = repository if "/" in repository else f"library/{repository}"
    image = f"docker.io/{full}" + (f"@{reference}" if at else f":{reference}")
    return repository, reference, image


class Registry:
    """The server's ``/v2``, with the API key as a Bearer token."""

    def __init__(self, base_url: str, api_key: str, repository: str, transfer: Transfer) -> None:
        self.base_url = base_url
        self.repository = repository
        self.transfer = transfer
        self.http = httpx.Client(base_url=base_url, timeout=httpx.Timeout(300, connect=10),
                                 headers={"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT})

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, url: str | httpx.URL, expected: tuple[int, ...],
                 **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.TimeoutException:
            raise CLIError(f"the Hypeman server at {self.base_url} did not answer in time "
                           f"({method} {url})") from None
        except httpx.TransportError as exc:
            raise CLIError(unreachable(self.base_url, exc)) from None
        if response.status_code not in expected:
            hint = f" ({TOKEN_HINT})" if response.status_code == 401 else ""
            raise CLIError(f"push failed at {method} {httpx.URL(url).path}: "
                           f"{error_body_line(response.status_code, response.content)}{hint}")
        return response

    def _chunks(self, blob: Blob) -> Iterator[bytes]:
        with blob.open() as stream:
            while chunk := stream.read(CHUNK):
                self.transfer.advance(len(chunk))
                yield chunk

    def push_blob(self, blob: Blob) -> None:
        path = f"/v2/{self.repository}/blobs/{blob.digest}"
        if self._request("HEAD", path, (200, 404)).status_code == 200:
            self.transfer.advance(blob.size)  # the server has it: nothing to send
            return
        started = self._request("POST", f"/v2/{self.repository}/blobs/uploads/", (202,))
        location = started.headers.get("location")
        if not location:
            raise CLIError("push failed: the server's upload answer has no Location")
        url = httpx.URL(self.base_url).join(location).copy_merge_params({"digest": blob.digest})
        self._request("PUT", url, (201, 204), content=self._chunks(blob),
                      headers={"Content-Length": str(blob.size), "Content-Type": "application/octet-stream"})

    def push_manifest(self, manifest: Manifest, reference: str) -> str:
        for child in manifest.children:
            self.push_manifest(child, child.digest)
        for blob in manifest.blobs:
            self.transfer.describe(f"{self.repository}: {blob.digest[7:19]}")
            self.push_blob(blob)
        response = self._request("PUT", f"/v2/{self.repository}/manifests/{reference}", (201, 200),
                                 content=manifest.data, headers={"Content-Type": manifest.media_type})
        return response.headers.get("docker-content-digest") or manifest.digest


def push(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="OCI layout directory or tar, or `docker save` archive; "
                                                "PATH:NAME picks one image", show_default=False)],
    target: Annotated[str | None, typer.Argument(help="name on the server, e.g. team/app:v1 "
                                                      "(default: the name recorded in the source)")] = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="do not wait for the server's conversion")]
    = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress")] = False,
) -> None:
    """Upload a local image into the server's registry (/v2) and wait until it can run."""
    st = state.get(ctx)
    settings = st.settings
    client = st.client()  # also checks that a key is there
    with ExitStack() as stack:
        manifest, recorded = load_source(source, stack)
        name = target or recorded
        if not name:
            raise CLIError("the source records no image name; give one: hypeman push SOURCE team/app:v1")
        repository, reference, image_name = split_target(name)
        with Transfer(f"{repository}:{reference}", manifest.total_bytes(), quiet) as transfer:
            registry = Registry(settings.base_url, settings.api_key or "", repository, transfer)
            try:
                digest = registry.push_manifest(manifest, reference)
            finally:
                registry.close()
    with Phases(quiet) as phases:
        phases.done(f"pushed {image_name} ({digest[:19]}, {human_bytes(manifest.total_bytes())})")
        if detach:
            emit({"name": image_name, "digest": digest}, st.fmt)
            return
        try:
            image = client.images.get(image_name)
        except NotFoundError:
            raise CLIError(f"the server accepted the push but lists no image {image_name}") from None
        image = wait_image(client, image, phases)
        phases.done(f"{image.name}: ready ({human_bytes(image.size_bytes)})")
    emit(image, st.fmt, IMAGE_COLUMNS)
