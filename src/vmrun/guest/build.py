"""The default guest: a Debian kernel, busybox-static and vmrun's agent as PID 1.

Everything is fetched from the Debian archive through its signed chain of hashes,
unpacked in Python and cached by content, so later uses need no network. A cached kernel
or initramfs whose bytes changed on disk is detected on use and rebuilt, never booted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmrun import cache as cachelib
from vmrun.debian import mirror_from_env
from vmrun.errors import FetchError
from vmrun.guest import reseed
from vmrun.progress import Progress
from vmrun.qemu.arch import Arch, Transport

if TYPE_CHECKING:
    from vmrun.debian.archive import PackageIndex, PackageRecord
    from vmrun.guest.modules import Module

# The fetching and building machinery is imported where it is used: a cached guest is
# found without it, and every run's start-up time counts.

# Bump when the layout of the initramfs changes in a way the agent depends on.
INITRD_FORMAT = "9"

# Module sets the agent loads: at boot, and when a request needs them.
MODULE_SETS: dict[str, tuple[str, ...]] = {
    "boot": ("virtio_console",),
    "9p": ("9pnet_virtio", "9p"),
    "virtiofs": ("virtiofs",),
    "net": ("virtio_net",),
    "blk": ("virtio_blk",),
    # Root filesystems for --boot fast. crc32c first: ext4's and libcrc32c's checksums
    # ask the crypto API for it (a softdep, which nothing here would resolve). xfs is a
    # set of its own, loaded after "fs" only for a root that is not ext4: under TCG its
    # 4 MB take most of a second to load, ext4's a quarter.
    "fs": ("crc32c_generic", "ext4"),
    "xfs": ("xfs",),
    # OCI images: the squashfs root (lz4 is built into Debian's kernels) under an overlay
    # whose upper layer is a tmpfs.
    "oci": ("squashfs", "overlay"),
}
TRANSPORT_MODULE = {Transport.MMIO: "virtio_mmio", Transport.PCI: "virtio_pci", Transport.CCW: ""}
TRANSPORT_OPTION = {Transport.MMIO: "CONFIG_VIRTIO_MMIO", Transport.PCI: "CONFIG_VIRTIO_PCI",
                    Transport.CCW: "CONFIG_VIRTIO_CCW"}

# Only these parts of the kernel's module tree are unpacked: the closure of the sets
# above lies inside them (checked when the closure is computed).
MODULE_DIRS = (
    "drivers/virtio/", "drivers/char/virtio_console", "drivers/char/hw_random/",
    "drivers/block/virtio_blk",
    "drivers/net/virtio_net", "drivers/net/net_failover", "net/core/failover",
    "net/9p/", "fs/9p/", "fs/fuse/", "fs/netfs/", "fs/fscache/", "drivers/s390/virtio/",
    "fs/ext4/", "fs/jbd2/", "fs/mbcache", "fs/xfs/", "lib/crc16", "lib/libcrc32c",
    "crypto/crc32c_generic", "fs/squashfs/", "fs/overlayfs/",
)

FSTAB = b"""\
proc /proc proc nosuid,nodev,noexec 0 0
sys /sys sysfs nosuid,nodev,noexec 0 0
tmp /tmp tmpfs nosuid,nodev,mode=1777 0 0
run /run tmpfs nosuid,nodev,mode=755 0 0
devpts /dev/pts devpts nosuid,noexec,gid=5,mode=620,ptmxmode=666 0 0
shm /dev/shm tmpfs nosuid,nodev,mode=1777 0 0
"""

Notice = Callable[[str], None]

# The one name of the way to boot a guest whose packages nobody vouched for.
INSECURE_OPTION = "--insecure-unverified-guest"
INSECURE_ENV = "VMRUN_INSECURE_UNVERIFIED_GUEST"
# File timestamps are coarse (a few ms): a change this close to the moment a file was
# last hashed could leave its size and times as they were, so such a file is hashed again.
_RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class Guest:
    arch: Arch
    kernel: Path  # as booted: an ELF vmlinux where PVH boot is possible
    initrd: Path
    release: str
    key: str  # content key of kernel + initrd, for anything cached on top of them


def _agent_script() -> bytes:
    return Path(__file__).with_name("agent.sh").read_bytes()


def guest_suite(arch: Arch) -> str:
    """The Debian suite the guest comes from: the arch's, or $VMRUN_DEBIAN_SUITE."""
    return os.environ.get("VMRUN_DEBIAN_SUITE") or arch.suite


