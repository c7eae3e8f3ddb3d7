"""The OCI part of the store: list, remove and prune root images, VM disks, downloads.

Root images and VM disks are what runs use (each is self-contained: an artifact's disk
is a hard link to its blob); blobs are only the inputs, so prune removes every blob, the
roots and disks a newer pull of the same reference and architecture replaced (unless a
live run stands on them), and what dead pulls left.
Pulls hold prune.lock shared while they fetch and convert; prune holds it exclusively.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmrun.cache import held_if_free, locked
from vmrun.errors import ImageError
from vmrun.oci.disks import cached_disk, disks_dir
from vmrun.oci.pull import PRUNE_LOCK, oci_root


@dataclass(frozen=True)
class OciStored:
    key: str
    reference: str
    digest: str  # what the reference resolved to
    manifest_digest: str
    arch: str
    size: int
    created: str
    path: Path


@dataclass(frozen=True)
class OciDisk:
    """A VM disk pulled from a registry (a disk artifact or a containerDisk)."""

    key: str
    reference: str
    digest: str
    manifest_digest: str
    arch: str
    format: str
    kind: str
    size: int
    created: str
    path: Path


def list_disks(cache: Path | None = None) -> list[OciDisk]:
    """Every complete pulled VM disk, newest first."""
    root = oci_root(cache)
    found = []
    directory = disks_dir(root)
    for record_path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        pulled = cached_disk(root, record_path.stem)
        if pulled is None:
            continue
        origin = pulled.origin
        found.append(OciDisk(record_path.stem, origin.reference, origin.digest,
                             origin.manifest_digest, origin.arch, pulled.format, pulled.kind,
                             pulled.size, pulled.created, pulled.path))
    # Pulls within one second share `created`: the record's mtime orders them.
    return sorted(found, key=lambda found_disk: (found_disk.created, _mtime(found_disk.path)),
                  reverse=True)


def _mtime(image: Path) -> int:
    try:
        return image.with_suffix(".json").stat().st_mtime_ns
    except OSError:
        return 0


def list_roots(cache: Path | None = None) -> list[OciStored]:
    """Every complete root image, newest first."""
    roots = oci_root(cache) / "roots"
    found = []
    for record_path in sorted(roots.glob("*.json")) if roots.is_dir() else []:
        image = roots / f"{record_path.stem}.sqfs"
        try:
            record = json.loads(record_path.read_text())
            found.append(OciStored(
                key=record_path.stem, reference=str(record["reference"]),
                digest=str(record["digest"]), manifest_digest=str(record["manifest_digest"]),
                arch=str(record["arch"]), size=image.stat().st_size,
                created=str(record.get("created", "")), path=image))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(found, key=lambda root: root.created, reverse=True)


def matches(root: OciStored | OciDisk, ref: str) -> bool:
    """Whether REF names ROOT: its reference, a digest (prefix of 12+ hex digits), or the
    two as `image ls` shows them (REFERENCE@DIGEST: that one image of several)."""
    if ref == root.reference:
        return True
    name, at, digest = ref.rpartition("@")
    if at and name == root.reference:
        return matches(root, digest)
    prefix = ref.removeprefix("sha256:")
    return len(prefix) >= 12 and any(
        digest.removeprefix("sha256:").startswith(prefix)
        for digest in (root.digest, root.manifest_digest, "sha256:" + root.key))


def remove(ref: str, cache: Path | None = None) -> list[OciStored | OciDisk]:
    """Delete the root images and VM disks REF names (every architecture); ImageError
    if none."""
    everything: list[OciStored | OciDisk] = [*list_roots(cache), *list_disks(cache)]
    chosen = [entry for entry in everything if matches(entry, ref)]
    if not chosen:
        raise ImageError(f"no OCI image {ref!r} in the store", hint="see vmrun image ls")
    for entry in chosen:
        _delete(entry.path)
    return chosen


def _delete(image: Path) -> None:
    # The record first: without it the image is no longer found, then the data goes.
    for path in (image.with_suffix(".json"), image):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def prune(cache: Path | None = None, *,
          in_use: Callable[[], set[str]] = set) -> list[str]:
    """Remove blobs, replaced roots no live run uses (IN_USE: their paths) and leftovers;
    returns what went, as names to print."""
    base = oci_root(cache)
    if not base.is_dir():
        return []
    removed: list[str] = []
    with locked(base / PRUNE_LOCK):
        used = in_use()
        for entries in (list_roots(cache), list_disks(cache)):
            newest: set[tuple[str, str]] = set()
            for entry in entries:
                if (entry.reference, entry.arch) not in newest:
                    newest.add((entry.reference, entry.arch))
                elif str(entry.path) not in used:
                    _delete(entry.path)
                    removed.append(f"{entry.reference} ({entry.arch}) {entry.digest}")
        blobs = base / "blobs" / "sha256"
        for blob in sorted(blobs.iterdir()) if blobs.is_dir() else []:
            blob.unlink()
            removed.append(f"blob sha256:{blob.name}")
        for directory in (base / "tmp", base / "roots", disks_dir(base)):
            removed += [f"leftover {path.name}" for path in _leftovers(directory)]
    return removed


def _leftovers(directory: Path) -> list[Path]:
    """Remove what dead pulls left in DIRECTORY: parts, logs and locks nobody holds."""
    gone: list[Path] = []
    if not directory.is_dir():
        return gone
    for lock in sorted(directory.glob("*.lock")):
        with held_if_free(lock) as free:
            if not free:
                continue  # a pull is at work on it
            stem = lock.name.removesuffix(".lock")
            for part in [*directory.glob(f"{stem}.part"), *directory.glob(f"{stem}.log"),
                         *directory.glob(f".{stem}.*.part")]:
                part.unlink(missing_ok=True)
                gone.append(part)
            lock.unlink(missing_ok=True)
            gone.append(lock)
    return gone
