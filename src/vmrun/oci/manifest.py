"""OCI and Docker schema2 manifests, indexes and image configs; the platform choice."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from vmrun.errors import ImageError, UsageError
from vmrun.qemu.arch import lookup_arch

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v1+prettyjws")

# vmrun's VM disk artifacts: one layer, the disk image itself, of media type
# DISK_LAYER_PREFIX + its format; the config is a small JSON document (see vmrun.oci.disks).
DISK_ARTIFACT = "application/vnd.vmrun.disk.v1"
DISK_CONFIG = "application/vnd.vmrun.disk.config.v1+json"
DISK_LAYER_PREFIX = "application/vnd.vmrun.disk.layer.v1."

MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)
# What a registry is asked for, best first.
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
# Layer media type -> compression ("" for none).
LAYER_COMPRESSION = {
    OCI_LAYER: "", OCI_LAYER_GZIP: "gzip", OCI_LAYER_ZSTD: "zstd",
    DOCKER_LAYER_GZIP: "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "",
}
MANIFEST_LIMIT = 4 << 20
CONFIG_LIMIT = 16 << 20
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_LAYERS = 256

# vmrun's architecture -> the OCI platforms that run on it, best first (architecture, variant).
PLATFORMS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "x86_64": (("amd64", None),),
    "aarch64": (("arm64", "v8"), ("arm64", None)),
    "armv7": (("arm", "v7"),),
    "i386": (("386", None),),
    "s390x": (("s390x", None),),
    "ppc64le": (("ppc64le", None),),
    "riscv64": (("riscv64", None),),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return text + (f"/{self.variant}" if self.variant else "")


@dataclass(frozen=True)
class Descriptor:
    """A pointer to a blob: what it is, its digest and its exact size."""

    media_type: str
    digest: str  # "sha256:HEX"
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @property
    def is_disk(self) -> bool:
        """Whether this is a vmrun VM disk artifact rather than a container image."""
        return self.config.media_type == DISK_CONFIG


@dataclass(frozen=True)
class Index:
    manifests: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageConfig:
    """What a container runtime takes from the image config (the `config` object)."""

    architecture: str
    os: str
    diff_ids: tuple[str, ...]
    env: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    working_dir: str = ""
    user: str = ""


def _load(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError as err:
        raise ImageError(f"{what} is not valid JSON: {err}") from None
    if not isinstance(document, dict):
        raise ImageError(f"{what} is not a JSON object")
    return document


def parse_descriptor(raw: object, what: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise ImageError(f"{what}: a descriptor is not an object")
    media_type, digest, size = raw.get("mediaType"), raw.get("digest"), raw.get("size")
    if not isinstance(media_type, str) or not isinstance(digest, str) or not _DIGEST.fullmatch(
            digest):
        raise ImageError(f"{what}: a descriptor lacks a media type or a sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{what}: descriptor {digest} has no valid size")
    platform = raw.get("platform")
    annotations = raw.get("annotations")
    return Descriptor(
        media_type, digest, size,
        _platform(platform) if isinstance(platform, dict) else None,
        {str(k): str(v) for k, v in annotations.items()} if isinstance(annotations, dict) else {},
    )


def _platform(raw: dict[str, Any]) -> Platform:
    variant = raw.get("variant")
    return Platform(str(raw.get("os", "")), str(raw.get("architecture", "")),
                    str(variant) if variant else None)


def media_type_of(data: bytes, declared: str | None, what: str) -> str:
    """The manifest's media type: its own mediaType field, else DECLARED (Content-Type)."""
    document = _load(data, what)
    own = document.get("mediaType")
    media_type = own if isinstance(own, str) and own else (declared or "").split(";")[0].strip()
    if not media_type and "manifests" in document:
        media_type = OCI_INDEX
    elif not media_type and "layers" in document:
        media_type = OCI_MANIFEST
    if media_type in DOCKER_SCHEMA1 or document.get("schemaVersion") == 1:
        raise ImageError(f"{what} is a Docker schema 1 manifest, which vmrun does not read",
                         hint="push the image again with a current docker or skopeo")
    if media_type not in MANIFESTS + INDEXES:
        raise ImageError(f"{what} has media type {media_type!r}, not an image manifest or index")
    return media_type


