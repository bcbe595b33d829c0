"""Reference and platform normalisation, and the one name grammar of pulls and pushes (pure)."""

from __future__ import annotations

import pytest

from hypemand.errors import BadRequest
from hypemand.images import uploads
from hypemand.images.errors import InvalidName, InvalidPlatform
from hypemand.images.reference import (
    SHA256_DIGEST_RE,
    TAG_RE,
    check_registry_allowed,
    parse_platform,
    parse_reference,
    pushed_image_reference,
    validate_repository_path,
)
from hypemand.images.uploads import DistributionError, validate_repository

D = "sha256:" + "a" * 64

NORMALISED = [
    ("alpine", "docker.io/library/alpine:latest"),
    ("alpine:3.19", "docker.io/library/alpine:3.19"),
    ("nginx:alpine", "docker.io/library/nginx:alpine"),
    ("library/alpine", "docker.io/library/alpine:latest"),
    ("docker.io/alpine", "docker.io/library/alpine:latest"),
    ("index.docker.io/library/alpine:edge", "docker.io/library/alpine:edge"),
    ("bitnami/redis", "docker.io/bitnami/redis:latest"),
    ("docker.io/bitnami/redis:7", "docker.io/bitnami/redis:7"),
    ("localhost/app", "localhost/app:latest"),
    ("localhost:5000/team/app:v1", "localhost:5000/team/app:v1"),
    ("127.0.0.1:5000/a/b/c:x", "127.0.0.1:5000/a/b/c:x"),
    ("registry.example.com/team/app", "registry.example.com/team/app:latest"),
    ("registry.example.com:443/team/app:1.0", "registry.example.com:443/team/app:1.0"),
    (f"registry.example.com/team/app@{D}", f"registry.example.com/team/app@{D}"),
    (f"alpine@{D}", f"docker.io/library/alpine@{D}"),
    (f"alpine:3@{D}", f"docker.io/library/alpine:3@{D}"),
    ("my-app_x.y__z", "docker.io/library/my-app_x.y__z:latest"),
    ("[::1]:5000/app", "[::1]:5000/app:latest"),
    ("localhost:5000", "docker.io/library/localhost:5000"),
    ("Host/app", "Host/app:latest"),
]


@pytest.mark.parametrize(("text", "expected"), NORMALISED)
def test_normalisation(text: str, expected: str) -> None:
    assert str(parse_reference(text)) == expected


def test_parts() -> None:
    ref = parse_reference("localhost:5000/team/app:v1")
    assert (ref.domain, ref.path, ref.tag, ref.digest) == ("localhost:5000", "team/app", "v1", None)
    assert ref.repository == "localhost:5000/team/app" and ref.reference == "v1"
    pinned = parse_reference(f"alpine@{D}")
    assert pinned.is_digest and pinned.tag is None and pinned.reference == D


INVALID = [
    "", " alpine", "Alpine", "team/App", "a:b:c", "bad name", "alpine:", "alpine@", "alpine@sha256:abc",
    f"alpine@md5:{'a' * 64}", "alpine:-tag", "a" * 64, "-lead/app", "app//x", "app/", "/app",
    "alpine:" + "t" * 129, "x/" + "a" * 260, "ALPINE", "alpine@sha256:" + "A" * 64,
]


@pytest.mark.parametrize("text", INVALID)
def test_invalid_references(text: str) -> None:
    with pytest.raises(InvalidName) as err:
        parse_reference(text)
    assert err.value.code == "invalid_name" and err.value.status == 400


@pytest.mark.parametrize(("text", "expected"), [
    ("linux/amd64", "linux/amd64"), ("linux/arm64", "linux/arm64"), ("linux/x86_64", "linux/amd64"),
    ("linux/aarch64", "linux/arm64"), ("linux/arm64/v8", "linux/arm64"), ("Linux/AMD64", "linux/amd64"),
])
def test_platforms(text: str, expected: str) -> None:
    assert str(parse_platform(text)) == expected


@pytest.mark.parametrize("text", ["linux", "windows/amd64", "linux/riscv64", "linux/arm/v7", "", "linux//"])
def test_invalid_platforms(text: str) -> None:
    with pytest.raises(InvalidPlatform) as err:
        parse_platform(text)
    assert err.value.code == "invalid_platform"


# ---- one grammar for pulls and pushes --------------------------------------------------------


@pytest.mark.parametrize("text", ["alpine:t\u0430g", "alpine:\u00e9t\u00e9", "alpine:\u0661"])
def test_tags_are_ascii(text: str) -> None:
    """``\\w`` would let any Unicode letter or digit into a tag."""
    with pytest.raises(InvalidName):
        parse_reference(text)


REPOSITORY_PATHS_VALID = ["app", "team/app", "a.b/c", "a__b/c-d", "a---b", "x/y/z", "localhost/app"]
REPOSITORY_PATHS_INVALID = [
    "", "App", "app/", "/app", "app//x", "-app", "app-", "a..b", "a_-b", "app\n", "app ", "t\u00e9am/app",
    "a" * 64,  # an image id, never a name
    "a_b.c/app",  # the first component reads as a registry host, and is not a valid one
    "x/" + "a" * 250,  # too long once docker.io/ is added
]


@pytest.mark.parametrize("path", REPOSITORY_PATHS_VALID)
def test_repository_paths_valid_for_pull_and_push(path: str) -> None:
    assert validate_repository_path(path) == path
    assert validate_repository(path) == path
    parse_reference(f"{path}:v1")


@pytest.mark.parametrize("path", REPOSITORY_PATHS_INVALID)
def test_repository_paths_invalid_for_pull_and_push(path: str) -> None:
    """The /v2 endpoints refuse exactly the names a push could not turn into an image."""
    with pytest.raises(InvalidName):
        validate_repository_path(path)
    with pytest.raises(DistributionError) as info:
        validate_repository(path)
    assert info.value.code == "NAME_INVALID" and info.value.status == 400


def test_pushed_image_reference() -> None:
    assert str(pushed_image_reference("team/app", "v1")) == "docker.io/team/app:v1"
    assert str(pushed_image_reference("app", "v1")) == "docker.io/library/app:v1"
    assert str(pushed_image_reference("team/app", D)) == f"docker.io/team/app@{D}"
    for repository, reference in [("a" * 64, "v1"), ("team/app", "bad tag"), ("team/app", "sha256:abc")]:
        with pytest.raises(InvalidName):
            pushed_image_reference(repository, reference)


def test_the_upload_module_has_no_grammar_of_its_own() -> None:
    assert uploads.TAG_RE is TAG_RE
    assert uploads.SHA256_DIGEST_RE is SHA256_DIGEST_RE
    assert not hasattr(uploads, "REPOSITORY_RE")


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("127.0.0.1:5000/app:1", True),
        ("localhost:5000/app:1", True),
        ("[::1]:5000/app:1", True),
        ("docker.io/library/busybox:latest", False),
        ("busybox", False),  # docker.io by default: refused before any lookup
        ("ghcr.io/team/app:1", False),
    ],
)
def test_only_allowed_registries_are_pulled_from(name: str, allowed: bool) -> None:
    ref = parse_reference(name)
    check_registry_allowed(ref, None)  # no list: any registry
    local = frozenset({"127.0.0.1", "localhost", "[::1]"})
    if allowed:
        check_registry_allowed(ref, local)
    else:
        with pytest.raises(BadRequest) as refused:
            check_registry_allowed(ref, local)
        assert refused.value.code == "registry_not_allowed"
