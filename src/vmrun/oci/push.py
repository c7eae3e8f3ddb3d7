"""Publishing stored disk images to a registry: one disk artifact, or an index of several.

`vmrun image push NAME[=ARCH]... docker://REGISTRY/REPO[:TAG]`: each stored image goes
as ONE self-contained disk (a baked layer chain is flattened into a temporary qcow2
first); its architecture is what its GPT root partition type declares, or ARCH. One
image becomes a manifest under TAG; several become an index under TAG, one manifest per
architecture (each pushed by digest first). Blobs the registry has are not uploaded.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from vmrun.cache import cache_dir, sha256_file
from vmrun.errors import UsageError
from vmrun.images import disk, formats, store
from vmrun.images.partitions import image_arch
from vmrun.oci import disks
from vmrun.oci import manifest as mf
from vmrun.oci.auth import find_credentials
from vmrun.oci.reference import RegistryRef, parse_reference
from vmrun.oci.registry import Registry
from vmrun.progress import Progress
from vmrun.qemu.arch import lookup_arch

Notice = Callable[[str], None]


@dataclass(frozen=True)
class Source:
    """A stored image to push, and the architecture the user says it is for (if any)."""

    name: str
    arch: str | None = None


@dataclass(frozen=True)
class Pushed:
    reference: str  # docker://REGISTRY/REPO:TAG
    digest: str  # of what the tag now names: a manifest, or an index
    manifests: tuple[tuple[str, str], ...]  # (vmrun arch, manifest digest) per disk


def parse_source(word: str) -> Source:
    """NAME or NAME=ARCH (an image name never holds "=")."""
    name, equals, arch = word.partition("=")
    if not name or (equals and not arch):
        raise UsageError(f"bad image to push {word!r}", hint="NAME or NAME=ARCH")
    return Source(name, lookup_arch(arch).name if arch else None)


def _quiet(message: str) -> None:
    pass


def push_disks(sources: Sequence[Source], destination: str, *, cache: Path | None = None,
               insecure: bool = False, auth_files: list[Path] | None = None,
               progress: Progress | None = None, notice: Notice = _quiet) -> Pushed:
    """Push SOURCES (stored images) to DESTINATION (docker://..., a tag) as disk artifacts."""
    ref = parse_reference(destination)
    if not isinstance(ref, RegistryRef) or ref.digest is not None:
        raise UsageError(f"cannot push to {destination}",
                         hint="push to docker://REGISTRY/REPO[:TAG] (a tag, not a digest)")
    if not sources:
        raise UsageError("nothing to push", hint="vmrun image push NAME[=ARCH]... DEST")
    registry = Registry(ref, credentials=find_credentials(ref.registry, ref.repository,
                                                          auth_files),
                        insecure=insecure, actions="pull,push")
    created = datetime.now(UTC).isoformat(timespec="seconds")
    artifacts: list[tuple[str, disks.Artifact]] = []
    for source in sources:
        with _self_contained(source.name, cache) as (path, fmt, virtual_size):
            arch = _arch_of(source, path, fmt)
            if any(arch == seen for seen, _ in artifacts):
                raise UsageError(f"two images for {arch} in one push",
                                 hint="one image per architecture under a tag")
            digest = f"sha256:{sha256_file(path)}"
            artifact = disks.build_artifact(disk_digest=digest, disk_size=path.stat().st_size,
                                            fmt=fmt, arch=arch, virtual_size=virtual_size,
                                            created=created)
            notice(f"pushing {source.name} ({arch}, {fmt}) to {ref}")
            _upload(registry, path, artifact, progress)
        artifacts.append((arch, artifact))
    tag = ref.tag or "latest"
    if len(artifacts) == 1:
        top = registry.put_manifest(tag, artifacts[0][1].manifest, mf.OCI_MANIFEST)
    else:
        for _, artifact in artifacts:
            registry.put_manifest(artifact.digest, artifact.manifest, mf.OCI_MANIFEST)
        top = registry.put_manifest(tag, disks.build_index([a for _, a in artifacts]),
                                    mf.OCI_INDEX)
    return Pushed(str(ref), top, tuple((arch, a.digest) for arch, a in artifacts))


def _upload(registry: Registry, path: Path, artifact: disks.Artifact,
            progress: Progress | None) -> None:
    if not registry.has_blob(artifact.layer):
        registry.upload_blob(path, artifact.layer, progress)
    if not registry.has_blob(artifact.config_descriptor):
        with tempfile.NamedTemporaryFile(prefix="vmrun-config-") as config:
            config.write(artifact.config)
            config.flush()
            registry.upload_blob(Path(config.name), artifact.config_descriptor)


def _arch_of(source: Source, path: Path, fmt: str) -> str:
    declared = image_arch(path, fmt)
    if source.arch is not None and declared is not None and declared != source.arch:
        raise UsageError(f"image {source.name} is for {declared} (its root partition says "
                         f"so), not {source.arch}")
    arch = source.arch or declared
    if arch is None:
        raise UsageError(f"image {source.name} does not say its architecture (no GPT root "
                         "partition type for one)", hint=f"push it as {source.name}=ARCH")
    return arch


@contextlib.contextmanager
def _self_contained(name: str, cache: Path | None) -> Iterator[tuple[Path, str, int]]:
    """NAME's disk as one file vmrun may publish: (path, format, virtual size).

    A base already is one (its blob, re-hashed); a baked layer chain is checked layer by
    layer, then flattened into a temporary qcow2, removed afterwards.
    """
    image = store.resolve(name, cache)
    if image.backing:
        store.check_layer_chain(image, cache=cache, validate=lambda layer, has_backing: (
            formats.check_foreign_image(layer, allow_backing=has_backing)))
    else:
        store.verify_blob(image)
    info = formats.check_foreign_image(image.path, allow_backing=bool(image.backing))
    fmt = str(info.format)
    if not image.backing and fmt in disks.DISK_FORMATS:
        yield image.path, fmt, info.virtual_size
        return
    work = (cache if cache is not None else cache_dir()) / "oci" / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="push-", dir=work) as tmp:
        flat = Path(tmp) / "disk.qcow2"
        disk.flatten(image.path, flat, src_format=fmt, follow_backing=bool(image.backing))
        yield flat, "qcow2", formats.check_foreign_image(flat).virtual_size
