"""A kernel the user built (--kernel, --modules, --append) booted with vmrun's initramfs
and agent: checked before it boots, and the options it lacks named when the agent says so."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from vmrun import cache as cachelib
from vmrun.errors import KernelUnfit, UsageError
from vmrun.guest import build
from vmrun.guest.kernelimage import KernelImage, bootable_for, identify, release_of
from vmrun.progress import Progress
from vmrun.qemu.arch import Arch

__all__ = ["MISSING_MARK", "README_SECTION", "guest_hint", "identify_kernel", "missing_options",
           "modules_release_dir", "required_options", "unfit", "user_guest"]

Notice = Callable[[str], None]

# The agent's one line when the kernel lacks what it needs (see agent.sh, check_kernel).
MISSING_MARK = b"vmrun-agent: missing"
_MISSING_LINE = re.compile(rb"vmrun-agent: missing((?: CONFIG_[A-Z0-9_]+)+)")
README_SECTION = "README, 'Your own kernel'"

# What every guest kernel needs built in: the initramfs and its script, busybox, the
# filesystems the agent mounts at once, the console vmrun reads, the host's time (x86).
_BASE_OPTIONS = ("CONFIG_BLK_DEV_INITRD", "CONFIG_BINFMT_ELF", "CONFIG_BINFMT_SCRIPT",
                 "CONFIG_DEVTMPFS", "CONFIG_PROC_FS", "CONFIG_SYSFS", "CONFIG_TMPFS",
                 "CONFIG_UNIX98_PTYS")
_CONSOLE_OPTIONS = {"x86_64": ("CONFIG_SERIAL_8250", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_ACPI"),
                    "i386": ("CONFIG_SERIAL_8250", "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_ACPI"),
                    "aarch64": ("CONFIG_SERIAL_AMBA_PL011", "CONFIG_SERIAL_AMBA_PL011_CONSOLE"),
                    "armv7": ("CONFIG_SERIAL_AMBA_PL011", "CONFIG_SERIAL_AMBA_PL011_CONSOLE"),
                    "riscv64": ("CONFIG_SERIAL_8250", "CONFIG_SERIAL_8250_CONSOLE",
                                "CONFIG_SERIAL_OF_PLATFORM")}
# Built in, or modules given with --modules: the virtio transport and console the channel
# runs on, then what a run's share, network and disk need.
_VIRTIO_OPTIONS = ("CONFIG_VIRTIO_CONSOLE", "CONFIG_NET_9P", "CONFIG_NET_9P_VIRTIO",
                   "CONFIG_9P_FS", "CONFIG_VIRTIO_NET", "CONFIG_VIRTIO_BLK")


def required_options(arch: Arch) -> tuple[str, ...]:
    """The options ARCH's guest kernel must have (=y, or =m with --modules for the virtio
    ones), as listed in the README."""
    return (*_BASE_OPTIONS, *_CONSOLE_OPTIONS.get(arch.name, ()),
            build.TRANSPORT_OPTION[arch.transport], *_VIRTIO_OPTIONS)


def identify_kernel(path: Path, arch: Arch) -> tuple[KernelImage, bytes]:
    """PATH's kind and bytes when it is a kernel QEMU can boot for ARCH; else one line why."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise UsageError(f"--kernel {path} is a directory, not a kernel file",
                         hint="give arch/x86/boot/bzImage, arch/arm64/boot/Image or vmlinux"
                         ) from None
    except OSError as e:
        raise UsageError(f"cannot read --kernel {path}: {e.strerror}") from None
    image = identify(data)
    if image is None:
        raise KernelUnfit(f"--kernel {path} is not a kernel vmrun knows (neither a bzImage, "
                          "an arm64 or RISC-V Image, an arm zImage nor an ELF vmlinux)")
    why = bootable_for(image, arch.name)
    if why is not None:
        raise KernelUnfit(f"--kernel {path}: {why}")
    return image, data


