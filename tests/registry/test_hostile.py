"""/v2 and the image API under hostile input, against one real `hypemand serve` per module.

Three tables: who may do what (the scope matrix of API and registry tokens over every pull and
push operation), malformed requests (each must be a 4xx in the registry's error shape, never a
500 or a reset connection, and must leave nothing behind), and the tag list's paging rules.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from hypemand.auth import load_secret, mint_token
from hypemand.layout import DataLayout
from tests.registry.conftest import sha256
from tests.support.harness import Harness, ServerProcess

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
AS_MANIFEST = {"Content-Type": OCI_MANIFEST}
CONFIG = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
CONFIG_DIGEST = sha256(CONFIG)
LAYER = b"not really a tar, never unpacked: only its presence matters here"
LAYER_DIGEST = sha256(LAYER)


def manifest(config_digest: str = CONFIG_DIGEST, **extra: Any) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(CONFIG)},
        "layers": [], **extra,
    }).encode()


MANIFEST = manifest()
MANIFEST_DIGEST = sha256(MANIFEST)
# Same image content, other bytes: what an attacker would try to move a tag to.
OTHER_MANIFEST = manifest(annotations={"attacker": "was here"})


def index(platform: object) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": MANIFEST_DIGEST, "size": len(MANIFEST), "platform": platform},
    ]}).encode()


# -- one server for the module --------------------------------------------------------------


@dataclass
class Probe:
    """The server, an admin client (API token without a permissions claim) and its data dir."""

    server: ServerProcess
    admin: httpx.Client
    secret: str = field(init=False)

    def __post_init__(self) -> None:
        self.secret = load_secret(DataLayout(self.server.data_dir))

    @property
    def uploads_dir(self) -> Path:
        return self.server.data_dir / "images" / "uploads"

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.server.base_url, timeout=60,
                            headers={"Authorization": f"Bearer {token}"})

    def open_uploads(self) -> list[str]:
        return sorted(p.name for p in self.uploads_dir.iterdir())

    def push_blob(self, repo: str, data: bytes) -> None:
        response = self.admin.post(f"/v2/{repo}/blobs/uploads/", params={"digest": sha256(data)},
                                   content=data)
        assert response.status_code == 201, response.text

    def push_manifest(self, repo: str, reference: str, body: bytes = MANIFEST,
                      media_type: str = OCI_MANIFEST) -> None:
        response = self.admin.put(f"/v2/{repo}/manifests/{reference}", content=body,
                                  headers={"Content-Type": media_type})
        assert response.status_code == 201, response.text

    def start_upload(self, repo: str) -> str:
        response = self.admin.post(f"/v2/{repo}/blobs/uploads/")
        assert response.status_code == 202, response.text
        return str(response.headers["Location"])

    def assert_no_traceback(self) -> None:
        assert "Traceback" not in self.server.log(), self.server.log()[-4000:]


@pytest.fixture(scope="module")
def probe(module_harness: Harness) -> Iterator[Probe]:
    server = module_harness.start()
    with httpx.Client(base_url=server.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {server.token}"}) as admin:
        probe = Probe(server, admin)
        probe.push_blob("probe/app", CONFIG)
        probe.push_blob("probe/app", LAYER)
        probe.push_manifest("probe/app", "v1")
        yield probe


def oci_codes(response: httpx.Response) -> list[str]:
    return [e["code"] for e in response.json()["errors"]]


# -- 1. the scope matrix ----------------------------------------------------------------------

REPO = "probe/app"


@dataclass(frozen=True)
class Operation:
    """One /v2 request on ``probe/app``; ``run`` sends it with ``client`` (the token under test),
    using ``probe.admin`` for any setup it needs, and returns the answer."""

    name: str
    kind: str  # "pull" or "push"
    ok_status: int
    run: Callable[[Probe, httpx.Client], httpx.Response]


def _on_admin_upload(send: Callable[[httpx.Client, str], httpx.Response]) -> Callable[
        [Probe, httpx.Client], httpx.Response]:
    def run(probe: Probe, client: httpx.Client) -> httpx.Response:
        return send(client, probe.start_upload(REPO))
    return run


OPERATIONS = [
    Operation("HEAD blob", "pull", 200, lambda p, c: c.head(f"/v2/{REPO}/blobs/{CONFIG_DIGEST}")),
    Operation("GET blob", "pull", 200, lambda p, c: c.get(f"/v2/{REPO}/blobs/{CONFIG_DIGEST}")),
    Operation("GET manifest", "pull", 200, lambda p, c: c.get(f"/v2/{REPO}/manifests/v1")),
    Operation("HEAD manifest", "pull", 200, lambda p, c: c.head(f"/v2/{REPO}/manifests/{MANIFEST_DIGEST}")),
    Operation("GET tags/list", "pull", 200, lambda p, c: c.get(f"/v2/{REPO}/tags/list")),
    Operation("POST upload", "push", 202, lambda p, c: c.post(f"/v2/{REPO}/blobs/uploads/")),
    Operation("POST monolithic upload", "push", 201, lambda p, c: c.post(
        f"/v2/{REPO}/blobs/uploads/", params={"digest": LAYER_DIGEST}, content=LAYER)),
    Operation("POST cross-repo mount", "push", 201, lambda p, c: c.post(
        f"/v2/{REPO}/blobs/uploads/", params={"mount": LAYER_DIGEST, "from": "elsewhere/repo"})),
    Operation("PATCH chunk", "push", 202, _on_admin_upload(lambda c, loc: c.patch(loc, content=b"chunk"))),
    Operation("PUT closing chunk", "push", 201, _on_admin_upload(
        lambda c, loc: c.put(loc, params={"digest": LAYER_DIGEST}, content=LAYER))),
    Operation("GET upload status", "push", 204, _on_admin_upload(lambda c, loc: c.get(loc))),
    Operation("DELETE upload", "push", 204, _on_admin_upload(lambda c, loc: c.delete(loc))),
    Operation("PUT manifest", "push", 201, lambda p, c: c.put(
        f"/v2/{REPO}/manifests/v1", content=MANIFEST, headers={"Content-Type": OCI_MANIFEST})),
]


@dataclass(frozen=True)
class Grant:
    name: str
    claims: dict[str, Any] | None  # None: an API token minted without a permissions claim
    may: frozenset[str]


BOTH = frozenset({"pull", "push"})
PULL = frozenset({"pull"})
PUSH = frozenset({"push"})
NOTHING: frozenset[str] = frozenset()

GRANTS = [
    Grant("api token without permissions claim", None, BOTH),
    Grant("api token ['*']", {"permissions": ["*"]}, BOTH),
    Grant("api token ['image:read']", {"permissions": ["image:read"]}, PULL),
    Grant("api token ['image:write']", {"permissions": ["image:write"]}, PUSH),
    Grant("api token []", {"permissions": []}, NOTHING),
    Grant("api token ['instance:write']", {"permissions": ["instance:write"]}, NOTHING),
    # A string is not a list of scopes (``in`` on a string would be a substring test).
    Grant("api token permissions as a string", {"permissions": "image:read image:write"}, NOTHING),
    Grant("registry token push probe/app", {"repos": [REPO], "scope": "push"}, BOTH),
    Grant("registry token pull probe/app", {"repos": [REPO], "scope": "pull"}, PULL),
    Grant("registry token push probe/app-long", {"repos": ["probe/app-long"], "scope": "push"}, NOTHING),
    Grant("registry token push other repos", {"repos": ["probe", "app", "probe/app/x"], "scope": "push"},
          NOTHING),
    Grant("registry token repos as a string containing the repo",
          {"repos": "probe/app-long", "scope": "push"}, NOTHING),
    Grant("registry token repos as the repo's name as a string", {"repos": REPO, "scope": "push"}, NOTHING),
    Grant("registry token without a scope", {"repos": [REPO]}, NOTHING),
    Grant("registry token with an unknown scope", {"repos": [REPO], "scope": "admin"}, NOTHING),
]


def token_for(probe: Probe, grant: Grant) -> str:
    if grant.claims is None:
        return mint_token(probe.secret, "matrix")
    return jwt.encode({"sub": "matrix", **grant.claims}, probe.secret, algorithm="HS256")


@pytest.mark.parametrize("grant", GRANTS, ids=[g.name for g in GRANTS])
def test_scope_matrix(probe: Probe, grant: Grant) -> None:
    """Every pull and push operation, with every kind of token: allowed ones succeed, the others
    are 403 DENIED in the registry's error shape. Whatever happens, the tag keeps its digest."""
    with probe.client(token_for(probe, grant)) as client:
        for operation in OPERATIONS:
            response = operation.run(probe, client)
            label = f"{grant.name}: {operation.name}"
            if operation.kind in grant.may:
                assert response.status_code == operation.ok_status, (label, response.text)
            else:
                assert response.status_code == 403, (label, response.status_code, response.text)
                assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
                if operation.name.startswith("HEAD"):
                    continue  # a HEAD answer has no body
                assert oci_codes(response) == ["DENIED"], label
            _cancel_leftover_uploads(probe)
        # Moving the tag to other bytes is the attack the issue reported: it works only with push.
        moved = client.put(f"/v2/{REPO}/manifests/v1", content=OTHER_MANIFEST,
                           headers={"Content-Type": OCI_MANIFEST})
        assert moved.status_code == (201 if "push" in grant.may else 403), moved.text
    # Put the tag back (a no-op when the push was refused) and check where it points.
    probe.push_manifest(REPO, "v1")
    served = probe.admin.head(f"/v2/{REPO}/manifests/v1")
    assert served.headers["Docker-Content-Digest"] == MANIFEST_DIGEST
    assert probe.open_uploads() == []
    probe.assert_no_traceback()


