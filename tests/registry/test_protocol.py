"""The /v2 OCI distribution endpoints, request by request, against a real `hypemand serve`."""

from __future__ import annotations

import base64
import itertools
import json
import os
import socket
import time

import httpx
import jwt
import pytest

from hypemand.auth import load_secret
from hypemand.layout import DataLayout
from tests.registry.conftest import sha256
from tests.support.harness import ServerProcess

REPO = "tests/blobs"
EMPTY_CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'


def oci_error_codes(response: httpx.Response) -> list[str]:
    return [e["code"] for e in response.json()["errors"]]


def start_upload(registry: httpx.Client, repo: str = REPO) -> str:
    response = registry.post(f"/v2/{repo}/blobs/uploads/")
    assert response.status_code == 202, response.text
    assert response.headers["Docker-Upload-UUID"]
    location = response.headers["Location"]
    assert location.startswith(f"/v2/{repo}/blobs/uploads/")
    return location


def upload_end(response: httpx.Response) -> int:
    """The exclusive end offset an upload response reports in its ``Range`` header."""
    start, end = response.headers["Range"].split("-")
    assert start == "0"
    return int(end) + 1


# -- authentication ------------------------------------------------------------------------


def test_version_check_without_token_is_challenged(server: ServerProcess) -> None:
    response = httpx.get(f"{server.base_url}/v2/")
    assert response.status_code == 401
    assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'realm="{server.base_url}/v2/token"' in challenge
    assert oci_error_codes(response) == ["UNAUTHORIZED"]


@pytest.mark.parametrize("scheme", ["Bearer", "Basic"])
def test_version_check_with_the_api_token(server: ServerProcess, scheme: str) -> None:
    basic = base64.b64encode(f"me:{server.token}".encode()).decode()
    credential = server.token if scheme == "Bearer" else basic
    response = httpx.get(f"{server.base_url}/v2/", headers={"Authorization": f"{scheme} {credential}"})
    assert response.status_code == 200
    assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


def test_bad_token_is_refused_everywhere_under_v2(server: ServerProcess) -> None:
    headers = {"Authorization": "Bearer not-a-token"}
    for method, path in [("GET", "/v2/"), ("HEAD", f"/v2/{REPO}/blobs/sha256:{'0' * 64}"),
                         ("POST", f"/v2/{REPO}/blobs/uploads/"), ("PUT", f"/v2/{REPO}/manifests/latest")]:
        response = httpx.request(method, f"{server.base_url}{path}", headers=headers)
        assert response.status_code == 401, (method, path)
        assert "WWW-Authenticate" in response.headers


def test_token_endpoint_exchanges_basic_credentials(server: ServerProcess) -> None:
    anonymous = httpx.get(f"{server.base_url}/v2/token", params={"service": "hypemand"})
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic ")

    wrong = httpx.get(f"{server.base_url}/v2/token", auth=("me", "wrong"))
    assert wrong.status_code == 401

    response = httpx.get(f"{server.base_url}/v2/token", auth=("me", server.token),
                         params={"service": "hypemand", "scope": f"repository:{REPO}:pull,push"})
    assert response.status_code == 200
    body = response.json()
    assert body["token"] == body["access_token"]
    assert body["expires_in"] > 0
    follow_up = httpx.get(f"{server.base_url}/v2/", headers={"Authorization": f"Bearer {body['token']}"})
    assert follow_up.status_code == 200


# -- blobs ---------------------------------------------------------------------------------


def test_unknown_blob(registry: httpx.Client) -> None:
    digest = sha256(b"never uploaded")
    head = registry.head(f"/v2/{REPO}/blobs/{digest}")
    assert head.status_code == 404
    get = registry.get(f"/v2/{REPO}/blobs/{digest}")
    assert get.status_code == 404
    assert oci_error_codes(get) == ["BLOB_UNKNOWN"]