def parse_manifest(data: bytes, media_type: str, what: str) -> Manifest | Index:
    """DATA (a manifest or an index of MEDIA_TYPE) as a typed value."""
    document = _load(data, what)
    if media_type in INDEXES:
        entries = document.get("manifests")
        if not isinstance(entries, list):
            raise ImageError(f"{what}: an index without a manifests list")
        return Index(tuple(parse_descriptor(e, what) for e in entries))
    layers = document.get("layers")
    if not isinstance(layers, list) or len(layers) > _MAX_LAYERS:
        raise ImageError(f"{what}: no layers list, or more than {_MAX_LAYERS} layers")
    config = parse_descriptor(document.get("config"), what)
    descriptors = tuple(parse_descriptor(layer, what) for layer in layers)
    if config.media_type == DISK_CONFIG:
        if len(descriptors) != 1 or not descriptors[0].media_type.startswith(
                DISK_LAYER_PREFIX):
            raise ImageError(f"{what}: a vmrun disk artifact needs exactly one layer of "
                             f"media type {DISK_LAYER_PREFIX}FORMAT")
        return Manifest(config, descriptors)
    for layer in descriptors:
        if layer.media_type not in LAYER_COMPRESSION:
            raise ImageError(f"{what}: layer {layer.digest} has media type "
                             f"{layer.media_type!r}, not a tar layer vmrun can read")
    return Manifest(config, descriptors)


def platforms_for(arch: str) -> tuple[Platform, ...]:
    """The OCI platforms that vmrun's ARCH (any of its spellings) runs, best first."""
    name = lookup_arch(arch).name
    return tuple(Platform("linux", a, v) for a, v in PLATFORMS[name])


def choose(index: Index, arch: str, what: str) -> Descriptor:
    """The manifest of INDEX for ARCH; UsageError listing what the index has otherwise."""
    images = [d for d in index.manifests if d.media_type in MANIFESTS and d.platform is not None]
    for wanted in platforms_for(arch):
        for descriptor in images:
            have = descriptor.platform
            assert have is not None
            if (have.os, have.architecture) != (wanted.os, wanted.architecture):
                continue
            if wanted.variant is None or have.variant == wanted.variant:
                return descriptor
    offered = sorted({str(d.platform) for d in images if d.platform is not None
                      and d.platform.os != "unknown"})
    raise UsageError(
        f"{what} has no image for {arch} ({platforms_for(arch)[0]})",
        hint=f"it has: {', '.join(offered) or 'no platforms'}",
    )


def _strings(value: object) -> tuple[str, ...] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def parse_config(data: bytes, what: str) -> ImageConfig:
    """The image config blob DATA, as far as running the image needs it."""
    document = _load(data, what)
    rootfs = document.get("rootfs")
    diff_ids = _strings(rootfs.get("diff_ids")) if isinstance(rootfs, dict) else None
    if diff_ids is None or not all(_DIGEST.fullmatch(d) for d in diff_ids):
        raise ImageError(f"{what}: no rootfs.diff_ids of sha256 digests")
    config = document.get("config")
    if not isinstance(config, dict):
        config = {}
    working_dir, user = config.get("WorkingDir"), config.get("User")
    return ImageConfig(
        architecture=str(document.get("architecture", "")),
        os=str(document.get("os", "")),
        diff_ids=diff_ids,
        env=_strings(config.get("Env")) or (),
        entrypoint=_strings(config.get("Entrypoint")),
        cmd=_strings(config.get("Cmd")),
        working_dir=working_dir if isinstance(working_dir, str) else "",
        user=user if isinstance(user, str) else "",
    )


def check_platform(config: ImageConfig, arch: str, what: str) -> None:
    """Refuse an image whose config names another architecture than ARCH runs."""
    allowed = {p.architecture for p in platforms_for(arch)}
    if config.architecture and config.architecture not in allowed:
        raise UsageError(f"{what} is built for {config.os}/{config.architecture}, not {arch}",
                         hint="choose --arch to match, or an image (or index) for this one")