def _cancel_leftover_uploads(probe: Probe) -> None:
    """Uploads the admin opened for an operation that the token under test did not finish."""
    for upload_id in probe.open_uploads():
        assert probe.admin.delete(f"/v2/{REPO}/blobs/uploads/{upload_id}").status_code == 204


def test_a_read_only_token_cannot_change_any_image(probe: Probe) -> None:
    """Through /images and through /v2: create, tag, delete, push over an existing tag."""
    name = "docker.io/probe/app:v1"
    encoded = name.replace("/", "%2F")
    before = probe.admin.get(f"/images/{encoded}")
    assert before.status_code == 200, before.text
    reader = mint_token(probe.secret, "reader", permissions=["image:read"])
    with probe.client(reader) as client:
        assert client.get(f"/images/{encoded}").status_code == 200
        attempts = [
            client.post("/images", json={"name": "docker.io/probe/app:v2"}),
            client.post(f"/images/{encoded}/tag", json={"target": "docker.io/probe/app:stolen"}),
            client.delete(f"/images/{encoded}"),
            client.put(f"/v2/{REPO}/manifests/v1", content=OTHER_MANIFEST, headers=AS_MANIFEST),
            client.put(f"/v2/{REPO}/manifests/v9", content=OTHER_MANIFEST, headers=AS_MANIFEST),
            client.put("/v2/probe/brand-new/manifests/v1", content=MANIFEST, headers=AS_MANIFEST),
        ]
    for attempt in attempts:
        assert attempt.status_code == 403, (attempt.request.method, attempt.request.url, attempt.text)
    after = probe.admin.get(f"/images/{encoded}")
    assert after.status_code == 200
    assert after.json()["digest"] == before.json()["digest"]
    for missing in ("docker.io/probe/app:stolen", "docker.io/probe/app:v9", "docker.io/probe/brand-new:v1"):
        assert probe.admin.get(f"/images/{missing.replace('/', '%2F')}").status_code == 404, missing
    assert probe.admin.get(f"/v2/{REPO}/manifests/v9").status_code == 404
    assert probe.admin.get("/v2/probe/brand-new/manifests/v1").status_code == 404


