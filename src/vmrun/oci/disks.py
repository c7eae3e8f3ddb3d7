"""VM disks in registries: vmrun's disk artifacts and KubeVirt containerDisks, as stored disks.

A disk artifact is an OCI image manifest whose config has media type DISK_CONFIG and
whose one layer is the disk image itself (media type DISK_LAYER_PREFIX + "qcow2" or
"raw"), annotated with its architecture, format and virtual size. A containerDisk is an
ordinary container image (KubeVirt's are built FROM scratch, with no Entrypoint or Cmd)
holding one /disk/*.qcow2 or /disk/*.img file: that file is streamed out of its layer,
never unpacked onto the host.

Pulled disks live under ``oci_root()/"disks"``::

    <key>.disk    the disk image, read-only (an artifact's is a hard link to its blob)
    <key>.json    where it came from, its format and sha256; written last
    <key>.lock    one install per key at a time
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from vmrun.cache import key_of, locked, staged
from vmrun.errors import ImageError, UnsafeImage, UsageError
from vmrun.images import formats
from vmrun.oci import layers as ly
from vmrun.oci import manifest as mf
from vmrun.qemu.arch import lookup_arch

ANNOTATION_ARCH = "org.vmrun.disk.architecture"
ANNOTATION_FORMAT = "org.vmrun.disk.format"
ANNOTATION_VIRTUAL_SIZE = "org.vmrun.disk.virtual-size"
TITLE = "org.opencontainers.image.title"
CREATED = "org.opencontainers.image.created"
DISK_FORMATS = ("qcow2", "raw")
CONTAINER_DISK_DIR = "disk"
CONTAINER_DISK_SUFFIXES = (".qcow2", ".img")
RECIPE = "oci-disk-1"
_CONFIG_LIMIT = 64 << 10
_CHUNK = 1 << 20


# -- building artifacts (pure) --


@dataclass(frozen=True)
class Artifact:
    """One disk as an OCI artifact: its config blob, manifest, and what they point to."""

    config: bytes
    config_descriptor: mf.Descriptor
    layer: mf.Descriptor
    manifest: bytes
    platform: mf.Platform

    @property
    def digest(self) -> str:
        return f"sha256:{hashlib.sha256(self.manifest).hexdigest()}"


def _descriptor_json(descriptor: mf.Descriptor) -> dict[str, Any]:
    raw: dict[str, Any] = {"mediaType": descriptor.media_type, "digest": descriptor.digest,
                           "size": descriptor.size}
    if descriptor.annotations:
        raw["annotations"] = dict(descriptor.annotations)
    return raw


def _canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def platform_of(arch: str) -> mf.Platform:
    """The OCI platform vmrun's ARCH is published as (the first it runs)."""
    architecture, variant = mf.PLATFORMS[lookup_arch(arch).name][0]
    return mf.Platform("linux", architecture, variant)


def build_artifact(*, disk_digest: str, disk_size: int, fmt: str, arch: str,
                   virtual_size: int, created: str) -> Artifact:
    """The manifest and config that publish a disk (sha256 DISK_DIGEST, DISK_SIZE bytes)."""
    if fmt not in DISK_FORMATS:
        raise UsageError(f"a {fmt} image cannot be pushed", hint="push qcow2 or raw disks")
    name = lookup_arch(arch).name
    platform = platform_of(name)
    annotations = {ANNOTATION_ARCH: name, ANNOTATION_FORMAT: fmt,
                   ANNOTATION_VIRTUAL_SIZE: str(virtual_size)}
    config = _canonical({"architecture": platform.architecture, "os": platform.os,
                         **({"variant": platform.variant} if platform.variant else {}),
                         "format": fmt, "virtualSize": virtual_size, "vmrunArch": name})
    config_descriptor = mf.Descriptor(mf.DISK_CONFIG,
                                      f"sha256:{hashlib.sha256(config).hexdigest()}",
                                      len(config))
    layer = mf.Descriptor(mf.DISK_LAYER_PREFIX + fmt, disk_digest, disk_size,
                          annotations={TITLE: f"disk.{fmt}"})
    manifest = _canonical({
        "schemaVersion": 2, "mediaType": mf.OCI_MANIFEST, "artifactType": mf.DISK_ARTIFACT,
        "config": _descriptor_json(config_descriptor), "layers": [_descriptor_json(layer)],
        "annotations": {**annotations, CREATED: created},
    })
    return Artifact(config, config_descriptor, layer, manifest, platform)


