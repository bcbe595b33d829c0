"""Reading a pushed manifest: its media type and its validated shape, or a 400.

Used by the ``/v2`` push endpoints (``uploads.py``) before anything is stored and by
``ImageService.import_manifest``, so that no code after this point meets a manifest whose fields
have the wrong types (a ``platform`` string where an object belongs used to crash the import
after the tag had been written).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pydantic_core
from pydantic import ValidationError

from hypemand.errors import BadRequest
from hypemand.images.media_types import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
)
from hypemand.images.models import ImageConfig, ImageIndex, ImageManifest

# How many validation problems a 400 names; a hostile manifest can have thousands.
_REPORTED_PROBLEMS = 3


class ManifestInvalid(BadRequest):
    """The manifest is not JSON, not of a supported media type, or not of its media type's shape."""

    code = "manifest_invalid"


@dataclass(frozen=True)
class ParsedManifest:
    media_type: str
    document: ImageManifest | ImageIndex

    @property
    def is_index(self) -> bool:
        return isinstance(self.document, ImageIndex)


def parse_manifest(body: bytes, content_type: str | None) -> ParsedManifest:
    """Validate ``body`` completely; the media type is the body's ``mediaType``, else the
    ``Content-Type``, else (OCI allows leaving it out) what the shape says."""
    if len(body) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        # pydantic's parser, not json.loads: it refuses nesting deeper than 200 levels with a
        # ValueError, where json.loads recurses until RecursionError on ``[[[[...``.
        doc = pydantic_core.from_json(body)
    except ValueError as exc:
        raise ManifestInvalid(f"manifest is not JSON: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise ManifestInvalid("only schemaVersion 2 manifests are supported")
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ManifestInvalid("mediaType must be a string")
    header_type = (content_type or "").split(";")[0].strip()
    media_type = declared or header_type or (OCI_INDEX if "manifests" in doc else OCI_MANIFEST)
    model: type[ImageManifest] | type[ImageIndex]
    if media_type in MANIFEST_TYPES:
        model = ImageManifest
    elif media_type in INDEX_TYPES:
        model = ImageIndex
    else:
        raise ManifestInvalid(f"unsupported manifest media type: {media_type!r}")
    try:
        document = model.model_validate(doc)
    except ValidationError as exc:
        raise ManifestInvalid(f"not a valid {media_type}: {_problems(exc)}") from exc
    return ParsedManifest(media_type=media_type, document=document)


def _problems(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '(document)'}: {e['msg']}"
             for e in errors[:_REPORTED_PROBLEMS]]
    if len(errors) > _REPORTED_PROBLEMS:
        parts.append(f"and {len(errors) - _REPORTED_PROBLEMS} more")
    return "; ".join(parts)


def image_config_from(config_blob: bytes) -> tuple[ImageConfig, str | None]:
    """The run settings and the ``os/arch[/variant]`` of an OCI/Docker image config."""
    try:
        doc = json.loads(config_blob)
    except ValueError as exc:
        raise BadRequest(f"image config is not JSON: {exc}") from exc
    cfg = doc.get("config") or {}
    env: dict[str, str] = {}
    for item in cfg.get("Env") or []:
        key, _, value = str(item).partition("=")
        env[key] = value
    platform = None
    if doc.get("os") and doc.get("architecture"):
        platform = f"{doc['os']}/{doc['architecture']}" + (f"/{doc['variant']}" if doc.get("variant") else "")
    return ImageConfig(
        entrypoint=cfg.get("Entrypoint") or None,
        cmd=cfg.get("Cmd") or None,
        env=env or None,
        working_dir=cfg.get("WorkingDir") or None,
        user=cfg.get("User") or None,
    ), platform
