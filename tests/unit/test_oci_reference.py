"""Image references: docker://, oci:, oci-archive:, with Docker Hub's defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmrun.errors import UsageError
from vmrun.oci.reference import (
    ArchiveRef,
    LayoutRef,
    RegistryRef,
    is_image_reference,
    parse_reference,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(("text", "expected"), [
    ("docker://python", RegistryRef("docker.io", "library/python", "latest")),
    ("docker://python:3.12-slim", RegistryRef("docker.io", "library/python", "3.12-slim")),
    ("docker://user/app", RegistryRef("docker.io", "user/app", "latest")),
    ("docker://docker.io/debian:bookworm", RegistryRef("docker.io", "library/debian",
                                                       "bookworm")),
    ("docker://index.docker.io/library/debian", RegistryRef("docker.io", "library/debian",
                                                            "latest")),
    ("docker://quay.io/org/sub/app:v1", RegistryRef("quay.io", "org/sub/app", "v1")),
    ("docker://localhost/app", RegistryRef("localhost", "app", "latest")),
    ("docker://localhost:5000/a/b:t", RegistryRef("localhost:5000", "a/b", "t")),
    ("docker://127.0.0.1:5000/app", RegistryRef("127.0.0.1:5000", "app", "latest")),
    ("docker://[::1]:5000/app:x", RegistryRef("[::1]:5000", "app", "x")),
    (f"docker://alpine@{DIGEST}", RegistryRef("docker.io", "library/alpine", None, DIGEST)),
    (f"docker://ghcr.io/o/a:1.0@{DIGEST}", RegistryRef("ghcr.io", "o/a", "1.0", DIGEST)),
    ("docker://a__b/c-d.e_f", RegistryRef("docker.io", "a__b/c-d.e_f", "latest")),
])
def test_docker_references(text: str, expected: RegistryRef) -> None:
    assert parse_reference(text) == expected


def test_api_host_and_reference() -> None:
    hub = parse_reference("docker://busybox")
    assert isinstance(hub, RegistryRef)
    assert hub.api_host == "registry-1.docker.io" and hub.reference == "latest"
    pinned = parse_reference(f"docker://127.0.0.1:5000/x:tag@{DIGEST}")
    assert isinstance(pinned, RegistryRef)
    assert pinned.api_host == "127.0.0.1:5000" and pinned.reference == DIGEST
    assert str(pinned) == f"docker://127.0.0.1:5000/x:tag@{DIGEST}"


@pytest.mark.parametrize("text", [
    "docker://", "docker://UPPER/case", "docker://app:", "docker://app:-bad",
    "docker://app@sha256:abc", "docker://app@md5:" + "a" * 32, "docker://a//b",
    "docker://-a/b", "docker://a b", "docker://host:99999999/app", "docker://app:t@",
    "docker://a/b\x00c", "docker://" + "a" * 300, "docker://reg.io/", "docker://app:" + "t" * 129,
    "busybox", "debian:12", "oci:", "oci-archive:", "oci:dir:", "oci:dir:ba d",
])
def test_malformed_references_are_one_line_usage_errors(text: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_reference(text)
    assert "\n" not in str(raised.value) and str(raised.value).startswith("bad image reference")


def test_layout_and_archive_references() -> None:
    assert parse_reference("oci:./build/layout") == LayoutRef(Path("./build/layout"))
    assert parse_reference("oci:/srv/l:v2") == LayoutRef(Path("/srv/l"), "v2")
    assert parse_reference("oci:rel/dir:latest") == LayoutRef(Path("rel/dir"), "latest")
    assert parse_reference("oci-archive:img.tar") == ArchiveRef(Path("img.tar"))
    assert parse_reference("oci-archive:/t/img.tar:1.0") == ArchiveRef(Path("/t/img.tar"),
                                                                      "1.0")


def test_only_schemes_are_image_references() -> None:
    assert is_image_reference("docker://x") and is_image_reference("oci:d")
    assert is_image_reference("oci-archive:f")
    assert not is_image_reference("debian:12") and not is_image_reference("https://x/y.img")


_component = st.from_regex(r"[a-z0-9]{1,5}(?:[._-][a-z0-9]{1,4})?", fullmatch=True)


@given(registry=st.sampled_from(["quay.io", "localhost:5000", "127.0.0.1:1234", "r.example"]),
       path=st.lists(_component, min_size=1, max_size=3),
       tag=st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}",
                                              fullmatch=True)),
       digest=st.one_of(st.none(), st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True)))
def test_registry_references_round_trip(registry: str, path: list[str], tag: str | None,
                                        digest: str | None) -> None:
    repository = "/".join(path)
    text = f"docker://{registry}/{repository}" + (f":{tag}" if tag else "") + (
        f"@{digest}" if digest else "")
    ref = parse_reference(text)
    assert isinstance(ref, RegistryRef)
    assert (ref.registry, ref.repository, ref.digest) == (registry, repository, digest)
    assert ref.tag == (tag or (None if digest else "latest"))
    assert parse_reference(str(ref)) == ref


@given(st.text(max_size=80))
def test_any_text_parses_or_is_a_usage_error(text: str) -> None:
    for scheme in ("docker://", "oci:", "oci-archive:"):
        try:
            parse_reference(scheme + text)
        except UsageError as err:
            assert "\n" not in str(err)
