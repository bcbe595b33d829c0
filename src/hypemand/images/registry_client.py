"""An async client for the OCI distribution API: resolve manifests, download blobs.

* Auth: anonymous first; on a ``401`` the ``WWW-Authenticate`` challenge decides. ``Bearer``
  fetches a token from the realm (with Basic credentials if the caller lent a
  username/password, or uses a lent ``registry_token`` directly); ``Basic`` sends the
  credentials. Tokens are cached in memory per registry, scope and credentials.
* Transport: loopback registries (``localhost``, ``127.0.0.0/8``, ``::1``) are spoken to
  over plain HTTP, everything else over HTTPS. ``docker.io`` means ``registry-1.docker.io``.
* Integrity: manifests are hashed and compared with the digest they were asked by; blobs are
  hashed while streaming to a temp file and only committed to the BlobStore on a match, so
  a dropped connection or a corrupt blob leaves nothing behind. Hashing and writing happen in
  worker threads, overlapped with the download (``_OffLoopWriter``), never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self

import httpx

from hypemand.images.blobs import BlobStore, sha256_digest
from hypemand.images.errors import (
    DigestInvalid,
    ImageNotFound,
    PlatformNotAvailable,
    RateLimited,
    RegistryError,
)
from hypemand.images.media_types import (
    ACCEPT,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from hypemand.images.models import RegistryCredentials
from hypemand.images.reference import Platform, Reference

# Blobs stream in pieces of this size; each is hashed and written in one worker-thread call.
DOWNLOAD_CHUNK_BYTES = 1 << 20
_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    data: bytes

    def json(self) -> dict[str, Any]:
        parsed = json.loads(self.data)
        if not isinstance(parsed, dict):
            raise RegistryError(f"manifest {self.digest} is not a JSON object")
        return parsed


@dataclass(frozen=True)
class ResolvedManifest:
    """The platform-specific image manifest a reference resolves to."""

    manifest: Manifest
    platform: str | None  # from the index entry, if the reference named an index


def media_type_of(data: bytes, header: str | None) -> str:
    """The manifest's media type: the JSON ``mediaType`` field, else the HTTP header, else OCI."""
    with contextlib.suppress(ValueError, AttributeError):
        declared = json.loads(data).get("mediaType")
        if isinstance(declared, str) and declared:
            return declared
    if header:
        kind = header.split(";")[0].strip()
        if kind in INDEX_TYPES or kind in MANIFEST_TYPES:
            return kind
    with contextlib.suppress(ValueError, AttributeError):
        if "manifests" in json.loads(data):
            return OCI_INDEX
    return OCI_MANIFEST


def select_platform(index: dict[str, Any], wanted: Platform) -> tuple[str, str, str]:
    """Pick the index entry for ``wanted``: (digest, media type, platform string)."""
    available = []
    for entry in index.get("manifests") or []:
        plat = entry.get("platform") or {}
        available.append(f"{plat.get('os')}/{plat.get('architecture')}")
        if wanted.matches(plat.get("os"), plat.get("architecture"), plat.get("variant")):
            return entry["digest"], entry.get("mediaType") or OCI_MANIFEST, str(wanted)
    raise PlatformNotAvailable(
        f"platform {wanted} not available for image; index offers: {', '.join(available) or 'nothing'}"
    )


def is_loopback(host: str) -> bool:
    hostname = host
    if host.startswith("["):
        hostname = host[1 : host.index("]")]
    elif host.count(":") == 1:
        hostname = host.split(":")[0]
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def registry_base_url(domain: str) -> str:
    if domain == "docker.io":
        domain = "registry-1.docker.io"
    scheme = "http" if is_loopback(domain) else "https"
    return f"{scheme}://{domain}"


def _registry_reason(response: httpx.Response) -> str:
    """The registry's own words: ``CODE: message`` from the error body, else the status line."""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        errors = response.json().get("errors") or []
        parts = [f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors]
        if parts:
            return "; ".join(parts)
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


def write_and_hash(handle: BinaryIO, hasher: hashlib._Hash, chunk: bytes) -> None:
    """Append one downloaded chunk and add it to the running hash (blocking: a worker thread's)."""
    hasher.update(chunk)
    handle.write(chunk)