def test_monolithic_upload_in_the_post(registry: httpx.Client) -> None:
    data = os.urandom(200_000)
    digest = sha256(data)
    response = registry.post(f"/v2/{REPO}/blobs/uploads/", params={"digest": digest}, content=data,
                             headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 201, response.text
    assert response.headers["Docker-Content-Digest"] == digest
    assert response.headers["Location"] == f"/v2/{REPO}/blobs/{digest}"

    head = registry.head(f"/v2/{REPO}/blobs/{digest}")
    assert head.status_code == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert head.headers["Docker-Content-Digest"] == digest
    assert registry.get(f"/v2/{REPO}/blobs/{digest}").content == data
    # Blobs are shared by every repository of this server.
    assert registry.head(f"/v2/other/repo/blobs/{digest}").status_code == 200


@pytest.mark.parametrize("uploads_path", ["uploads/", "uploads"])
def test_post_then_put_with_the_whole_body(registry: httpx.Client, uploads_path: str) -> None:
    """What the TypeScript SDK's lib/push does (some clients leave out the trailing slash)."""
    data = os.urandom(70_000)
    digest = sha256(data)
    started = registry.post(f"/v2/{REPO}/blobs/{uploads_path}")
    assert started.status_code == 202
    location = started.headers["Location"]
    response = registry.put(location, params={"digest": digest}, content=data)
    assert response.status_code == 201, response.text
    assert registry.get(f"/v2/{REPO}/blobs/{digest}").content == data


def test_chunked_upload_with_content_range(server: ServerProcess, registry: httpx.Client) -> None:
    data = os.urandom(3 * 65536 + 777)
    digest = sha256(data)
    location = start_upload(registry)
    cuts = [0, 65536, 2 * 65536, 3 * 65536]

    for start, end in itertools.pairwise(cuts):
        response = registry.patch(location, content=data[start:end], headers={
            "Content-Range": f"{start}-{end - 1}", "Content-Type": "application/octet-stream"})
        assert response.status_code == 202, response.text
        assert upload_end(response) == end
        location = response.headers["Location"]

    # A chunk that does not continue where the upload ends is refused and changes nothing.
    gap = registry.patch(location, content=b"x" * 10, headers={"Content-Range": "999999-1000008"})
    assert gap.status_code == 416
    assert upload_end(gap) == cuts[-1]
    # So is a chunk whose body is shorter than its range says.
    short = registry.patch(location, content=b"y" * 5,
                           headers={"Content-Range": f"{cuts[-1]}-{cuts[-1] + 9}"})
    assert short.status_code in (400, 416)

    status = registry.get(location)
    assert status.status_code == 204
    assert upload_end(status) == cuts[-1]

    # The closing PUT carries the last chunk.
    response = registry.put(location, params={"digest": digest}, content=data[cuts[-1]:],
                            headers={"Content-Range": f"{cuts[-1]}-{len(data) - 1}"})
    assert response.status_code == 201, response.text
    assert registry.get(f"/v2/{REPO}/blobs/{digest}").content == data
    # The session is gone once committed.
    assert registry.get(location).status_code == 404
    assert not any((server.data_dir / "images" / "uploads").iterdir())


def test_streamed_patch_without_content_range(registry: httpx.Client) -> None:
    """What skopeo (containers/image) and docker do: one PATCH with the whole blob, chunked."""
    data = os.urandom(1_500_000)
    digest = sha256(data)
    location = start_upload(registry)

    def body() -> object:
        for i in range(0, len(data), 100_000):
            yield data[i:i + 100_000]

    response = registry.patch(location, content=body())  # type: ignore[arg-type]
    assert response.status_code == 202
    assert upload_end(response) == len(data)
    done = registry.put(response.headers["Location"], params={"digest": digest})
    assert done.status_code == 201
    assert registry.get(f"/v2/{REPO}/blobs/{digest}").content == data


def test_resume_after_an_interrupted_chunk(server: ServerProcess, registry: httpx.Client) -> None:
    data = os.urandom(300_000)
    digest = sha256(data)
    location = start_upload(registry)
    first = registry.patch(location, content=data[:100_000], headers={"Content-Range": "0-99999"})
    assert first.status_code == 202

    # The second chunk announces 200 000 bytes, sends 60 000 and the connection drops.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        head = (f"PATCH {location} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                f"Authorization: Bearer {server.token}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Range: 100000-299999\r\nContent-Length: 200000\r\n\r\n")
        sock.sendall(head.encode() + data[100_000:160_000])
        time.sleep(0.5)  # part of the test: some of the chunk arrives before the connection drops

    # The client asks where the upload stands and continues from there. Whatever of the broken
    # chunk arrived is kept; a 416 means the server was still winding the broken request down.
    deadline = time.monotonic() + 60
    while True:
        status = registry.get(location)
        assert status.status_code == 204
        offset = upload_end(status)
        assert 100_000 <= offset <= 160_000
        resumed = registry.patch(location, content=data[offset:],
                                 headers={"Content-Range": f"{offset}-{len(data) - 1}"})
        if resumed.status_code != 416 or time.monotonic() > deadline:
            break
    assert resumed.status_code == 202, resumed.text
    assert upload_end(resumed) == len(data)
    done = registry.put(location, params={"digest": digest})
    assert done.status_code == 201, done.text
    assert registry.get(f"/v2/{REPO}/blobs/{digest}").content == data


def test_digest_mismatch_commits_nothing(server: ServerProcess, registry: httpx.Client) -> None:
    data = os.urandom(50_000)
    claimed = sha256(b"something else")
    location = start_upload(registry)
    assert registry.patch(location, content=data).status_code == 202
    response = registry.put(location, params={"digest": claimed})
    assert response.status_code == 400
    assert oci_error_codes(response) == ["DIGEST_INVALID"]

    for digest in (claimed, sha256(data)):
        assert registry.head(f"/v2/{REPO}/blobs/{digest}").status_code == 404
        assert not (server.data_dir / "images" / "blobs" / "sha256" / digest[7:]).exists()
    # The upload is discarded, as the distribution registry does.
    assert oci_error_codes(registry.get(location)) == ["BLOB_UPLOAD_UNKNOWN"]
    assert not any((server.data_dir / "images" / "uploads").iterdir())

    monolithic = registry.post(f"/v2/{REPO}/blobs/uploads/", params={"digest": claimed}, content=data)
    assert monolithic.status_code == 400
    assert oci_error_codes(monolithic) == ["DIGEST_INVALID"]
    assert registry.head(f"/v2/{REPO}/blobs/{claimed}").status_code == 404


def test_cancel_upload(registry: httpx.Client) -> None:
    location = start_upload(registry)
    assert registry.patch(location, content=b"abc").status_code == 202
    assert registry.delete(location).status_code == 204
    assert registry.get(location).status_code == 404
    assert oci_error_codes(registry.patch(location, content=b"d")) == ["BLOB_UPLOAD_UNKNOWN"]


def test_cross_repository_mount(registry: httpx.Client) -> None:
    data = os.urandom(1000)
    digest = sha256(data)
    push_blob(registry, data)

    mounted = registry.post("/v2/elsewhere/app/blobs/uploads/", params={"mount": digest, "from": REPO})
    assert mounted.status_code == 201
    assert mounted.headers["Docker-Content-Digest"] == digest
    assert mounted.headers["Location"] == f"/v2/elsewhere/app/blobs/{digest}"

    missing = sha256(b"not here")
    fallback = registry.post("/v2/elsewhere/app/blobs/uploads/", params={"mount": missing, "from": REPO})
    assert fallback.status_code == 202
    assert fallback.headers["Location"].startswith("/v2/elsewhere/app/blobs/uploads/")


def test_invalid_repository_name(registry: httpx.Client) -> None:
    response = registry.post("/v2/Upper/Case/blobs/uploads/")
    assert response.status_code == 400
    assert oci_error_codes(response) == ["NAME_INVALID"]


# -- manifests -----------------------------------------------------------------------------


def push_blob(registry: httpx.Client, data: bytes, repo: str = REPO) -> dict[str, object]:
    digest = sha256(data)
    response = registry.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data)
    assert response.status_code == 201, response.text
    return {"digest": digest, "size": len(data)}


