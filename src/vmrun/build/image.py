"""A built disk in the image store: named, keyed by its inputs, rebuilt when the archive moves."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmrun import cache as cachelib
from vmrun.build.debootstrap import check_suite, describe
from vmrun.build.disk import DEFAULT_SIZE, DiskRecipe, build_disk, recipe
from vmrun.debian import archive, mirror_from_env
from vmrun.errors import FetchError
from vmrun.images import store
from vmrun.qemu.arch import Arch

Notice = Callable[[str], None]


@dataclass(frozen=True)
class Built:
    """What `vmrun image build` made or found."""

    image: store.StoredImage
    built: bool  # False: the same inputs were built before
    seconds: float
    recipe: DiskRecipe
    state: archive.ArchiveState


def _quiet(message: str) -> None:
    pass


def build_image(name: str, *, arch: Arch, suite: str | None = None, mirror: str | None = None,
                packages: Sequence[str] = (), size: int = DEFAULT_SIZE,
                firmware: Sequence[str] | None = None, refresh: bool = False,
                cache: Path | None = None, notice: Notice = _quiet) -> Built:
    """NAME in the store: ARCH's bootable disk with PACKAGES from SUITE (default: the
    suite of vmrun's guest kernel for ARCH) on MIRROR. The same inputs and archive state
    give the stored image at once (NAME is pointed at it); REFRESH builds it again."""
    from vmrun.guest.build import guest_suite

    store.check_name(name)
    started = time.monotonic()
    disk = recipe(arch, suite=check_suite(suite or guest_suite(arch)),
                  mirror=mirror or mirror_from_env(), packages=packages, size=size,
                  firmware=firmware)
    pointer = store.store_root(cache) / "built" / f"{disk.recipe_key()}.json"
    try:
        state = archive.archive_state(mirror=disk.bootstrap.mirror, suite=disk.bootstrap.suite,
                                      arch=disk.bootstrap.arch,
                                      cache=cache or cachelib.cache_dir())
    except FetchError as err:
        last = _last_built(pointer, cache)
        if last is None or refresh:
            raise
        notice(f"{err}; using the image built from the archive as it was on {last[1].date}")
        image = last[0] if last[0].name == name else store.alias_name(name, last[0], cache)
        return Built(image, False, time.monotonic() - started, disk, last[1])
    key = disk.key(state)
    found = None if refresh else store.find_baked(key, cache)
    if found is not None:
        image = found if found.name == name else store.alias_name(name, found, cache)
        return Built(image, False, time.monotonic() - started, disk, state)
    _say_what_changed(name, disk, cache, notice)
    notice(f"building {name}: {disk.bootstrap.suite} {disk.bootstrap.arch} "
           f"({', '.join(disk.firmware) or 'no boot loader: --boot fast only'}) with "
           f"{describe(packages) or 'the base packages'} from {disk.bootstrap.mirror}")
    work = store.store_root(cache) / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    with cachelib.locked(work / f"build-{key}.lock"):
        found = None if refresh else store.find_baked(key, cache)
        if found is not None:
            image = found if found.name == name else store.alias_name(name, found, cache)
            return Built(image, False, time.monotonic() - started, disk, state)
        out = work / f"build-{key}.qcow2"  # under the lock: ours alone
        try:
            build_disk(disk, state, out)
            from vmrun.images.formats import check_foreign_image

            image = store.import_image(
                out, name=name, cache=cache, validate=check_foreign_image,
                origin=f"built: {disk.bootstrap.suite} {disk.bootstrap.arch} "
                f"{describe(packages)}".rstrip(), inputs_key=key)
        finally:
            out.unlink(missing_ok=True)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    with cachelib.staged(pointer) as tmp:
        tmp.write_text(json.dumps({"key": key, "state": dataclasses.asdict(state)}))
    return Built(image, True, time.monotonic() - started, disk, state)


def _last_built(pointer: Path, cache: Path | None
                ) -> tuple[store.StoredImage, archive.ArchiveState] | None:
    """The image the recipe behind POINTER made last, and the archive state it was from."""
    try:
        record = json.loads(pointer.read_text())
        state = archive.ArchiveState(**record["state"])
        image = store.find_baked(str(record["key"]), cache)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None if image is None else (image, state)


def _say_what_changed(name: str, disk: DiskRecipe, cache: Path | None, notice: Notice) -> None:
    """When NAME was built before from the same recipe, say that the archive moved on."""
    try:
        before = store.resolve(name, cache)
    except Exception:  # noqa: BLE001 - no such name: nothing changed, a first build
        return
    if before.source.startswith("built: "):
        notice(f"{name} was built {before.created or 'before'}; the inputs or the archive "
               "changed since: building a new image")
