"""Errors of the images domain, each with the API code the spec fixes."""

from __future__ import annotations

from hypemand.errors import BadRequest, Conflict, DomainError, InvalidState, NotFound


class InvalidName(BadRequest):
    code = "invalid_name"


class InvalidPlatform(BadRequest):
    code = "invalid_platform"


class InvalidTags(BadRequest):
    code = "invalid_field"


class ImageNotFound(NotFound):
    code = "not_found"


class PlatformNotAvailable(NotFound):
    """The platform is well formed but the image's index does not publish it."""

    code = "not_found"


class ImageNotReady(InvalidState):
    code = "image_not_ready"


class ImagePullFailed(ImageNotReady):
    """The image's pull or conversion failed; the message says why. ``POST /images`` of the
    same name starts it again. Same code as ImageNotReady (the reference's), so clients that
    only know that one still understand it."""


class CredentialConflict(Conflict):
    """A pull of the same content is running with other borrowed credentials."""

    code = "conflict"


class DigestInvalid(BadRequest):
    """Content does not hash to the digest it was announced with."""

    code = "digest_invalid"


class RegistryError(DomainError):
    """The remote registry failed or could not be reached."""

    status = 502
    code = "registry_error"


class RateLimited(DomainError):
    status = 429
    code = "rate_limited"


class UnsafeLayer(DomainError):
    """A layer tarball tried to write outside the image root, or is malformed."""

    status = 422
    code = "unsafe_layer"


class ConversionFailed(DomainError):
    code = "conversion_failed"
