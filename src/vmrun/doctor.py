"""What runs need, checked on this host without downloading or booting anything."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from vmrun import cache as cachelib
from vmrun import config
from vmrun.debian.archive import KEYRING_ENV, find_verifier, keyring_path
from vmrun.errors import UsageError, VmrunError
from vmrun.qemu import accel as accellib
from vmrun.qemu import process
from vmrun.qemu.arch import ARCHES, Arch, host_arch
from vmrun.qemu.firmware import BUILTIN_BIOS, UEFI_PACKAGES, find_uefi
from vmrun.qemu.install import host_system, install_hint
from vmrun.share import find_virtiofsd

LOW_SPACE = 2 << 30  # bytes free in the cache below which a pull may not fit


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"  # works, but slower or without a feature
    UNKNOWN = "unknown"  # cannot be told without doing what doctor does not (a boot)
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    """One thing a run needs: what was found, and the fix when it is a problem."""

    name: str
    status: Status
    detail: str
    fix: str = ""
    required: bool = False  # a FAIL here makes doctor exit non-zero

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def apt(package: str) -> str:
    return f"apt-get install {package}"


def check_qemu(arch: Arch, *, required: bool) -> Check:
    name = f"qemu {arch.name}"
    path = shutil.which(arch.qemu_binary)
    if path is None:
        return Check(name, Status.FAIL, f"{arch.qemu_binary} not found",
                     fix=install_hint(arch, host_system()).removeprefix("install it: "),
                     required=required)
    try:
        version = process.qemu_version(path)
    except VmrunError as error:
        return Check(name, Status.FAIL, str(error), fix=f"reinstall {arch.qemu_package}",
                     required=required)
    return Check(name, Status.OK, f"{path} (QEMU {version or 'of unknown version'})",
                 required=required)


def check_accel(arch: Arch, cache: Path) -> Check:
    """KVM or HVF for guests of the host's architecture, from what runs found out."""
    system = platform.system()
    if system == "Darwin":
        return _check_hvf()
    if system != "Linux":
        return Check("accel", Status.WARN, f"no accelerator known for {system}; runs use TCG")
    if not os.path.exists("/dev/kvm"):
        return Check("kvm", Status.WARN, "no /dev/kvm; runs use TCG (slower)",
                     fix="enable virtualization in the firmware and load kvm_intel or kvm_amd")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Check("kvm", Status.WARN, "/dev/kvm is not accessible to this user; runs use "
                     "TCG (slower)", fix="sudo usermod -aG kvm $USER, then log in again")
    qemu = shutil.which(arch.qemu_binary)
    answer = accellib.remembered_kvm(qemu, arch.machine, cache) if qemu else None
    if answer is None:
        return Check("kvm", Status.UNKNOWN, "/dev/kvm is accessible; whether it runs a guest "
                     "is unknown, not probed yet (the next run probes it)")
    if answer[0] is None:
        return Check("kvm", Status.OK, "/dev/kvm works (a test boot in this host boot)")
    return Check("kvm", Status.WARN, f"/dev/kvm is present but unusable: {answer[0]}; runs "
                 "use TCG (slower)", fix="a nested or broken KVM: check the host's "
                 "hypervisor, or use --accel tcg")


