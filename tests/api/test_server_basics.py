"""The server answers health without a token, and refuses the API without a valid one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import jwt
import pytest
from hypeman import AuthenticationError, Hypeman, PermissionDeniedError

from hypemand.auth import load_secret, mint_token
from hypemand.config import Settings
from hypemand.layout import DataLayout
from tests.support.harness import ServerProcess, server_environment


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
                                load_secret(DataLayout(server.data_dir)), algorithm="HS256")
    client = Hypeman(base_url=server.base_url, api_key=registry_token, max_retries=0,
                     _strict_response_validation=True)
    with pytest.raises(PermissionDeniedError) as info:
        client.images.list()
    assert info.value.body["code"] == "Forbidden"  # type: ignore[index]


def test_scoped_tokens_reach_only_their_scopes(server: ServerProcess) -> None:
    secret = load_secret(DataLayout(server.data_dir))
    reader = Hypeman(base_url=server.base_url, max_retries=0, _strict_response_validation=True,
                     api_key=mint_token(secret, "reader", permissions=["image:read"]))
    assert reader.images.list() == []
    with pytest.raises(PermissionDeniedError) as info:
        reader.images.create(name="docker.io/library/alpine:latest")
    assert info.value.body == {"code": "Forbidden", "message": "missing required scope: image:write"}
    with pytest.raises(PermissionDeniedError):
        reader.images.delete("docker.io/library/alpine:latest")
    wildcard = Hypeman(base_url=server.base_url, max_retries=0, _strict_response_validation=True,
                       api_key=mint_token(secret, "root", permissions=["*"]))
    assert wildcard.images.list() == []


def test_missing_qemu_stops_the_server_with_a_clear_message(tmp_path: Path) -> None:
    env = dict(server_environment(None), HYPEMAND_QEMU=str(tmp_path / "no-qemu-here"))
    result = subprocess.run(
        [sys.executable, "-m", "hypemand.cli.main", "serve", "--port", "1", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "no-qemu-here" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_data_dir_is_private_to_the_server(server: ServerProcess) -> None:
    assert server.data_dir.stat().st_mode & 0o777 == 0o700
    assert (server.data_dir / "jwt-secret").stat().st_mode & 0o777 == 0o600


def test_settings_read_the_environment_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every knob comes from the environment through Settings, typed; a bad value is refused there."""
    monkeypatch.setenv("HYPEMAND_IMAGE_FORMAT", "erofs")
    monkeypatch.setenv("HYPEMAND_MAX_CONCURRENT_PULLS", "3")
    monkeypatch.setenv("HYPEMAND_ACCEL", "TCG")
    monkeypatch.setenv("JWT_SECRET", "s3cret")
    settings = Settings.load(tmp_path)
    assert (settings.image_format, settings.max_concurrent_pulls, settings.accel) == ("erofs", 3, "tcg")
    assert load_secret(settings.layout, settings.jwt_secret) == "s3cret"
    monkeypatch.setenv("HYPEMAND_IMAGE_FORMAT", "zip")
    with pytest.raises(ValueError, match="image_format"):
        Settings.load(tmp_path)