def _pointer(cache: Path, arch: Arch) -> Path:
    return cache / "guests" / f"{arch.name}-{guest_suite(arch)}.json"


def _resolve_kernel(index: PackageIndex, name: str) -> PackageRecord:
    """Follow a metapackage like linux-image-amd64 to the package holding the kernel."""
    record = index.lookup(name)
    for _ in range(4):
        following = [
            alt for group in record.depends for alt in group
            if alt.startswith("linux-image-") and alt != record.name
        ]
        if not following:
            return record
        record = index.lookup(following[0])
    return record


def _fetch_debs(arch: Arch, *, mirror: str, cache: Path, notice: Notice,
                progress: Progress | None, insecure: bool) -> tuple[dict[str, str], bool]:
    """The kernel and busybox .debs, and whether the index naming them was signed."""
    from vmrun.debian import archive

    index = archive.load_index(
        mirror=mirror, suite=guest_suite(arch), arch=arch.debian_arch, cache=cache,
        notice=notice, progress=progress, insecure_unverified=insecure,
    )
    kernel = _resolve_kernel(index, arch.kernel_package)
    busybox = index.lookup("busybox-static")
    notice(f"fetching {kernel.name} {kernel.version} and busybox-static {busybox.version} "
           f"for {arch.debian_arch} from {mirror}")
    debs = {
        "kernel": archive.fetch_deb(index, kernel, cache=cache, progress=progress,
                                    notice=notice),
        "busybox": archive.fetch_deb(index, busybox, cache=cache, progress=progress,
                                     notice=notice),
    }
    return {role: str(path) for role, path in debs.items()}, index.signed


def _wanted_member(name: str) -> bool:
    if name.startswith("boot/vmlinu") or name.startswith("boot/config-"):
        return True
    if "/kernel/" in name and name.startswith(("lib/modules/", "usr/lib/modules/")):
        rel = name.split("/kernel/", 1)[1]
        return rel.startswith(MODULE_DIRS)
    return False


def _unpack_kernel(deb: Path, arch: Arch, cache: Path) -> Path:
    """Unpack the kernel .deb's kernel image and the needed modules (once per .deb)."""
    from vmrun.debian.deb import extract_deb
    from vmrun.guest import kernel as kernellib

    # Keyed by what is unpacked too, so a vmrun that needs more modules unpacks again.
    final = _kernel_dir(deb, cache)
    if (final / "vmlinuz").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=final.parent))
    try:
        extract_deb(deb, staging / "root", select=_wanted_member)
        images = sorted((staging / "root").glob(arch.kernel_glob))
        if not images:
            raise FetchError(f"{deb.name} holds no kernel image matching {arch.kernel_glob}")
        shutil.move(str(images[0]), staging / "vmlinuz")
        image = (staging / "vmlinuz").read_bytes()
        if arch.name in ("x86_64", "i386") and image[0x202:0x206] == b"HdrS":
            # An XZ kernel spends seconds decompressing itself under TCG; unpacked once
            # here, its ELF boots straight through the PVH entry.
            vmlinux = kernellib.extract_vmlinux(image)
            if kernellib.has_pvh_note(vmlinux):
                (staging / "vmlinux").write_bytes(vmlinux)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(final)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _kernel_dir(deb: Path, cache: Path) -> Path:
    # DEB is named by its sha256, checked before use (_intact_deb).
    return cache / "kernels" / cachelib.key_of(deb.stem, *MODULE_DIRS)


def _busybox_dir(deb: Path, cache: Path) -> Path:
    return cache / "busybox" / deb.stem


def _modules_root(kernel_dir: Path) -> Path:
    for base in ("root/lib/modules", "root/usr/lib/modules"):
        releases = sorted((kernel_dir / base).glob("*"))
        if releases:
            return releases[0]
    raise FetchError(f"no kernel modules found under {kernel_dir}")


