"""`--packages`: a minimal root with the Debian packages asked for, run like an OCI image.

The root is mmdebstrap's essential set plus the packages (slim: no documentation, manual
pages or translations), turned into a squashfs root image of the OCI store, so it boots
with vmrun's kernel and agent as `--image docker://...` does, warm starts included, and
`vmrun image ls|rm|prune` see it. It is keyed by its inputs: suite, mirror, architecture,
the package list, the recipe, and the archive's state (the hash its signed Release gives
for the architecture's Packages index). A run looks at the archive again when the state it
saw last is older than RECHECK_S (or with refresh); a new state builds a new root and says
so. Unreachable, it keeps using the root it has.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmrun import cache as cachelib
from vmrun.build.debootstrap import (
    Bootstrap,
    check_packages,
    check_suite,
    describe,
    finish,
    remove_work,
    stop,
)
from vmrun.build.debootstrap import run as run_mmdebstrap
from vmrun.debian import mirror_from_env
from vmrun.errors import FetchError, ImageError
from vmrun.oci import manifest as mf
from vmrun.oci.pull import PRUNE_LOCK, RootImage, cached_root, oci_root, record_root, root_path
from vmrun.oci.rootfs import TAR2SQFS, tar2sqfs_argv
from vmrun.qemu.arch import Arch

if TYPE_CHECKING:
    from vmrun.debian import archive

Notice = Callable[[str], None]

RECIPE = "packages-root-1"
RECHECK_S = 6 * 3600.0  # Debian's archive changes a few times a day at most
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _quiet(message: str) -> None:
    pass


def ensure_packages_root(packages: Sequence[str], *, arch: Arch, suite: str | None = None,
                         mirror: str | None = None, cache: Path | None = None,
                         refresh: bool = False, notice: Notice = _quiet,
                         recheck_s: float = RECHECK_S) -> RootImage:
    """The root image with PACKAGES for ARCH from SUITE (default: the suite vmrun's guest
    kernel for ARCH comes from) on MIRROR, built unless cached (about a minute here).

    Raises UsageError (bad names), FetchError, VerificationError or ImageError (mmdebstrap
    or tar2sqfs failed: the message names the step and its last words)."""
    from vmrun.guest.build import guest_suite

    bootstrap = Bootstrap(suite=check_suite(suite or guest_suite(arch)),
                          mirror=(mirror or mirror_from_env()).rstrip("/"),
                          arch=arch.debian_arch, packages=tuple(packages))
    root = oci_root(cache)
    # The pointer names the recipe too: a root made another way is never taken for it.
    pointer = root / "packages" / f"{cachelib.key_of(*_recipe(), repr(bootstrap))}.json"
    pointer.parent.mkdir(parents=True, exist_ok=True)
    with cachelib.locked(pointer.with_suffix(".lock")):
        seen = _read_pointer(pointer)
        known = cached_root(root, seen.key) if seen else None
        if seen and known and not refresh and time.time() - seen.checked < recheck_s:
            return known
        from vmrun.debian import archive

        try:
            state = archive.archive_state(mirror=bootstrap.mirror, suite=bootstrap.suite,
                                          arch=bootstrap.arch,
                                          cache=cache or cachelib.cache_dir())
        except FetchError as err:
            if known is None or refresh:
                raise
            notice(f"{err}; using the root built from the archive as it was before")
            return known
        key = root_key(bootstrap, state)
        image = None if refresh else cached_root(root, key)
        if image is None:
            if seen and seen.state != state.packages_sha256:
                notice(f"{bootstrap.suite} changed on {bootstrap.mirror} ({state.date}) since "
                       f"the root with {describe(packages)} was built: building a new one")
            check_packages(bootstrap, cache or cachelib.cache_dir())
            image = _build(bootstrap, state, root, key, arch.name, notice)
        with cachelib.staged(pointer) as tmp:
            tmp.write_text(json.dumps({"key": key, "state": state.packages_sha256,
                                       "checked": time.time()}))
        return image


def root_key(bootstrap: Bootstrap, state: archive.ArchiveState) -> str:
    """The store key of BOOTSTRAP's root made from the archive in STATE."""
    return cachelib.key_of(*_recipe(), repr(bootstrap), state.packages_sha256)


def _recipe() -> tuple[str, ...]:
    """How a root is made: vmrun's recipe, and the squashfs it is written as."""
    return RECIPE, TAR2SQFS, repr(tar2sqfs_argv(Path("out"), 1))


@dataclass(frozen=True)
class _Seen:
    """What the last look at the archive found: the root it keyed, the state, when."""

    key: str
    state: str
    checked: float


def _read_pointer(pointer: Path) -> _Seen | None:
    try:
        seen = json.loads(pointer.read_text())
        return _Seen(str(seen["key"]), str(seen["state"]), float(seen["checked"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build(bootstrap: Bootstrap, state: archive.ArchiveState, root: Path, key: str,
           arch: str, notice: Notice) -> RootImage:
    notice(f"building a {bootstrap.suite} {bootstrap.arch} root with "
           f"{describe(bootstrap.packages)} from {bootstrap.mirror} (once; it is cached)")
    started = time.monotonic()
    work = root / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    path = root_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="vmrun-packages-", dir=work))
    with cachelib.locked(root / PRUNE_LOCK, shared=True):
        try:
            with cachelib.staged(path) as tmp:
                _bootstrap_to_squashfs(bootstrap, tmp, scratch / "mmdebstrap.log")
                os.chmod(tmp, 0o444)
        finally:
            remove_work(scratch)
        image = RootImage(
            path=path, reference=f"packages:{bootstrap.suite}/{bootstrap.arch}:"
            f"{describe(bootstrap.packages)}",
            digest="sha256:" + cachelib.sha256_file(path),
            manifest_digest="sha256:" + state.packages_sha256, arch=arch,
            config=mf.ImageConfig(architecture=bootstrap.arch, os="linux", diff_ids=(),
                                  env=(PATH,)))
        record_root(root, key, image, entries=0, recipe=RECIPE)
    notice(f"built it in {time.monotonic() - started:.0f}s, "
           f"{path.stat().st_size / 1e6:.0f} MB")
    return image


def _bootstrap_to_squashfs(bootstrap: Bootstrap, out: Path, log: Path) -> None:
    """mmdebstrap's tar, piped into tar2sqfs writing OUT; ImageError names the failed step."""
    jobs = max(1, min(os.cpu_count() or 1, 8))
    producer = run_mmdebstrap(bootstrap, "-", stdout=subprocess.PIPE, log=log,
                              tmpdir=log.parent)
    assert producer.stdout is not None
    try:
        with open(log, "ab") as log_file:
            consumer = subprocess.run(tar2sqfs_argv(out, jobs), stdin=producer.stdout,
                                      stdout=log_file, stderr=subprocess.STDOUT, check=False)
    except BaseException:
        stop(producer)
        raise
    finally:
        producer.stdout.close()
    finish(bootstrap, producer, log)
    if consumer.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()
        raise ImageError(f"tar2sqfs failed (exit {consumer.returncode}) on mmdebstrap's root: "
                         f"{tail[-1] if tail else 'no message'}")
