"""Domain errors. Each carries the API error code and the HTTP status it maps to.

The domain raises these; only ``api/errors.py`` turns them into responses.
"""

from __future__ import annotations


class DomainError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class BadRequest(DomainError):
    status = 400
    code = "bad_request"


class NotFound(DomainError):
    status = 404
    code = "not_found"


class Conflict(DomainError):
    status = 409
    code = "conflict"


class InvalidState(DomainError):
    status = 409
    code = "invalid_state"


class NotImplementedByBackend(DomainError):
    status = 501
    code = "not_implemented"


class DependencyMissing(DomainError):
    status = 500
    code = "dependency_missing"


class InsufficientStorage(DomainError):
    status = 507
    code = "insufficient_storage"