def _check_hvf() -> Check:
    try:
        answer = subprocess.run(["sysctl", "-n", "kern.hv_support"], capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        answer = ""
    if answer == "1":
        return Check("hvf", Status.OK, "Hypervisor.framework is supported")
    return Check("hvf", Status.WARN, "Hypervisor.framework is not supported; runs use TCG")


def check_firmware(arch: Arch) -> Check:
    """Firmware for --boot full (fast boots need none)."""
    name = f"firmware {arch.name}"
    try:
        uefi: str | None = str(find_uefi(arch.name).code)
    except UsageError:
        uefi = None
    package = UEFI_PACKAGES.get(arch.name)
    if uefi is not None:
        return Check(name, Status.OK, f"UEFI {uefi}")
    if arch.name in BUILTIN_BIOS:
        detail = "BIOS built into QEMU" + (" (no UEFI for --boot full --firmware uefi)"
                                           if package else "")
        return Check(name, Status.OK if package is None else Status.WARN, detail,
                     fix=apt(package) if package else "")
    if package is None:  # nothing to install: fast boots need no firmware
        return Check(name, Status.OK, f"none needed; --boot full has no firmware for "
                     f"{arch.name} guests")
    return Check(name, Status.WARN, "no UEFI firmware: --boot full cannot boot images",
                 fix=apt(package))


def check_virtiofsd() -> Check:
    found = find_virtiofsd()
    if found is None:
        return Check("virtiofsd", Status.WARN, "not found; the working directory is shared "
                     "over 9p (slower)", fix=apt("virtiofsd"))
    return Check("virtiofsd", Status.OK, found)


def check_verifier() -> Check:
    found = find_verifier()
    if found is None:
        return Check("signature check", Status.FAIL, "neither gpgv nor sqv found: the guest "
                     "kernel cannot be verified", fix=apt("gpgv") + " (or sqv)", required=True)
    return Check("signature check", Status.OK, f"{found.tool}: {found.path}", required=True)


def check_keyring() -> Check:
    keyring = keyring_path()
    if keyring.is_file() and os.access(keyring, os.R_OK):
        return Check("debian keys", Status.OK, str(keyring), required=True)
    fix = (f"point ${KEYRING_ENV} at a keyring, or unset it" if os.environ.get(KEYRING_ENV)
           else "reinstall vmrun (the keys ship in vmrun/debian/keys)")
    return Check("debian keys", Status.FAIL, f"{keyring} is missing or unreadable", fix=fix,
                 required=True)


def check_tool(command: str, purpose: str, package: str) -> Check:
    found = shutil.which(command)
    if found is None:
        return Check(command, Status.WARN, f"not found: {purpose}", fix=apt(package))
    return Check(command, Status.OK, found)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_cache(cache: Path) -> Check:
    """The cache directory: writable (or creatable) and with room to spare."""
    where = _existing(cache)
    if not (where.is_dir() and os.access(where, os.W_OK | os.X_OK)):
        return Check("cache", Status.FAIL, f"{cache}: {where} is not a writable directory",
                     fix="set VMRUN_CACHE_DIR to a writable directory", required=True)
    free = shutil.disk_usage(where).free
    detail = f"{cache}, {free / 2**30:.1f} GiB free"
    if free < LOW_SPACE:
        return Check("cache", Status.WARN, detail + "; images may not fit",
                     fix="free space, or set VMRUN_CACHE_DIR elsewhere; vmrun image prune",
                     required=True)
    return Check("cache", Status.OK, detail, required=True)


def check_config() -> Check:
    path = config.config_path(os.environ)
    try:
        defaults = config.run_defaults()
    except VmrunError as error:
        return Check("config", Status.FAIL, str(error), fix=error.hint or "fix or remove it",
                     required=True)
    if not defaults:
        return Check("config", Status.OK, "built-in defaults", required=True)
    shown = ", ".join(f"{key}={value}" for key, value in defaults.items())
    return Check("config", Status.OK, f"{path or 'environment'}: {shown}", required=True)


def run_checks(arches: Sequence[Arch] | None = None) -> list[Check]:
    """Every check, for ARCHES (None: every architecture, the host's one required)."""
    host = ARCHES.get(host_arch())
    cache = cachelib.cache_dir()
    chosen = list(arches) if arches is not None else list(ARCHES.values())

    def required(arch: Arch) -> bool:
        return arches is not None or arch == host

    checks: list[Check] = [check_config()]
    checks += [check_qemu(arch, required=required(arch)) for arch in chosen]
    if host is not None and host in chosen:
        checks.append(check_accel(host, cache))
    checks += [check_firmware(arch) for arch in chosen]
    tools: list[Callable[[], Check]] = [
        check_virtiofsd, check_verifier, check_keyring,
        lambda: check_tool("qemu-img", "disk images (--image FILE, vmrun disk) cannot be "
                           "used", "qemu-utils"),
        lambda: check_tool("tar2sqfs", "OCI images (--image docker://...) cannot be run",
                           "squashfs-tools-ng"),
        lambda: check_tool("ssh", "--boot full cannot reach its guest", "openssh-client"),
        lambda: check_tool("mmdebstrap", "--packages and vmrun image build cannot build "
                           "from packages", "mmdebstrap"),
        *(functools.partial(check_tool, tool, "vmrun image build cannot make a disk",
                            package) for tool, package in BUILD_TOOLS),
        lambda: check_cache(cache),
    ]
    return checks + [check() for check in tools]


# What `vmrun image build` runs on the host besides mmdebstrap, and the package of each.
BUILD_TOOLS = (("mke2fs", "e2fsprogs"), ("sfdisk", "fdisk"), ("mkfs.vfat", "dosfstools"),
               ("mcopy", "mtools"), ("grub-mkimage", "grub-common"))


def healthy(checks: Sequence[Check]) -> bool:
    """Whether every required check passed (WARN and UNKNOWN do not fail doctor)."""
    return not any(check.required and check.status == Status.FAIL for check in checks)
