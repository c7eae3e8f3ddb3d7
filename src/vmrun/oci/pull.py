"""From an image reference to a cached root image: resolve, choose the platform, fetch, convert.

Layout under ``cache_dir()/"oci"``::

    blobs/sha256/<hex>     manifests' blobs (configs, layers), verified, read-only
    tmp/<hex>.lock|.part   one fetch per blob at a time; a dead fetch's part is resumed
    roots/<key>.sqfs       the root image of (resolved digest, architecture, RECIPE)
    roots/<key>.json       what it was made from and the image config; written last
    roots/<key>.lock       one conversion per key at a time
    disks/<key>.disk|json  VM disks (artifacts, containerDisks): see vmrun.oci.disks
    prune.lock             held shared by pulls, exclusively by prune (vmrun.oci.store)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmrun.cache import cache_dir, key_of, locked, staged
from vmrun.errors import ImageError, UsageError
from vmrun.oci import disks
from vmrun.oci import manifest as mf
from vmrun.oci.disks import PulledDisk
from vmrun.oci.layers import Layer
from vmrun.oci.reference import ImageRef, RegistryRef, parse_reference
from vmrun.oci.rootfs import COMPRESSOR, COMPRESSOR_OPTIONS, FORMAT, build_rootfs
from vmrun.oci.sources import Source, open_source
from vmrun.progress import Progress
from vmrun.qemu.arch import lookup_arch

# Part of every root image's key: a change to how images are built makes new ones.
RECIPE = f"oci-rootfs-1:{FORMAT}:{COMPRESSOR}:{COMPRESSOR_OPTIONS}"
_MAX_NESTING = 2
PRUNE_LOCK = "prune.lock"


@dataclass(frozen=True)
class RootImage:
    """A guest-mountable root image made from an OCI image, and its config."""

    path: Path  # read-only squashfs
    config: mf.ImageConfig
    reference: str
    digest: str  # what the reference resolved to (an index or a manifest)
    manifest_digest: str  # the platform's manifest
    arch: str  # vmrun's name for it
    format: str = FORMAT


def _quiet(message: str) -> None:
    pass


def oci_root(cache: Path | None = None) -> Path:
    return (cache if cache is not None else cache_dir()) / "oci"


def _key(digest: str, arch: str) -> str:
    return key_of(RECIPE, digest, arch)


def ensure_image(
    reference: str | ImageRef,
    *,
    arch: str,
    cache: Path | None = None,
    progress: Progress | None = None,
    notice: Callable[[str], None] = _quiet,
    insecure: bool = False,
    auth_files: list[Path] | None = None,
) -> RootImage | PulledDisk:
    """What REFERENCE names on ARCH, pulled unless cached: a root image made from a
    container image, or a VM disk (a vmrun disk artifact, or a KubeVirt containerDisk:
    a container image with no Entrypoint or Cmd holding one /disk/*.qcow2 or *.img).

    A reference by digest is answered from the cache without asking the registry; a tag
    costs one manifest request. Raises UsageError (bad reference, no such platform),
    FetchError, VerificationError, ImageError or UnsafeImage (a hostile layer or disk).
    """
    ref = parse_reference(reference) if isinstance(reference, str) else reference
    arch = lookup_arch(arch).name
    root = oci_root(cache)
    if isinstance(ref, RegistryRef) and ref.digest is not None:
        cached = _cached_any(root, ref.digest, arch)
        if cached is not None:
            return cached
    with locked(root / PRUNE_LOCK, shared=True):
        return _pull(ref, arch, root, progress, notice, insecure, auth_files)


def ensure_root_image(reference: str | ImageRef, *, arch: str, **options: Any) -> RootImage:
    """The root image for REFERENCE on ARCH (see ensure_image); UsageError for a VM disk."""
    image = ensure_image(reference, arch=arch, **options)
    if isinstance(image, PulledDisk):
        raise UsageError(f"{reference} is a VM disk, not a container image",
                         hint="run it with --image (it boots as a disk)")
    return image


def ensure_disk(reference: str | ImageRef, *, arch: str, **options: Any) -> PulledDisk:
    """The VM disk REFERENCE names on ARCH (see ensure_image); UsageError for a
    container image."""
    image = ensure_image(reference, arch=arch, **options)
    if isinstance(image, RootImage):
        raise UsageError(f"{reference} is a container image, not a VM disk",
                         hint="a disk is a vmrun disk artifact (vmrun image push) or a "
                         "containerDisk (one /disk/*.qcow2 or *.img, no Entrypoint or Cmd)")
    return image


def _cached_any(root: Path, digest: str, arch: str) -> RootImage | PulledDisk | None:
    return cached_root(root, _key(digest, arch)) or disks.cached_disk(
        root, disks.disk_key(digest, arch))


def _pull(ref: ImageRef, arch: str, root: Path, progress: Progress | None,
          notice: Callable[[str], None], insecure: bool,
          auth_files: list[Path] | None) -> RootImage | PulledDisk:
    with open_source(ref, insecure=insecure, auth_files=auth_files) as source:
        data, declared, digest = source.resolve()
        key = _key(digest, arch)
        cached = _cached_any(root, digest, arch)
        if cached is not None:
            return cached
        manifest_digest, manifest = _platform_manifest(source, str(ref), data, declared,
                                                       digest, arch)
        origin = disks.Origin(str(ref), digest, manifest_digest, arch)
        if manifest.is_disk:
            if manifest.config.size > mf.CONFIG_LIMIT:
                raise ImageError(f"{ref}: disk config over {mf.CONFIG_LIMIT} bytes")
            config_blob = ensure_blob(root, source, manifest.config, None).read_bytes()
            blob = ensure_blob(root, source, manifest.layers[0], progress)
            return disks.install_artifact(root, origin, manifest, config_blob, blob)
        config = _fetch_config(root, source, manifest, str(ref), arch)
        layers = _fetch_layers(root, source, manifest, config, progress)
    if config.entrypoint is None and config.cmd is None:
        found = disks.find_container_disk(layers, str(ref))
        if found is not None:
            notice(f"{ref} is a containerDisk: taking /disk/{found.name}")
            return disks.install_container_disk(root, origin, found)
    with locked(root / "roots" / f"{key}.lock"):
        cached = cached_root(root, key)
        if cached is not None:
            return cached
        total = sum(layer.path.stat().st_size for layer in layers)
        step = f"converting {len(layers)} layers of {ref}"
        if progress is None:
            notice(f"converting {len(layers)} layers ({total / 1e6:.1f} MB) of {ref}")
        else:
            progress(step, 0, total)  # its end line says how long it took
        image = RootImage(root / "roots" / f"{key}.sqfs", config, str(ref), digest,
                          manifest_digest, arch)
        _build(root, key, layers, image)
        if progress is not None:
            progress(step, total, total)
        return image


def _platform_manifest(source: Source, what: str, data: bytes, declared: str | None,
                       digest: str, arch: str) -> tuple[str, mf.Manifest]:
    for _ in range(_MAX_NESTING + 1):
        media_type = mf.media_type_of(data, declared, what)
        parsed = mf.parse_manifest(data, media_type, what)
        if isinstance(parsed, mf.Manifest):
            return digest, parsed
        chosen = _choose_any(parsed, arch, what)
        data, declared, digest = source.manifest(chosen), chosen.media_type, chosen.digest
    raise ImageError(f"{what}: indexes nested deeper than {_MAX_NESTING}")


def _choose_any(index: mf.Index, arch: str, what: str) -> mf.Descriptor:
    """The platform's manifest, or the one nested index (an OCI layout's index.json)."""
    nested = [d for d in index.manifests if d.media_type in mf.INDEXES]
    if len(index.manifests) == 1 and nested:
        return nested[0]
    return mf.choose(index, arch, what)


def _fetch_config(root: Path, source: Source, manifest: mf.Manifest, what: str,
                  arch: str) -> mf.ImageConfig:
    if manifest.config.size > mf.CONFIG_LIMIT:
        raise ImageError(f"{what}: image config over {mf.CONFIG_LIMIT} bytes")
    path = ensure_blob(root, source, manifest.config, None)
    config = mf.parse_config(path.read_bytes(), f"{what} config")
    if len(config.diff_ids) != len(manifest.layers):
        raise ImageError(f"{what}: {len(manifest.layers)} layers but "
                         f"{len(config.diff_ids)} diff_ids in the config")
    mf.check_platform(config, arch, what)
    return config


def _fetch_layers(root: Path, source: Source, manifest: mf.Manifest, config: mf.ImageConfig,
                  progress: Progress | None) -> list[Layer]:
    layers = []
    for number, (descriptor, diff_id) in enumerate(
            zip(manifest.layers, config.diff_ids, strict=True), start=1):
        path = ensure_blob(root, source, descriptor, progress)
        layers.append(Layer(path, mf.LAYER_COMPRESSION[descriptor.media_type], diff_id,
                            f"layer {number} ({descriptor.digest[:19]})"))
    return layers


def ensure_blob(root: Path, source: Source, descriptor: mf.Descriptor,
                progress: Progress | None) -> Path:
    """DESCRIPTOR's blob in the store, fetched once however many processes ask at once."""
    final = root / "blobs" / "sha256" / descriptor.hex
    if _present(final, descriptor):
        return final
    tmp = root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    with locked(tmp / f"{descriptor.hex}.lock"):
        if _present(final, descriptor):
            return final
        part = tmp / f"{descriptor.hex}.part"
        source.blob(descriptor, part, progress)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(part, 0o444)
        os.replace(part, final)
    return final


def _present(path: Path, descriptor: mf.Descriptor) -> bool:
    # Blobs are verified before they get their name and are read-only after.
    try:
        return path.stat().st_size == descriptor.size
    except FileNotFoundError:
        return False


def _build(root: Path, key: str, layers: list[Layer], image: RootImage) -> None:
    log = root / "tmp" / f"{key}.log"
    try:
        with staged(image.path) as tmp:
            entries = build_rootfs(layers, tmp, log=log)
            os.chmod(tmp, 0o444)
    finally:
        log.unlink(missing_ok=True)
    record_root(root, key, image, entries=entries, recipe=RECIPE)


def record_root(root: Path, key: str, image: RootImage, *, entries: int, recipe: str) -> None:
    """Write what IMAGE (its squashfs already in place) was made from: the record that
    makes it a complete root image of the store, written last."""
    record: dict[str, Any] = {
        "reference": image.reference, "digest": image.digest,
        "manifest_digest": image.manifest_digest, "arch": image.arch, "format": image.format,
        "recipe": recipe, "entries": entries, "size": image.path.stat().st_size,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(image.config),
    }
    with staged(root / "roots" / f"{key}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def root_path(root: Path, key: str) -> Path:
    """Where the root image of KEY lives in the store (ROOT: see oci_root)."""
    return root / "roots" / f"{key}.sqfs"


def cached_root(root: Path, key: str) -> RootImage | None:
    """KEY's complete root image in the store at ROOT, if there is one."""
    path = root_path(root, key)
    try:
        record = json.loads((root / "roots" / f"{key}.json").read_text())
        raw = record["config"]
        config = mf.ImageConfig(
            architecture=str(raw["architecture"]), os=str(raw["os"]),
            diff_ids=tuple(raw["diff_ids"]), env=tuple(raw["env"]),
            entrypoint=tuple(raw["entrypoint"]) if raw["entrypoint"] is not None else None,
            cmd=tuple(raw["cmd"]) if raw["cmd"] is not None else None,
            working_dir=str(raw["working_dir"]), user=str(raw["user"]))
        image = RootImage(path, config, str(record["reference"]), str(record["digest"]),
                          str(record["manifest_digest"]), str(record["arch"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return image if path.is_file() else None
