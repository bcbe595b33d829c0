"""The Dockerfile's base references (``hypemand.builds.dockerfile``): what a build needs from the
image store, after the Dockerfile's own lexical rules, ARG defaults and stage names."""

from __future__ import annotations

import pytest

from hypemand.builds.dockerfile import InvalidDockerfile, base_images, instructions, platform_args

DIGEST = "sha256:" + "ab" * 32


def refused(text: str, *words: str) -> str:
    with pytest.raises(InvalidDockerfile) as caught:
        base_images(text)
    assert caught.value.status == 400 and caught.value.code == "invalid_dockerfile"
    message = str(caught.value)
    for word in words:
        assert word in message, (word, message)
    return message


def test_a_bare_name_is_normalised_like_a_pull() -> None:
    assert base_images("FROM busybox\nRUN true\n") == ["docker.io/library/busybox:latest"]
    assert base_images(f"from localhost:5000/team/app@{DIGEST}") == [f"localhost:5000/team/app@{DIGEST}"]


def test_stages_scratch_and_repeats_are_not_images_and_order_is_first_use() -> None:
    text = """
FROM --platform=linux/amd64 golang:1.22 AS Build
RUN go build
FROM scratch AS empty
FROM build AS again
FROM BUILD
FROM alpine:3.19
COPY --from=build /app /app
FROM golang:1.22
FROM docker.io/library/alpine:3.19
"""
    assert base_images(text) == ["docker.io/library/golang:1.22", "docker.io/library/alpine:3.19"]


def test_a_stage_named_only_later_is_an_image_for_from() -> None:
    assert base_images("FROM app\nFROM alpine AS app\nFROM app\n") == [
        "docker.io/library/app:latest", "docker.io/library/alpine:latest"]


def test_copy_from_and_mount_from_name_images_unless_they_are_stages() -> None:
    text = """
FROM alpine AS base
RUN --mount=type=cache,target=/root/.cache,from=base --network=none true
RUN --mount=type=bind,from=redis:7,source=/usr/local/bin,target=/r cp /r/redis-server /
COPY --from=0 /etc/os-release /a
COPY --from=later /x /x
COPY --chown=1:1 --from=nginx:1.25 /etc/nginx /etc/nginx
COPY --from=nginx:1.25 /usr/share/nginx /www
RUN echo --mount=from=notaflag
FROM busybox AS later
"""
    assert base_images(text) == ["docker.io/library/alpine:latest", "docker.io/library/redis:7",
                                 "docker.io/library/nginx:1.25", "docker.io/library/busybox:latest"]


def test_args_before_the_first_from_are_substituted() -> None:
    text = """
ARG REGISTRY=localhost:5000
ARG NAME="team/app"
ARG TAG
ARG REF=${REGISTRY}/$NAME
FROM ${REF}:${TAG:-v1}
FROM $NAME${TAG:+-never}
FROM busybox:${UNSET-1.36}${TAG+-never}
ARG EMPTY=
FROM alpine${EMPTY:+:never}${EMPTY-:3.19}
"""
    assert base_images(text) == ["localhost:5000/team/app:v1", "docker.io/team/app:latest",
                                 "docker.io/library/busybox:1.36", "docker.io/library/alpine:3.19"]


def test_automatic_platform_args_are_the_hosts() -> None:
    arch = platform_args()["TARGETARCH"]
    assert base_images("FROM --platform=$BUILDPLATFORM busybox:${TARGETARCH}") == [
        f"docker.io/library/busybox:{arch}"]


def test_copy_from_sees_the_args_of_its_stage() -> None:
    text = """
ARG SIDE=redis:7
FROM alpine
ARG SIDE
ARG OTHER=nginx
COPY --from=$SIDE /a /a
COPY --from=${OTHER} /b /b
"""
    assert base_images(text)[1:] == ["docker.io/library/redis:7", "docker.io/library/nginx:latest"]


@pytest.mark.parametrize(("text", "words"), [
    ("ARG BASE\nFROM $BASE\n", ("line 2", "$BASE", "no default")),
    ("FROM ${NOWHERE}:1\n", ("line 1", "$NOWHERE", "no ARG declares")),
    ("FROM alpine\nARG LATE=busybox\nFROM $LATE\n", ("line 3", "$LATE")),  # a stage's ARG is not global
    ("FROM alpine\nCOPY --from=$SIDE /a /a\n", ("line 2", "$SIDE")),
    ("ARG A=1\nFROM busybox:${A/1/2}\n", ("unsupported substitution",)),
    ("FROM busybox:${A\n", ("without its",)),
])
def test_a_variable_without_a_value_is_refused_naming_it(text: str, words: tuple[str, ...]) -> None:
    refused(text, *words)


@pytest.mark.parametrize(("text", "words"), [
    ("", ("no FROM",)),
    ("# only a comment\nRUN true\n", ("no FROM",)),
    ("FROM\n", ("FROM takes",)),
    ("FROM alpine builder\n", ("FROM takes",)),
    ("FROM alpine AS\n", ("FROM takes",)),
    ("FROM Alpine:3\n", ("line 1", "'Alpine:3'", "not an image reference")),
    ("FROM alpine\nCOPY --from=Bad/Name /a /a\n", ("line 2", "'Bad/Name'")),
    ("ARG E=\nFROM $E\n", ("names no image",)),
    ('ARG A="x\nFROM alpine\n', ("ARG",)),
])
def test_malformed_dockerfiles_are_refused(text: str, words: tuple[str, ...]) -> None:
    refused(text, *words)


def test_continuations_comments_case_and_line_endings() -> None:
    text = ("\ufefffRoM \\\r\n"
            "  # a comment inside the instruction\r\n"
            "\r\n"
            "   docker.io/library/alpine:3.19 \\  \r\n"
            "   as   Base\r\n"
            "# FROM commented:out\r\n"
            "  FROM\tbusybox\r\n"
            "RUN echo FROM not:this \\\n"
            "FROM not:this either\n")
    steps = instructions(text)
    assert [(s.line, s.keyword) for s in steps] == [(1, "from"), (7, "from"), (8, "run")]
    assert steps[0].args.split() == ["docker.io/library/alpine:3.19", "as", "Base"]
    assert base_images(text) == ["docker.io/library/alpine:3.19", "docker.io/library/busybox:latest"]


def test_the_escape_directive_changes_the_continuation_character() -> None:
    text = ("# syntax=docker/dockerfile:1\n"
            "#  Escape = `\n"
            "FROM `\n"
            "  busybox\n"
            "WORKDIR C:\\\n"
            "FROM alpine\n")
    assert base_images(text) == ["docker.io/library/busybox:latest", "docker.io/library/alpine:latest"]
    # With the default escape, the backslash joins the WORKDIR with the second FROM.
    default = text.replace("#  Escape = `\n", "").replace("FROM `\n  busybox", "FROM busybox")
    assert base_images(default) == ["docker.io/library/busybox:latest"]


@pytest.mark.parametrize("preamble", ["\n", "# a comment\n", "# unknown=x\n", "RUN true\n"])
def test_a_directive_counts_only_before_anything_else(preamble: str) -> None:
    text = preamble + "# escape=`\nFROM busybox\nWORKDIR C:\\\nFROM alpine\n"
    assert base_images(text) == ["docker.io/library/busybox:latest"]


def test_an_escape_directive_must_be_backslash_or_backtick() -> None:
    refused("# escape=x\nFROM busybox\n", "line 1", "escape")