# -- 2. and 3. malformed requests: a 4xx, never a 500, and nothing left behind ----------------


@dataclass(frozen=True)
class Hostile:
    name: str
    method: str
    path: str
    status: int
    code: str
    params: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    # (repository, tag) that must not exist afterwards, and (repository, tag, digest) that must
    # still point where it did.
    not_stored: tuple[str, str] | None = None
    unchanged: tuple[str, str, str] | None = None


HEX64 = "0123456789abcdef" * 4

HOSTILE = [
    Hostile("manifest nested 200000 levels deep", "PUT", "/v2/probe/deep/manifests/v1", 400,
            "MANIFEST_INVALID", body=b"[" * 200_000 + b"]" * 200_000, headers={"Content-Type": OCI_MANIFEST},
            not_stored=("probe/deep", "v1")),
    Hostile("manifest object nested deep in an unknown field", "PUT", "/v2/probe/deep/manifests/v2", 400,
            "MANIFEST_INVALID", body=MANIFEST[:-1] + b', "x": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
            headers={"Content-Type": OCI_MANIFEST}, not_stored=("probe/deep", "v2")),
    Hostile("index platform as a string", "PUT", "/v2/probe/index/manifests/v1", 400, "MANIFEST_INVALID",
            body=index("linux/amd64"), headers={"Content-Type": OCI_INDEX}, not_stored=("probe/index", "v1")),
    Hostile("index platform os and architecture as numbers", "PUT", "/v2/probe/index/manifests/v2", 400,
            "MANIFEST_INVALID", body=index({"os": 5, "architecture": 6}), headers={"Content-Type": OCI_INDEX},
            not_stored=("probe/index", "v2")),
    Hostile("index with a broken platform over an existing tag", "PUT", f"/v2/{REPO}/manifests/v1", 400,
            "MANIFEST_INVALID", body=index(["linux", "amd64"]), headers={"Content-Type": OCI_INDEX},
            unchanged=(REPO, "v1", MANIFEST_DIGEST)),
    Hostile("layer size as a string", "PUT", "/v2/probe/shape/manifests/v1", 400, "MANIFEST_INVALID",
            body=json.dumps({**json.loads(MANIFEST), "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": LAYER_DIGEST, "size": "12"}]}
            ).encode(), headers={"Content-Type": OCI_MANIFEST}, not_stored=("probe/shape", "v1")),
    Hostile("descriptor digest climbing out of the blob store", "PUT", "/v2/probe/shape/manifests/v2", 400,
            "MANIFEST_INVALID", body=manifest("sha256:../../../etc/passwd"),
            headers={"Content-Type": OCI_MANIFEST}, not_stored=("probe/shape", "v2")),
    Hostile("manifest that is a JSON list", "PUT", "/v2/probe/shape/manifests/v3", 400, "MANIFEST_INVALID",
            body=b"[]", headers={"Content-Type": OCI_MANIFEST}, not_stored=("probe/shape", "v3")),
    Hostile("schemaVersion true", "PUT", "/v2/probe/shape/manifests/v4", 400, "MANIFEST_INVALID",
            body=MANIFEST.replace(b'"schemaVersion": 2', b'"schemaVersion": true'),
            headers={"Content-Type": OCI_MANIFEST}, not_stored=("probe/shape", "v4")),
    Hostile("unknown manifest media type", "PUT", "/v2/probe/shape/manifests/v5", 400, "MANIFEST_INVALID",
            body=MANIFEST.replace(OCI_MANIFEST.encode(), b"text/plain"), not_stored=("probe/shape", "v5")),
    Hostile("repository named like an image id", "PUT", f"/v2/{HEX64}/manifests/v1", 400, "NAME_INVALID",
            body=MANIFEST, headers={"Content-Type": OCI_MANIFEST}, not_stored=(HEX64, "v1")),
    Hostile("repository whose host part is not a host", "PUT", "/v2/a_b.c/app/manifests/v1", 400,
            "NAME_INVALID", body=MANIFEST, headers={"Content-Type": OCI_MANIFEST},
            not_stored=("a_b.c/app", "v1")),
    # 252 characters: within the registry's 255, but docker.io/ makes the image name 262 long.
    Hostile("repository too long once named as an image", "PUT", f"/v2/x/{'a' * 250}/manifests/v1", 400,
            "NAME_INVALID", body=MANIFEST, headers={"Content-Type": OCI_MANIFEST},
            not_stored=(f"x/{'a' * 250}", "v1")),
    Hostile("upload with a digest climbing out", "POST", "/v2/probe/up/blobs/uploads/", 400, "DIGEST_INVALID",
            params={"digest": "sha256:../../x"}, body=b"data"),
    Hostile("upload with a wrong digest", "POST", "/v2/probe/up/blobs/uploads/", 400, "DIGEST_INVALID",
            params={"digest": sha256(b"something else")}, body=b"data"),
    Hostile("monolithic upload whose range does not start at 0", "POST", "/v2/probe/up/blobs/uploads/", 416,
            "BLOB_UPLOAD_INVALID", params={"digest": sha256(b"data")}, body=b"data",
            headers={"Content-Range": "5-8"}),
    Hostile("mount of a malformed digest", "POST", "/v2/probe/up/blobs/uploads/", 400, "DIGEST_INVALID",
            params={"mount": "../../x", "from": REPO}),
    Hostile("upload to an image-id repository", "POST", f"/v2/{HEX64}/blobs/uploads/", 400, "NAME_INVALID"),
    Hostile("blob of an invalid repository", "GET", f"/v2/{HEX64}/blobs/{CONFIG_DIGEST}", 400,
            "NAME_INVALID"),
    Hostile("tags/list n=-1", "GET", f"/v2/{REPO}/tags/list", 400, "PAGINATION_NUMBER_INVALID",
            params={"n": "-1"}),
    Hostile("tags/list n=abc", "GET", f"/v2/{REPO}/tags/list", 400, "PAGINATION_NUMBER_INVALID",
            params={"n": "abc"}),
    Hostile("tags/list n=1.5", "GET", f"/v2/{REPO}/tags/list", 400, "PAGINATION_NUMBER_INVALID",
            params={"n": "1.5"}),
    Hostile("tags/list n as a Unicode digit", "GET", f"/v2/{REPO}/tags/list", 400,
            "PAGINATION_NUMBER_INVALID", params={"n": "\u0661"}),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[h.name for h in HOSTILE])