class _OffLoopWriter:
    """The temp file a blob downloads into. Each chunk is hashed and written in a worker thread
    while the next one arrives from the network, so the event loop does neither, downloading and
    writing overlap, and at most two chunks are held at once."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._handle: BinaryIO | None = None
        self._hasher = hashlib.sha256()
        self._pending: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Self:
        self._handle = await asyncio.to_thread(self._path.open, "wb")
        return self

    async def write(self, chunk: bytes) -> None:
        await self._settle()  # chunks are appended in order, one at a time
        assert self._handle is not None
        writing = asyncio.to_thread(write_and_hash, self._handle, self._hasher, chunk)
        self._pending = asyncio.ensure_future(writing)

    async def digest(self) -> str:
        """The ``sha256:`` digest of everything written."""
        await self._settle()
        return "sha256:" + self._hasher.hexdigest()

    async def _settle(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            # A write still running must end before its file is closed, also when the download
            # failed; its own error then only matters if nothing else went wrong.
            if exc_type is None:
                await self._settle()
            else:
                with contextlib.suppress(Exception):
                    await self._settle()
        finally:
            if self._handle is not None:
                await asyncio.to_thread(self._handle.close)


class RegistryClient:
    def __init__(self, *, timeout: float = 60.0, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=10.0),
            follow_redirects=True,
            transport=transport,
            headers={"User-Agent": "hypemand"},
        )
        # (registry, scope, credentials hash) -> (Authorization header value, expiry)
        self._auth_cache: dict[tuple[str, str, str], tuple[str, float]] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- auth ------------------------------------------------------------------------

    @staticmethod
    def _cred_key(credentials: RegistryCredentials | None) -> str:
        if credentials is None or not credentials.present:
            return ""
        return hashlib.sha256("\x00".join(credentials.fingerprint()).encode()).hexdigest()

    async def _authorize(self, challenge: str, domain: str, scope: str,
                         credentials: RegistryCredentials | None) -> tuple[str, float]:
        scheme, params = _parse_challenge(challenge)
        if scheme == "basic":
            if credentials is None or not credentials.username:
                raise ImageNotFound(f"registry {domain} requires credentials (unauthorized)")
            password = credentials.password.get_secret_value() if credentials.password else ""
            token = base64.b64encode(f"{credentials.username}:{password}".encode()).decode()
            return f"Basic {token}", time.monotonic() + 3600
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(f"registry {domain} sent an unsupported auth challenge: {challenge!r}")
        if credentials is not None and credentials.registry_token:
            return f"Bearer {credentials.registry_token.get_secret_value()}", time.monotonic() + 300
        query = {"service": params.get("service", "")} if params.get("service") else {}
        query["scope"] = params.get("scope") or scope
        auth = None
        if credentials is not None and credentials.username:
            password = credentials.password.get_secret_value() if credentials.password else ""
            auth = httpx.BasicAuth(credentials.username, password)
        try:
            response = await self._http.get(params["realm"], params=query, auth=auth)
        except httpx.HTTPError as exc:
            raise RegistryError(f"cannot reach token service {params['realm']}: {exc}") from exc
        if response.status_code in (401, 403):
            raise ImageNotFound(f"token service refused access to {scope}: {_registry_reason(response)}")
        if response.status_code >= 400:
            reason = _registry_reason(response)
            raise RegistryError(f"token service answered {response.status_code}: {reason}")
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError) as exc:
            raise RegistryError(f"token service sent an unreadable answer: {exc}") from exc
        if not token:
            raise RegistryError("token service sent no token")
        return f"Bearer {token}", time.monotonic() + max(lifetime - 10, 5)

    async def _send(self, method: str, ref: Reference, path: str, credentials: RegistryCredentials | None,
                    headers: dict[str, str] | None = None, stream: bool = False) -> httpx.Response:
        """One registry request with the challenge flow; the caller closes streamed responses."""
        url = f"{registry_base_url(ref.domain)}/v2/{ref.path}/{path}"
        scope = f"repository:{ref.path}:pull"
        key = (ref.domain, scope, self._cred_key(credentials))
        for attempt in range(2):
            request_headers = dict(headers or {})
            cached = self._auth_cache.get(key)
            if cached and cached[1] > time.monotonic():
                request_headers["Authorization"] = cached[0]
            try:
                response = await self._http.send(
                    self._http.build_request(method, url, headers=request_headers), stream=stream
                )
            except httpx.HTTPError as exc:
                raise RegistryError(f"cannot reach registry {ref.domain}: {exc}") from exc
            if response.status_code == 401 and attempt == 0 and "www-authenticate" in response.headers:
                challenge = response.headers["www-authenticate"]
                await response.aclose()
                self._auth_cache[key] = await self._authorize(challenge, ref.domain, scope, credentials)
                continue
            if response.status_code >= 400:
                if stream:
                    await response.aread()
                    await response.aclose()
                reason = _registry_reason(response)
                if response.status_code in (401, 403, 404):
                    raise ImageNotFound(f"{ref.repository}: {reason}")
                if response.status_code == 429:
                    raise RateLimited(f"registry {ref.domain} rate limit exceeded: {reason}")
                raise RegistryError(f"registry {ref.domain} answered {response.status_code}: {reason}")
            return response
        raise RegistryError(f"registry {ref.domain} kept refusing authentication")  # pragma: no cover

    # ---- manifests -------------------------------------------------------------------

    async def get_manifest(self, ref: Reference, reference: str,
                           credentials: RegistryCredentials | None = None) -> Manifest:
        response = await self._send("GET", ref, f"manifests/{reference}", credentials, {"Accept": ACCEPT},
                                    stream=True)
        body = bytearray()
        try:
            # Read at most the limit: a registry that keeps sending must not fill our memory.
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_MANIFEST_BYTES:
                    raise RegistryError(f"manifest of {ref} is larger than {MAX_MANIFEST_BYTES} bytes")
        except httpx.HTTPError as exc:
            raise RegistryError(f"download of the manifest of {ref} broke off: {exc}") from exc
        finally:
            await response.aclose()
        data = bytes(body)
        digest = sha256_digest(data)
        if reference.startswith("sha256:") and digest != reference:
            raise DigestInvalid(
                f"manifest digest mismatch for {ref.repository}: asked {reference}, got {digest}"
            )
        return Manifest(digest=digest, media_type=media_type_of(data, response.headers.get("content-type")),
                        data=data)

    async def resolve(
        self, ref: Reference, platform: Platform, credentials: RegistryCredentials | None = None
    ) -> tuple[Manifest | None, ResolvedManifest]:
        """Resolve ``ref`` to an image manifest for ``platform``.

        Returns (the index if the reference named one, the image manifest).
        """
        top = await self.get_manifest(ref, ref.reference, credentials)
        if top.media_type in INDEX_TYPES:
            child_digest, _, chosen = select_platform(top.json(), platform)
            child = await self.get_manifest(ref, child_digest, credentials)
            return top, ResolvedManifest(manifest=child, platform=chosen)
        if top.media_type not in MANIFEST_TYPES:
            raise RegistryError(f"unsupported manifest media type {top.media_type!r} for {ref}")
        return None, ResolvedManifest(manifest=top, platform=None)

    # ---- blobs -----------------------------------------------------------------------

    async def fetch_blob(
        self,
        ref: Reference,
        digest: str,
        blobs: BlobStore,
        credentials: RegistryCredentials | None = None,
        expected_size: int | None = None,
    ) -> Path:
        """Download a blob into the store (once: an existing blob is not fetched again)."""
        if blobs.has(digest):
            return blobs.path(digest)
        tmp = blobs.temp_path()
        written = 0
        try:
            response = await self._send("GET", ref, f"blobs/{digest}", credentials, stream=True)
            try:
                async with _OffLoopWriter(tmp) as out:
                    async for chunk in response.aiter_bytes(DOWNLOAD_CHUNK_BYTES):
                        written += len(chunk)
                        if expected_size is not None and written > expected_size:
                            # Stop reading: an endless or padded blob must not fill the disk.
                            raise DigestInvalid(f"blob {digest} is larger than the {expected_size} bytes "
                                                "the manifest says")
                        await out.write(chunk)
                    computed = await out.digest()
            except httpx.HTTPError as exc:
                raise RegistryError(f"download of {digest} from {ref.domain} broke off: {exc}") from exc
            finally:
                await response.aclose()
            if expected_size is not None and written != expected_size:
                raise DigestInvalid(f"blob {digest} has {written} bytes, the manifest says {expected_size}")
            return await asyncio.to_thread(blobs.commit_file, tmp, digest, computed_digest=computed)
        finally:
            tmp.unlink(missing_ok=True)