def modules_release_dir(path: Path, release: str | None = None) -> Path:
    """The lib/modules/RELEASE directory --modules PATH means: PATH itself, or the one
    inside a ``make modules_install INSTALL_MOD_PATH=PATH`` tree (the kernel's RELEASE
    where the tree holds several)."""
    if not path.is_dir():
        raise UsageError(f"--modules {path} is not a directory")
    parents = [d for d in (path / "lib/modules", path / "usr/lib/modules") if d.is_dir()]
    if not parents:
        if (path / "modules.dep").is_file() or (path / "kernel").is_dir():
            return path
        raise UsageError(
            f"--modules {path} holds no lib/modules/RELEASE and is no such directory",
            hint="give the INSTALL_MOD_PATH of 'make modules_install', or its "
                 "lib/modules/RELEASE")
    releases = sorted(d for parent in parents for d in parent.iterdir() if d.is_dir())
    if release is not None:
        matching = [d for d in releases if d.name == release]
        if matching:
            return matching[0]
    if len(releases) == 1:
        return releases[0]
    names = ", ".join(d.name for d in releases) or "none"
    raise UsageError(f"--modules {path} holds modules for {names}"
                     + (f", not for the kernel's {release}" if release else ""),
                     hint="give its lib/modules/RELEASE directory")


def user_guest(kernel: Path, arch: Arch, *, modules: Path | None, mirror: str | None,
               notice: Notice, progress: Progress | None,
               insecure_unverified_guest: bool) -> build.Guest:
    """KERNEL with vmrun's initramfs: busybox, the agent and, from MODULES, the modules the
    agent loads (without MODULES every driver must be built in)."""
    from vmrun.guest import modules as modlib

    image, data = identify_kernel(kernel, arch)
    release = release_of(data, image)
    sets: dict[str, list[modlib.Module]] = {name: [] for name in build.MODULE_SETS}
    if modules is not None:
        release_dir = modules_release_dir(modules, release)
        if release is not None and release_dir.name != release:
            raise UsageError(f"--modules {release_dir} is for {release_dir.name}, but the "
                             f"kernel is {release}: its modules would not load")
        release = release_dir.name
        sets = build.module_sets(modlib.scan_modules(release_dir), arch)
    busybox = build.ensure_busybox(arch, mirror=mirror, notice=notice, progress=progress,
                                   insecure_unverified_guest=insecure_unverified_guest)
    initrd = build.cached_initrd(cachelib.cache_dir(), arch=arch, busybox=busybox,
                                 release=release or "unknown", sets=sets)
    kernel = kernel.resolve()  # QEMU may start elsewhere than the user's cwd
    stat = kernel.stat()
    key = cachelib.key_of("user-kernel", str(kernel), str(stat.st_size),
                          str(stat.st_mtime_ns), str(initrd))
    return build.Guest(arch=arch, kernel=kernel, initrd=initrd, release=release or "", key=key)


def missing_options(console: bytes) -> tuple[str, ...]:
    """The options the agent said the kernel lacks, from the console's text; () if none."""
    found = _MISSING_LINE.search(console)
    if found is None:
        return ()
    return tuple(dict.fromkeys(found.group(1).decode().split()))


def unfit(kernel: Path, missing: tuple[str, ...], *, modules: Path | None) -> KernelUnfit:
    """The error for a --kernel that lacks MISSING."""
    where = ("build them in (=y) or as modules in --modules (a module there that does not "
             "load, e.g. built for another kernel, counts as missing)" if modules is not None
             else "build them in (=y), or as modules and give --modules DIR")
    return KernelUnfit(f"--kernel {kernel} lacks {' '.join(missing)}: {where}",
                       missing=missing, hint=f"{README_SECTION} lists every option needed")


def guest_hint(arch: Arch) -> str:
    """What to say when a kernel of the user's never reached the agent and said nothing."""
    return (f"a kernel of your own needs {' '.join(required_options(arch))} "
            f"({README_SECTION}); --console shows its boot")
