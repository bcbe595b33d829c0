"""Reference and platform normalisation (pure)."""

from __future__ import annotations

import pytest

from hypemand.images.errors import InvalidName, InvalidPlatform
from hypemand.images.reference import parse_platform, parse_reference

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
