"""What ``BuildSpec`` refuses before anything is stored: an ``image_name`` a ``/v2`` push could
not make (repository grammar, tag grammar) or one of the server's own ``hypeman/`` images, and a
``base_image_digest`` that is not ``sha256:<64 hex>``. The API's 400s for them are in
tests/api/test_builds_api_unit.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hypemand.builds.models import MAX_IMAGE_NAME, BuildSpec, split_image_name


@pytest.mark.parametrize("name", [
    "app", "team/app", "team/app:v1", "builds/abc:V_1.2-rc", "docker.io/team/app:1", "a.b/c",
    "hypemanx/app", "team/hypeman/app", "library/hypeman", "hypeman",
])
def test_image_names_a_push_could_make_are_accepted(name: str) -> None:
    assert BuildSpec(image_name=name).image_name == name


@pytest.mark.parametrize(("name", "words"), [
    ("app:", "'' is not a tag"),
    ("app:bad tag!", "'bad tag!' is not a tag"),
    ("app:-x", "is not a tag"),
    ("app:" + "t" * 129, "is not a tag"),
    ("", "invalid repository name"),
    ("App", "invalid repository name"),
    ("team//app", "invalid repository name"),
    ("localhost:5000/app", "invalid repository name"),
    ("app@sha256:" + "a" * 64, "invalid repository name"),
    ("a" * 64, "64-character hex"),
    ("hypeman/builder", "server's own images"),
    ("hypeman/anything:v1", "server's own images"),
    ("docker.io/hypeman/builder", "server's own images"),
    ("index.docker.io/hypeman/debian:latest", "server's own images"),
    ("x" * (MAX_IMAGE_NAME + 1), "longer than"),
])
def test_image_names_that_would_fail_after_the_build_are_refused_first(name: str, words: str) -> None:
    with pytest.raises(ValidationError) as raised:
        BuildSpec(image_name=name)
    [error] = raised.value.errors()
    assert error["loc"] == ("image_name",) and words in error["msg"], error["msg"]


@pytest.mark.parametrize("digest", [
    "sha256:" + "0" * 63, "sha256:" + "0" * 65, "sha256:" + "F" * 64, "sha512:" + "0" * 64, "0" * 64,
    " sha256:" + "0" * 64, "sha256:" + "0" * 64 + "\n",
])
def test_a_base_image_digest_must_be_a_sha256_digest(digest: str) -> None:
    with pytest.raises(ValidationError) as raised:
        BuildSpec(base_image_digest=digest)
    [error] = raised.value.errors()
    assert error["loc"] == ("base_image_digest",) and "sha256:<64 lowercase hex>" in error["msg"]
    assert BuildSpec(base_image_digest="sha256:" + "0123456789abcdef" * 4).base_image_digest


@pytest.mark.parametrize(("name", "expected"), [
    ("builds/abc", ("builds/abc", "latest")),
    ("team/app:v1", ("team/app", "v1")),
    ("localhost:5000/app", ("localhost:5000/app", "latest")),
    ("localhost:5000/app:2", ("localhost:5000/app", "2")),
])
def test_image_names_split_into_repository_and_tag(name: str, expected: tuple[str, str]) -> None:
    assert split_image_name(name) == expected
