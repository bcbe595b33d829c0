"""The module's server with the demo image: the API tests' fixture, shared rather than copied."""

from tests.api.conftest import api

__all__ = ["api"]
