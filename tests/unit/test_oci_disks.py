"""Disk artifacts as vmrun builds them: manifests and indexes that its own parser reads."""

from __future__ import annotations

import json

import pytest

from vmrun.errors import ImageError, UsageError
from vmrun.oci import disks
from vmrun.oci import manifest as mf
from vmrun.oci.push import Source, parse_source

DIGEST = "sha256:" + "ab" * 32


def artifact(arch: str = "x86_64", fmt: str = "qcow2") -> disks.Artifact:
    return disks.build_artifact(disk_digest=DIGEST, disk_size=123, fmt=fmt, arch=arch,
                                virtual_size=1 << 30, created="2024-01-01T00:00:00+00:00")


def test_an_artifact_is_a_disk_manifest_with_its_annotations() -> None:
    built = artifact()
    parsed = mf.parse_manifest(built.manifest, mf.OCI_MANIFEST, "test")
    assert isinstance(parsed, mf.Manifest) and parsed.is_disk
    assert parsed.config == built.config_descriptor
    assert parsed.layers == (mf.Descriptor(mf.DISK_LAYER_PREFIX + "qcow2", DIGEST, 123),)
    document = json.loads(built.manifest)
    assert document["artifactType"] == mf.DISK_ARTIFACT
    assert document["annotations"][disks.ANNOTATION_VIRTUAL_SIZE] == str(1 << 30)
    assert json.loads(built.config)["architecture"] == "amd64"


def test_the_index_names_each_platform_and_choose_finds_it() -> None:
    built = {arch: artifact(arch) for arch in ("x86_64", "aarch64", "riscv64")}
    index = mf.parse_manifest(disks.build_index(list(built.values())), mf.OCI_INDEX, "test")
    assert isinstance(index, mf.Index)
    for arch, one in built.items():
        assert mf.choose(index, arch, "test").digest == one.digest


def test_a_disk_manifest_with_other_layers_is_refused() -> None:
    document = json.loads(artifact().manifest)
    document["layers"].append(dict(document["layers"][0]))
    with pytest.raises(ImageError, match="exactly one layer"):
        mf.parse_manifest(json.dumps(document).encode(), mf.OCI_MANIFEST, "test")
    document["layers"] = [{**document["layers"][0], "mediaType": mf.OCI_LAYER_GZIP}]
    with pytest.raises(ImageError, match="exactly one layer"):
        mf.parse_manifest(json.dumps(document).encode(), mf.OCI_MANIFEST, "test")


def test_only_qcow2_and_raw_are_pushed() -> None:
    with pytest.raises(UsageError, match="a vmdk image cannot be pushed"):
        artifact(fmt="vmdk")


def test_push_sources_name_an_architecture_after_equals() -> None:
    assert parse_source("runner") == Source("runner")
    assert parse_source("runner=arm64") == Source("runner", "aarch64")
    for bad in ("=x86_64", "runner="):
        with pytest.raises(UsageError):
            parse_source(bad)
