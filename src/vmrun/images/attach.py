"""A run's disk: its own qcow2 overlay on a read-only base that never changes.

How vmrun's own guest uses the disk (`MachineSpec.boot`, `--boot`):

- `fast`: the image's root partition (see `partitions.find_root_partition`) is mounted
  read-write, on the overlay, and every command runs chrooted in it, with /proc, /sys,
  /dev, a fresh /run and the shared directory mounted inside; vmrun's kernel and agent
  stay, the image's kernel, bootloader and init are never run.
- `disk`: the image is only attached, as /dev/vda; commands run in vmrun's busybox.
- `auto` (the default): `fast` when the image has a root partition, else `disk`.

`full` (the image's own firmware, kernel and init) is not vmrun's guest at all: it is
vmrun.fullboot's business.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmrun.errors import ImageError, UsageError
from vmrun.images import disk, formats, store
from vmrun.images.aliases import ALIASES
from vmrun.images.partitions import SECTOR, find_root_partition, head_arch, read_head
from vmrun.images.rawdisk import require_disk
from vmrun.oci.reference import is_image_reference
from vmrun.progress import Progress
from vmrun.rundir import live_runs
from vmrun.spec import Boot

Notice = Callable[[str], None]


@dataclass(frozen=True)
class AttachedDisk:
    overlay: Path
    base: Path
    base_format: str
    digest: str | None  # the store's digest of the base, None for a file given by path


def base_image(ref: str, *, arch: str, notice: Notice, progress: Progress | None,
               insecure_registries: Sequence[str] = ()) -> tuple[Path, str | None]:
    """The base for REF (a file, a stored name or digest, an alias to pull, or a VM disk
    in a registry or OCI layout: docker://, oci:, oci-archive:)."""
    if is_image_reference(ref):
        return _registry_disk(ref, arch, notice, progress, insecure_registries), None
    path = Path(ref)
    if "/" in ref or path.exists():
        if not path.is_file():
            raise ImageError(f"{ref} is not a regular file" if path.exists()
                             else f"no image file {ref}")
        return path.resolve(), None
    try:
        stored = store.resolve(ref)
    except ImageError:
        if ref.lower() not in ALIASES:
            raise
        notice(f"pulling {ref}")
        stored = store.pull(ref, arch=arch, progress=progress, notice=notice,
                            validate=formats.check_foreign_image)
    return stored.path, stored.digest


def _registry_disk(ref: str, arch: str, notice: Notice, progress: Progress | None,
                   insecure_registries: Sequence[str]) -> Path:
    """The disk REF names, pulled into the OCI store unless there, and still unchanged
    (its header is checked by check_base like any file's)."""
    from vmrun.oci.pull import ensure_disk
    from vmrun.oci.reference import parse_reference
    from vmrun.oci.run import reference_insecure

    parsed = parse_reference(ref)
    pulled = ensure_disk(parsed, arch=arch, notice=notice, progress=progress,
                         insecure=reference_insecure(parsed, insecure_registries))
    store.check_unchanged(pulled.sha256, pulled.path)
    return pulled.path


def check_base(path: Path, digest: str | None) -> formats.ImageInfo:
    """The header check, and for a stored image that it still has its digest; a baked
    layer is checked with every layer under it, each naming the next by digest."""
    if digest is None:
        return formats.check_foreign_image(path)
    stored = store.resolve(digest)
    if stored.backing:
        store.check_layer_chain(stored, validate=lambda layer, has_backing: (
            formats.check_foreign_image(layer, allow_backing=has_backing)))
        return formats.check_foreign_image(path, allow_backing=True)
    info = formats.check_foreign_image(path)
    store.check_unchanged(digest, path)
    return info


@dataclass(frozen=True)
class Base:
    path: Path
    format: str
    digest: str | None
    root: int | None = None  # the root partition's number for the guest arch, if any


def prepare(ref: str, *, guest_arch: str, debian_arch: str, notice: Notice,
            progress: Progress | None = None, image_format: str | None = None,
            insecure_registries: Sequence[str] = ()) -> Base:
    """Find REF's base and check it: its header, that it is unchanged, its architecture;
    an image file without a header must look like a raw disk unless IMAGE_FORMAT is raw.

    Runs before anything boots, so a refused image costs no VM.
    """
    path, digest = base_image(ref, arch=debian_arch, notice=notice, progress=progress,
                              insecure_registries=insecure_registries)
    info = check_base(path, digest)
    if digest is None:
        require_disk(path, str(info.format), image_format, "--image-format")
    head = read_head(path, str(info.format))
    declared = head_arch(head)
    if declared is not None and declared != guest_arch:
        raise UsageError(f"image {ref} is for {declared} (its root partition says so), "
                         f"not {guest_arch}", hint=f"use --arch {declared}")
    root = find_root_partition(head, guest_arch, disk_sectors=info.virtual_size // SECTOR)
    return Base(path=path, format=str(info.format), digest=digest, root=root)


def root_for_boot(base: Base, boot: Boot, ref: str) -> int | None:
    """The partition to mount as the commands' root for BOOT, or None to attach only.

    AUTO is FAST when BASE has a root partition and DISK otherwise; FAST without one is
    a usage error, raised before anything boots.
    """
    if boot == Boot.FULL:
        raise UsageError("Machine boots vmrun's guest; --boot full is vmrun.fullboot")
    if boot == Boot.DISK:
        return None
    if base.root is None and boot == Boot.FAST:
        raise UsageError(f"image {ref} has no root partition (GPT Linux root or MBR type 0x83)",
                         hint="use --boot disk to attach it as a plain disk")
    return base.root


def attach(base: Base, rundir: Path) -> AttachedDisk:
    """Make the run's own overlay on BASE in RUNDIR (never reused, never shared)."""
    overlay = rundir / "disk.qcow2"
    disk.overlay(base.path, overlay, base_format=base.format)
    record_base(rundir, base.digest, base.path)
    return AttachedDisk(overlay=overlay, base=base.path, base_format=base.format,
                        digest=base.digest)


def record_base(rundir: Path, digest: str | None, path: Path) -> None:
    """Let `vmrun image prune` see which base (or OCI root image) a live run stands on."""
    (rundir / "image.json").write_text(json.dumps({"digest": digest, "base": str(path)}))


def _live_records(runs: Path) -> list[dict[str, object]]:
    records = []
    for run_dir in live_runs(runs):
        try:
            record = json.loads((run_dir / "image.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def live_digests(runs: Path) -> set[str]:
    """Digests of the bases that running VMs stand on (their run's lock is held)."""
    return {str(r["digest"]) for r in _live_records(runs) if r.get("digest")}


def live_bases(runs: Path) -> set[str]:
    """Paths of the bases and OCI root images that running VMs stand on."""
    return {str(r["base"]) for r in _live_records(runs) if r.get("base")}