def _write_initrd(out: io.BufferedWriter, *, busybox: bytes, agent: bytes, release: str,
                  module_sets: dict[str, list[Module]], transport: str,
                  reseed_helper: bytes | None) -> None:
    from vmrun.guest import modules as modlib
    from vmrun.guest.cpio import CpioWriter

    cpio = CpioWriter(out)
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
                      "run", "root", "mnt", "etc/vmrun", f"lib/modules/{release}"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, mode=0o666)
    cpio.file("bin/busybox", busybox, mode=0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", agent, mode=0o755)
    if reseed_helper is not None:
        cpio.file("sbin/vmrun-reseed", reseed_helper, mode=0o755)
    cpio.file("etc/fstab", FSTAB)
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\ntty:x:5:\n")
    # The option the agent names when no virtio device shows up (a kernel of the user's).
    cpio.file("etc/vmrun/transport", transport.encode() + b"\n")
    written: set[str] = set()
    for set_name, mods in module_sets.items():
        paths = []
        for module in mods:
            target = f"lib/modules/{release}/{module.name}.ko"
            if target not in written:
                cpio.file(target, modlib.read_module_bytes(module.path))
                written.add(target)
            paths.append("/" + target)
        cpio.file(f"etc/vmrun/modules.{set_name}", ("\n".join(paths) + "\n").encode())
    cpio.finish()


def _build_initrd(kernel_dir: Path, busybox_root: Path, arch: Arch, cache: Path) -> Path:
    from vmrun.guest import modules as modlib

    modules_root = _modules_root(kernel_dir)
    busybox_path = next(
        (p for p in (busybox_root / "bin/busybox", busybox_root / "usr/bin/busybox")
         if p.exists()), None)
    if busybox_path is None:
        raise FetchError("the busybox-static package holds no busybox binary")
    sets = module_sets(modlib.scan_modules(modules_root), arch)
    return cached_initrd(cache, arch=arch, busybox=busybox_path.read_bytes(),
                         release=modules_root.name, sets=sets)


def module_sets(available: dict[str, Module], arch: Arch) -> dict[str, list[Module]]:
    """The modules of each of MODULE_SETS found in AVAILABLE, with what they need, each
    module in the first set that needs it; missing ones are taken to be built in."""
    from vmrun.guest import modules as modlib

    boot_wanted = [TRANSPORT_MODULE[arch.transport], *MODULE_SETS["boot"]]
    boot = modlib.closure([m for m in boot_wanted if m], available, missing_ok=True)
    sets = {"boot": boot}
    loaded = {m.name for m in boot}
    for name, wanted in MODULE_SETS.items():
        if name != "boot":
            sets[name] = [m for m in modlib.closure(wanted, available, missing_ok=True)
                          if m.name not in loaded]
    return sets


def cached_initrd(cache: Path, *, arch: Arch, busybox: bytes, release: str,
                  sets: dict[str, list[Module]]) -> Path:
    """vmrun's initramfs with BUSYBOX, the agent and SETS of modules, built once per
    content."""
    agent = _agent_script()
    helper = reseed.helper(arch.name)
    key = cachelib.key_of(
        INITRD_FORMAT, agent, busybox, release, TRANSPORT_OPTION[arch.transport],
        helper or b"",
        *[f"{n}:{m.name}:{cachelib.sha256_file(m.path)}" for n, ms in sets.items() for m in ms],
    )
    final = cache / "initrd" / f"{key}.cpio"
    if final.exists():
        return final
    with cachelib.staged(final) as tmp, open(tmp, "wb") as out:
        _write_initrd(out, busybox=busybox, agent=agent, release=release, module_sets=sets,
                      transport=TRANSPORT_OPTION[arch.transport], reseed_helper=helper)
    return final


def _unpack_busybox(deb: Path, cache: Path) -> Path:
    from vmrun.debian.deb import extract_deb

    final = _busybox_dir(deb, cache)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=final.parent))
    try:
        extract_deb(deb, staging, select=lambda n: n.endswith("bin/busybox"))
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _insecure_requested(explicit: bool) -> bool:
    return explicit or os.environ.get(INSECURE_ENV, "") not in ("", "0")


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _file_record(path: Path) -> dict[str, Any]:
    """What _intact checks PATH against later: its hash, and its size and times now."""
    checked = time.time_ns()
    return {"path": str(path), "sha256": cachelib.sha256_file(path),
            "stat": _stat_key(os.stat(path)), "checked_ns": checked}


