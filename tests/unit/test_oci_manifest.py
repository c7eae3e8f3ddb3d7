"""Manifests, indexes and configs: media types, schema 1 refused, the platform choice."""

from __future__ import annotations

import json

import pytest

from tests import ocitools as ot
from vmrun.errors import ImageError, UsageError
from vmrun.oci import manifest as mf

DIGEST = "sha256:" + "12" * 32


def index_of(*platforms: str) -> mf.Index:
    entries = []
    for number, platform in enumerate(platforms):
        architecture, _, variant = platform.partition("/")
        described = {"os": "linux", "architecture": architecture,
                     **({"variant": variant} if variant else {})}
        entries.append({"mediaType": mf.OCI_MANIFEST, "digest": f"sha256:{number:064x}",
                        "size": 100 + number, "platform": described})
    data = json.dumps({"schemaVersion": 2, "manifests": entries}).encode()
    parsed = mf.parse_manifest(data, mf.OCI_INDEX, "test")
    assert isinstance(parsed, mf.Index)
    return parsed


@pytest.mark.parametrize(("arch", "platform"), [
    ("x86_64", "amd64"), ("amd64", "amd64"), ("aarch64", "arm64/v8"), ("arm64", "arm64/v8"),
    ("armv7", "arm/v7"), ("i386", "386"), ("s390x", "s390x"), ("ppc64le", "ppc64le"),
    ("riscv64", "riscv64"),
])
def test_every_vmrun_arch_picks_its_platform(arch: str, platform: str) -> None:
    index = index_of("amd64", "arm/v6", "arm/v7", "arm64/v8", "386", "s390x", "ppc64le",
                     "riscv64")
    chosen = mf.choose(index, arch, "test")
    assert str(chosen.platform) == f"linux/{platform}"


def test_arm64_without_variant_and_armv6_is_not_armv7() -> None:
    assert str(mf.choose(index_of("amd64", "arm64"), "aarch64", "t").platform) == "linux/arm64"
    with pytest.raises(UsageError) as raised:
        mf.choose(index_of("amd64", "arm/v6", "s390x"), "armv7", "docker://x")
    assert "docker://x has no image for armv7 (linux/arm/v7)" in str(raised.value)
    assert raised.value.hint == "it has: linux/amd64, linux/arm/v6, linux/s390x"


def test_attestation_entries_are_not_platforms() -> None:
    index = index_of("amd64")
    odd = mf.Descriptor(mf.OCI_MANIFEST, DIGEST, 5, mf.Platform("unknown", "unknown"))
    with pytest.raises(UsageError) as raised:
        mf.choose(mf.Index((*index.manifests, odd)), "s390x", "t")
    assert raised.value.hint == "it has: linux/amd64"


def test_media_types() -> None:
    image = ot.make_image([([ot.file("a", "x")], "gzip")], docker=True)
    assert mf.media_type_of(image.manifest, None, "t") == mf.DOCKER_MANIFEST
    bare = json.dumps({"schemaVersion": 2, "layers": [], "config": {}}).encode()
    assert mf.media_type_of(bare, f"{mf.OCI_MANIFEST}; charset=x", "t") == mf.OCI_MANIFEST
    assert mf.media_type_of(bare, None, "t") == mf.OCI_MANIFEST
    parsed = mf.parse_manifest(image.manifest, mf.DOCKER_MANIFEST, "t")
    assert isinstance(parsed, mf.Manifest)
    assert parsed.layers[0].media_type == mf.DOCKER_LAYER_GZIP


@pytest.mark.parametrize(("data", "declared", "message"), [
    (b'{"schemaVersion": 1, "fsLayers": []}', None, "schema 1"),
    (b'{"schemaVersion": 2}', DOCKER_SCHEMA1 := mf.DOCKER_SCHEMA1[1], "schema 1"),
    (b'{"mediaType": "application/vnd.example+json"}', None, "not an image manifest"),
    (b"[1, 2]", None, "not a JSON object"),
    (b"{", None, "not valid JSON"),
])
def test_unreadable_manifests(data: bytes, declared: str | None, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        mf.media_type_of(data, declared, "t")


@pytest.mark.parametrize("layer", [
    {"mediaType": "application/vnd.example.blob", "digest": DIGEST, "size": 1},
    {"mediaType": mf.OCI_LAYER, "digest": "sha256:short", "size": 1},
    {"mediaType": mf.OCI_LAYER, "digest": DIGEST, "size": -1},
    {"mediaType": mf.OCI_LAYER, "digest": DIGEST, "size": True},
    "not a descriptor",
])
def test_bad_layer_descriptors(layer: object) -> None:
    data = json.dumps({"config": {"mediaType": mf.OCI_CONFIG, "digest": DIGEST, "size": 2},
                       "layers": [layer]}).encode()
    with pytest.raises(ImageError):
        mf.parse_manifest(data, mf.OCI_MANIFEST, "t")


def test_config_fields() -> None:
    data = json.dumps({
        "architecture": "arm64", "os": "linux",
        "config": {"Env": ["A=1"], "Entrypoint": ["/bin/sh", "-c"], "Cmd": None,
                   "WorkingDir": "/src", "User": "1000:1000"},
        "rootfs": {"type": "layers", "diff_ids": [DIGEST]},
    }).encode()
    config = mf.parse_config(data, "t")
    assert config == mf.ImageConfig("arm64", "linux", (DIGEST,), ("A=1",), ("/bin/sh", "-c"),
                                    None, "/src", "1000:1000")
    mf.check_platform(config, "aarch64", "t")
    with pytest.raises(UsageError, match="built for linux/arm64, not x86_64"):
        mf.check_platform(config, "x86_64", "t")
    with pytest.raises(ImageError, match="diff_ids"):
        mf.parse_config(b'{"rootfs": {"diff_ids": ["md5:1"]}}', "t")