def build_index(artifacts: list[Artifact]) -> bytes:
    """An OCI index of ARTIFACTS, one per platform."""
    entries = []
    for artifact in artifacts:
        platform: dict[str, str] = {"architecture": artifact.platform.architecture,
                                    "os": artifact.platform.os}
        if artifact.platform.variant:
            platform["variant"] = artifact.platform.variant
        entries.append({"mediaType": mf.OCI_MANIFEST, "artifactType": mf.DISK_ARTIFACT,
                        "digest": artifact.digest, "size": len(artifact.manifest),
                        "platform": platform})
    return _canonical({"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": entries})


# -- pulled disks --


@dataclass(frozen=True)
class Origin:
    """Where a pulled disk came from."""

    reference: str
    digest: str  # what the reference resolved to (an index or a manifest)
    manifest_digest: str  # the platform's manifest
    arch: str  # vmrun's name


@dataclass(frozen=True)
class PulledDisk:
    """A disk image from a registry (or OCI layout), stored read-only by content."""

    path: Path
    format: str  # qcow2 or raw
    sha256: str  # hex, of the disk file
    origin: Origin
    kind: str  # "artifact" or "containerdisk"
    size: int
    created: str = ""


def disk_key(digest: str, arch: str) -> str:
    return key_of(RECIPE, digest, lookup_arch(arch).name)


def disks_dir(root: Path) -> Path:
    return root / "disks"