def test_manifest_referencing_a_missing_blob_is_refused(registry: httpx.Client) -> None:
    config = push_blob(registry, EMPTY_CONFIG)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256(b"absent layer"), "size": 12}],
    }).encode()
    response = registry.put(f"/v2/{REPO}/manifests/v1", content=manifest,
                            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert response.status_code == 400
    assert oci_error_codes(response) == ["MANIFEST_BLOB_UNKNOWN"]
    assert response.json()["errors"][0]["detail"]["digest"] == sha256(b"absent layer")
    assert registry.get(f"/v2/{REPO}/manifests/v1").status_code == 404
    assert oci_error_codes(registry.get(f"/v2/{REPO}/manifests/v1")) == ["MANIFEST_UNKNOWN"]


def test_manifest_that_is_not_json(registry: httpx.Client) -> None:
    response = registry.put(f"/v2/{REPO}/manifests/v1", content=b"{nope",
                            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert response.status_code == 400
    assert oci_error_codes(response) == ["MANIFEST_INVALID"]


def test_manifest_put_by_digest_must_match(registry: httpx.Client) -> None:
    config = push_blob(registry, EMPTY_CONFIG)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                           "layers": []}).encode()
    wrong = registry.put(f"/v2/{REPO}/manifests/{sha256(b'other')}", content=manifest,
                         headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert wrong.status_code == 400
    assert oci_error_codes(wrong) == ["DIGEST_INVALID"]


def test_registry_tokens_are_limited_to_their_repositories(server: ServerProcess) -> None:
    """Registry tokens (``repos`` + ``scope`` claims, as builders get) only reach their repos,
    and only ``scope=push`` may write."""
    secret = load_secret(DataLayout(server.data_dir))

    def client(scope: str) -> httpx.Client:
        claims = {"sub": "builder", "repos": ["builds/abc"], "scope": scope}
        token = jwt.encode(claims, secret, algorithm="HS256")
        return httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {token}"})

    data = b"layer bytes"
    with client("push") as pusher:
        assert pusher.post("/v2/builds/abc/blobs/uploads/", params={"digest": sha256(data)},
                           content=data).status_code == 201
        other = pusher.post("/v2/builds/other/blobs/uploads/")
        assert other.status_code == 403
        assert oci_error_codes(other) == ["DENIED"]
    with client("pull") as puller:
        assert puller.get(f"/v2/builds/abc/blobs/{sha256(data)}").content == data
        write = puller.post("/v2/builds/abc/blobs/uploads/")
        assert write.status_code == 403
        assert oci_error_codes(write) == ["DENIED"]


def test_tag_with_a_trailing_newline_is_refused_and_not_stored(server: ServerProcess,
                                                               registry: httpx.Client) -> None:
    """``$`` also matches before a final newline: names are checked as whole strings."""
    config = push_blob(registry, EMPTY_CONFIG)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                           "layers": []}).encode()
    response = registry.put(f"/v2/{REPO}/manifests/v1%0A", content=manifest,
                            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert response.status_code == 400
    assert oci_error_codes(response) == ["TAG_INVALID"]
    tags_dir = server.data_dir / "images" / "registry" / REPO / "_manifests" / "tags"
    assert not tags_dir.exists() or list(tags_dir.iterdir()) == []
