"""A run's disk: its own qcow2 overlay on a read-only base that never changes."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmrun.errors import ImageError, UsageError
from vmrun.images import disk, formats, store
from vmrun.images.aliases import ALIASES
from vmrun.images.partitions import image_arch
from vmrun.rundir import live_runs

Notice = Callable[[str], None]
Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class AttachedDisk:
    overlay: Path
    base: Path
    base_format: str
    digest: str | None  # the store's digest of the base, None for a file given by path


def base_image(ref: str, *, arch: str, notice: Notice,
               progress: Progress | None) -> tuple[Path, str | None]:
    """The base for REF (a file, a stored name or digest, or an alias to pull)."""
    path = Path(ref)
    if "/" in ref or path.exists():
        if not path.is_file():
            raise ImageError(f"no image file {ref}")
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


@dataclass(frozen=True)
class Base:
    path: Path
    format: str
    digest: str | None


def prepare(ref: str, *, guest_arch: str, debian_arch: str, notice: Notice,
            progress: Progress | None = None) -> Base:
    """Find REF's base and check it: its header, that it is unchanged, its architecture.

    Runs before anything boots, so a refused image costs no VM.
    """
    path, digest = base_image(ref, arch=debian_arch, notice=notice, progress=progress)
    info = formats.check_foreign_image(path)
    if digest is not None:
        store.check_unchanged(digest, path)
    declared = image_arch(path, str(info.format))
    if declared is not None and declared != guest_arch:
        raise UsageError(f"image {ref} is for {declared} (its root partition says so), "
                         f"not {guest_arch}", hint=f"use --arch {declared}")
    return Base(path=path, format=str(info.format), digest=digest)


def attach(base: Base, rundir: Path) -> AttachedDisk:
    """Make the run's own overlay on BASE in RUNDIR (never reused, never shared)."""
    overlay = rundir / "disk.qcow2"
    disk.overlay(base.path, overlay, base_format=base.format)
    # Lets `vmrun image prune` see which bases live runs stand on.
    (rundir / "image.json").write_text(json.dumps({"digest": base.digest,
                                                   "base": str(base.path)}))
    return AttachedDisk(overlay=overlay, base=base.path, base_format=base.format,
                        digest=base.digest)


def live_digests(runs: Path) -> set[str]:
    """Digests of the bases that running VMs stand on (their run's lock is held)."""
    held: set[str] = set()
    for run_dir in live_runs(runs):
        try:
            digest = json.loads((run_dir / "image.json").read_text()).get("digest")
        except (OSError, ValueError):
            continue
        if digest:
            held.add(digest)
    return held