def _intact(entry: dict[str, Any]) -> dict[str, Any] | None:
    """ENTRY, brought up to date, if its file still holds the bytes hashed; else None.

    Unchanged size, times and inode, long enough after the last hash, mean unchanged
    bytes (nothing is hashed: every run's start-up counts); anything else is hashed.
    """
    try:
        path = Path(entry["path"])
        st = os.stat(path)
        if (_stat_key(st) == entry["stat"]
                and st.st_ctime_ns + _RACY_NS < int(entry["checked_ns"])):
            return entry
        if cachelib.sha256_file(path) != entry["sha256"]:
            return None
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return _file_record(path)


def _intact_deb(path: str) -> bool:
    """Whether the cached .deb at PATH still holds the bytes its name (sha256) says."""
    deb = Path(path)
    try:
        if cachelib.sha256_file(deb) == deb.stem:
            return True
    except OSError:
        return False
    deb.unlink()
    return False


def _read_pointer(pointer: Path) -> dict[str, Any]:
    try:
        recorded = json.loads(pointer.read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _cached_guest(arch: Arch, pointer: Path, recorded: dict[str, Any], build_key: str,
                  notice: Notice) -> Guest | None:
    """The guest recorded under BUILD_KEY if its files are intact; damaged ones go."""
    built = recorded.get("built")
    built = built.get(build_key) if isinstance(built, dict) else None
    if not isinstance(built, dict) or not isinstance(built.get("release"), str):
        return None
    if not all(isinstance(built.get(role), dict) for role in ("kernel", "initrd")):
        return None  # written by an older vmrun, which kept no hashes
    checked = {role: _intact(built[role]) for role in ("kernel", "initrd")}
    damaged = [role for role, entry in checked.items() if entry is None]
    if damaged:
        for role in damaged:
            notice(f"the cached guest {role} {built[role].get('path')} changed on disk or "
                   "is gone; rebuilding the guest")
        _discard_built(built, recorded, pointer.parent.parent)
        return None
    if checked != {role: built[role] for role in checked}:
        _write_pointer(pointer, {**recorded, "built": {build_key: {**built, **checked}}})
    kernel, initrd = Path(built["kernel"]["path"]), Path(built["initrd"]["path"])
    return Guest(arch=arch, kernel=kernel, initrd=initrd, release=built["release"],
                 key=cachelib.key_of(str(kernel), str(initrd)))


def _discard_built(built: dict[str, Any], recorded: dict[str, Any], cache: Path) -> None:
    """Remove what a damaged guest was made of, so all of it is unpacked again."""
    kernel, initrd = built["kernel"], built["initrd"]
    doomed = [Path(str(kernel.get("path", ""))).parent] if kernel.get("path") else []
    for role, unpack_dir in (("kernel", _kernel_dir), ("busybox", _busybox_dir)):
        if isinstance(recorded.get(role), str):
            doomed.append(unpack_dir(Path(recorded[role]), cache))
    for directory in doomed:
        if directory.parent.parent == cache:  # only what vmrun made under the cache
            shutil.rmtree(directory, ignore_errors=True)
    if initrd.get("path"):
        with contextlib.suppress(OSError):
            Path(str(initrd["path"])).unlink()


def _write_pointer(pointer: Path, recorded: dict[str, Any]) -> None:
    with cachelib.staged(pointer) as tmp:
        tmp.write_text(json.dumps(recorded))


def _reusable_debs(recorded: dict[str, Any], mirror: str) -> dict[str, str] | None:
    if recorded.get("mirror") != mirror:
        return None
    debs = {role: recorded.get(role) for role in ("kernel", "busybox")}
    if not all(isinstance(path, str) and _intact_deb(path) for path in debs.values()):
        return None
    return {role: str(path) for role, path in debs.items()}


def ensure_guest(arch: Arch, *, mirror: str | None = None, cache: Path | None = None,
                 notice: Notice = lambda _: None, progress: Progress | None = None,
                 refresh: bool = False, insecure_unverified_guest: bool = False) -> Guest:
    """The default guest for ARCH, fetched and built on first use, cached afterwards.

    The packages come from an InRelease whose signature was checked (see
    vmrun.debian.archive.load_index); without gpgv or sqv that is an error, unless
    INSECURE_UNVERIFIED_GUEST (or $VMRUN_INSECURE_UNVERIFIED_GUEST=1) accepts a guest
    nobody vouched for, with a warning through NOTICE on every call. A guest built that
    way is never used without that option. Cached files whose bytes changed on disk are
    rebuilt from the (re-verified) packages.
    """
    cache = cache or cachelib.cache_dir()
    mirror = mirror or mirror_from_env()
    insecure = _insecure_requested(insecure_unverified_guest)
    if insecure:
        notice(f"WARNING: {INSECURE_OPTION}: the guest kernel and agent from {mirror} are "
               "not signature-checked; whoever can alter that traffic runs code with your "
               "shared directory")
    pointer = _pointer(cache, arch)
    # What this vmrun's initramfs depends on besides the packages: checked on every use.
    build_key = cachelib.key_of(INITRD_FORMAT, _agent_script(), mirror,
                                reseed.helper(arch.name) or b"")
    with cachelib.locked(pointer.with_suffix(".lock")):
        recorded = {} if refresh else _read_pointer(pointer)
        # A guest from an unsigned index is used only by whoever accepts one.
        if recorded.get("verified") is not True and not insecure:
            recorded = {}
        guest = _cached_guest(arch, pointer, recorded, build_key, notice)
        if guest is not None:
            return guest
        debs = _reusable_debs(recorded, mirror)
        if debs is not None:
            verified = recorded.get("verified") is True
        else:
            debs, verified = _fetch_debs(arch, mirror=mirror, cache=cache, notice=notice,
                                         progress=progress, insecure=insecure)
        kernel_dir = _unpack_kernel(Path(debs["kernel"]), arch, cache)
        busybox_root = _unpack_busybox(Path(debs["busybox"]), cache)
        initrd = _build_initrd(kernel_dir, busybox_root, arch, cache)
        kernel = kernel_dir / "vmlinux"
        if not kernel.exists():
            kernel = kernel_dir / "vmlinuz"
        release = _modules_root(kernel_dir).name
        # Remember the result, so later uses touch no index and, mostly, hash nothing.
        _write_pointer(pointer, {
            **debs, "mirror": mirror, "verified": verified,
            "built": {build_key: {"kernel": _file_record(kernel),
                                  "initrd": _file_record(initrd), "release": release}},
        })
    return Guest(arch=arch, kernel=kernel, initrd=initrd, release=release,
                 key=cachelib.key_of(str(kernel), str(initrd)))


def ensure_busybox(arch: Arch, *, mirror: str | None = None, cache: Path | None = None,
                   notice: Notice = lambda _: None, progress: Progress | None = None,
                   insecure_unverified_guest: bool = False) -> bytes:
    """The static busybox of ARCH's default guest (fetched and verified with it), for an
    initramfs around a kernel of the user's."""
    cache = cache or cachelib.cache_dir()
    ensure_guest(arch, mirror=mirror, cache=cache, notice=notice, progress=progress,
                 insecure_unverified_guest=insecure_unverified_guest)
    pointer = _pointer(cache, arch)
    with cachelib.locked(pointer.with_suffix(".lock")):
        deb = _read_pointer(pointer).get("busybox")
        if not isinstance(deb, str) or not _intact_deb(deb):
            raise FetchError(f"the busybox-static package for {arch.name} is gone from the "
                             "cache", hint="run again: it is fetched anew")
        root = _unpack_busybox(Path(deb), cache)
    for candidate in (root / "bin/busybox", root / "usr/bin/busybox"):
        if candidate.exists():
            return candidate.read_bytes()
    raise FetchError("the busybox-static package holds no busybox binary")