def test_hostile_requests(probe: Probe, case: Hostile) -> None:
    response = probe.admin.request(case.method, case.path, params=case.params, content=case.body,
                                   headers=case.headers)
    assert response.status_code == case.status, response.text
    assert oci_codes(response) == [case.code], response.text
    assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert probe.open_uploads() == [], "a refused request left an upload directory"
    if case.not_stored is not None:
        repository, tag = case.not_stored
        assert probe.admin.get(f"/v2/{repository}/manifests/{tag}").status_code in (400, 404)
        assert not (probe.server.data_dir / "images" / "registry" / repository).exists()
        image = f"{repository}:{tag}".replace("/", "%2F")
        assert probe.admin.get(f"/images/{image}").status_code in (400, 404)
    if case.unchanged is not None:
        repository, tag, digest = case.unchanged
        served = probe.admin.get(f"/v2/{repository}/manifests/{tag}")
        assert served.status_code == 200
        assert served.headers["Docker-Content-Digest"] == digest
    probe.assert_no_traceback()


# -- the tag list's paging (OCI distribution spec: n, last, Link) -----------------------------

TAGS_REPO = "probe/tags"


@pytest.fixture(scope="module")
def tagged(probe: Probe) -> list[str]:
    tags = ["a", "b", "c"]
    for tag in tags:
        probe.push_manifest(TAGS_REPO, tag)
    return tags