def cached_disk(root: Path, key: str) -> PulledDisk | None:
    """The disk stored under KEY, if its record and its image are both there."""
    directory = disks_dir(root)
    try:
        record = json.loads((directory / f"{key}.json").read_text())
        origin = Origin(str(record["reference"]), str(record["digest"]),
                        str(record["manifest_digest"]), str(record["arch"]))
        disk = PulledDisk(directory / f"{key}.disk", str(record["format"]),
                          str(record["sha256"]), origin, str(record["kind"]),
                          int(record["size"]), str(record.get("created", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return disk if disk.path.is_file() else None


def _record(root: Path, key: str, disk: PulledDisk) -> None:
    origin = disk.origin
    record = {"reference": origin.reference, "digest": origin.digest,
              "manifest_digest": origin.manifest_digest, "arch": origin.arch,
              "format": disk.format, "sha256": disk.sha256, "kind": disk.kind,
              "size": disk.size, "created": disk.created, "recipe": RECIPE}
    with staged(disks_dir(root) / f"{key}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _checked_format(path: Path, declared: str | None, what: str) -> str:
    """The header check every foreign image gets; the format must be one vmrun boots and,
    when DECLARED, the one the header shows (raw bytes with a qcow2 header are refused)."""
    info = formats.check_foreign_image(path)
    found = str(info.format)
    if found not in DISK_FORMATS:
        raise UnsafeImage(f"{what}: a {found} image, not qcow2 or raw")
    if declared is not None and found != declared:
        raise UnsafeImage(f"{what}: declared {declared}, but its header is {found}")
    return found


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def install_artifact(root: Path, origin: Origin, manifest: mf.Manifest, config: bytes,
                     blob: Path) -> PulledDisk:
    """Check a disk artifact's config and its fetched, verified disk BLOB, then store it."""
    what = origin.reference
    layer = manifest.layers[0]
    declared = layer.media_type.removeprefix(mf.DISK_LAYER_PREFIX)
    if declared not in DISK_FORMATS:
        raise ImageError(f"{what}: disk layer of format {declared!r}, not qcow2 or raw")
    _check_config(config, origin.arch, what)
    key = disk_key(origin.digest, origin.arch)
    directory = disks_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    with locked(directory / f"{key}.lock"):
        if (cached := cached_disk(root, key)) is not None:
            return cached
        try:
            fmt = _checked_format(blob, declared, what)
        except UnsafeImage:
            blob.unlink(missing_ok=True)  # hostile bytes stay nowhere
            raise
        target = directory / f"{key}.disk"
        target.unlink(missing_ok=True)
        os.link(blob, target)
        disk = PulledDisk(target, fmt, layer.hex, origin, "artifact", layer.size, _now())
        _record(root, key, disk)
        return disk


def _check_config(config: bytes, arch: str, what: str) -> None:
    if len(config) > _CONFIG_LIMIT:
        raise ImageError(f"{what}: disk config over {_CONFIG_LIMIT} bytes")
    try:
        document = json.loads(config)
    except ValueError:
        raise ImageError(f"{what}: the disk config is not JSON") from None
    if not isinstance(document, dict):
        raise ImageError(f"{what}: the disk config is not a JSON object")
    declared = document.get("architecture")
    allowed = {p.architecture for p in mf.platforms_for(arch)}
    if isinstance(declared, str) and declared and declared not in allowed:
        raise UsageError(f"{what} is a disk for {declared}, not {lookup_arch(arch).name}",
                         hint="choose --arch to match")


# -- containerDisks --


@dataclass(frozen=True)
class Found:
    """The disk file a containerDisk holds: its name, and where its bytes are."""

    name: str
    layer: ly.Layer
    ordinal: int
    size: int


def find_container_disk(layers: list[ly.Layer], what: str) -> Found | None:
    """The one /disk/*.qcow2 or /disk/*.img file of the flattened LAYERS (whiteouts
    applied, diff_ids checked), or None when there is none; ImageError for several."""
    tree = ly.merge(layers)
    node = tree.root.children.get(CONTAINER_DISK_DIR)
    if not isinstance(node, ly.Dir):
        return None
    found = [(name, child) for name, child in sorted(node.children.items())
             if isinstance(child, ly.Inode) and child.kind == "file"
             and name.endswith(CONTAINER_DISK_SUFFIXES) and child.source is not None]
    if not found:
        return None
    if len(found) > 1:
        raise ImageError(f"{what}: several disks in /disk: "
                         + ", ".join(name for name, _ in found))
    name, inode = found[0]
    assert inode.source is not None
    index, ordinal = inode.source
    return Found(name, layers[index], ordinal, inode.size)


def install_container_disk(root: Path, origin: Origin, found: Found) -> PulledDisk:
    """Stream FOUND out of its layer into the store, then check and store it."""
    what = f"{origin.reference} /disk/{found.name}"
    key = disk_key(origin.digest, origin.arch)
    directory = disks_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    with locked(directory / f"{key}.lock"):
        if (cached := cached_disk(root, key)) is not None:
            return cached
        part = directory / f"{key}.part"
        try:
            sha256 = _extract(found, part)
            declared = "qcow2" if found.name.endswith(".qcow2") else None
            fmt = _checked_format(part, declared, what)
            os.chmod(part, 0o444)
            target = directory / f"{key}.disk"
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)
        disk = PulledDisk(target, fmt, sha256, origin, "containerdisk", found.size, _now())
        _record(root, key, disk)
        return disk


def _extract(found: Found, part: Path) -> str:
    """Write FOUND's bytes to PART (holes for zero blocks); their sha256."""
    with ly.open_member(found.layer, found.ordinal, found.size) as data:
        return _sparse_write(data, part, found.size)


def _sparse_write(data: IO[bytes], part: Path, size: int) -> str:
    hasher = hashlib.sha256()
    zero = bytes(_CHUNK)
    done = 0
    with open(part, "wb") as out:
        while chunk := data.read(_CHUNK):
            hasher.update(chunk)
            done += len(chunk)
            if chunk == (zero if len(chunk) == _CHUNK else bytes(len(chunk))):
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
        out.truncate(done)
        out.flush()
        os.fsync(out.fileno())
    if done != size:
        raise ImageError(f"{part.name}: got {done} of {size} bytes")
    return hasher.hexdigest()


def remove_disk(path: Path) -> None:
    """Delete a stored disk: its record first (it is then no longer found), then its data."""
    for leftover in (path.with_suffix(".json"), path):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
