"""The server answers health without a token, and refuses the API without a valid one."""

from __future__ import annotations

import httpx
import jwt
import pytest
from hypeman import AuthenticationError, Hypeman, PermissionDeniedError

from hypemand.auth import load_secret
from tests.conftest import ServerProcess


def test_health_through_the_sdk(sdk: Hypeman) -> None:
    assert sdk.health.check().status == "ok"


def test_unknown_route_has_the_error_shape(server: ServerProcess) -> None:
    response = httpx.get(f"{server.base_url}/no-such-thing",
                         headers={"Authorization": f"Bearer {server.token}"})
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


@pytest.mark.parametrize("token", ["not-a-jwt", "eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl"])
def test_bad_token_is_refused_with_401(server: ServerProcess, token: str) -> None:
    client = Hypeman(base_url=server.base_url, api_key=token, max_retries=0,
                     _strict_response_validation=True)
    with pytest.raises(AuthenticationError) as info:
        client.images.list()
    assert info.value.status_code == 401
    assert info.value.body["code"] == "unauthorized"  # type: ignore[index]


def test_registry_tokens_do_not_open_the_json_api(server: ServerProcess) -> None:
    registry_token = jwt.encode({"sub": "builder", "repos": ["builds/x"], "scope": "push"},
                                load_secret(server.data_dir), algorithm="HS256")
    client = Hypeman(base_url=server.base_url, api_key=registry_token, max_retries=0,
                     _strict_response_validation=True)
    with pytest.raises(PermissionDeniedError) as info:
        client.images.list()
    assert info.value.body["code"] == "forbidden"  # type: ignore[index]