@pytest.mark.parametrize(("params", "expected", "link"), [
    ({}, ["a", "b", "c"], None),
    ({"n": "0"}, [], None),
    ({"n": "2"}, ["a", "b"], f'</v2/{TAGS_REPO}/tags/list?n=2&last=b>; rel="next"'),
    ({"n": "3"}, ["a", "b", "c"], None),
    ({"n": "99999999999999999999999"}, ["a", "b", "c"], None),
    ({"last": "a"}, ["b", "c"], None),
    ({"last": "b", "n": "1"}, ["c"], None),
    ({"last": "a", "n": "1"}, ["b"], f'</v2/{TAGS_REPO}/tags/list?n=1&last=b>; rel="next"'),
    ({"last": "c"}, [], None),
    ({"last": "0"}, ["a", "b", "c"], None),  # "0" sorts before every letter
])
def test_tag_list_paging(probe: Probe, tagged: list[str], params: dict[str, str], expected: list[str],
                         link: str | None) -> None:
    response = probe.admin.get(f"/v2/{TAGS_REPO}/tags/list", params=params)
    assert response.status_code == 200, response.text
    assert response.json() == {"name": TAGS_REPO, "tags": expected}
    assert response.headers.get("Link") == link
    if link is not None:
        following = probe.admin.get(link[1:link.index(">")])
        assert following.status_code == 200
        assert following.json()["tags"][0] > expected[-1]
