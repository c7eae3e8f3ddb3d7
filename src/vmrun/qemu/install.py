"""Which package installs QEMU for a guest architecture, named for the host's system."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path

from vmrun.qemu.arch import Arch

OS_RELEASE = Path("/etc/os-release")


class System(StrEnum):
    """A packaging family: its install command and its names for QEMU's packages."""

    DEBIAN = "debian"  # Debian, Ubuntu and their derivatives (apt)
    FEDORA = "fedora"  # Fedora, RHEL and their rebuilds (dnf)
    ARCH = "arch"  # Arch Linux and its derivatives (pacman)
    HOMEBREW = "homebrew"  # macOS
    OTHER = "other"


# ID and ID_LIKE values of os-release(5) for each family.
_FAMILIES = {
    "debian": System.DEBIAN, "ubuntu": System.DEBIAN,
    "fedora": System.FEDORA, "rhel": System.FEDORA, "centos": System.FEDORA,
    "arch": System.ARCH, "archlinux": System.ARCH,
}


def system_from_os_release(text: str) -> System:
    """The family an os-release(5) file names in ID, else in ID_LIKE; OTHER if none."""
    fields = dict(
        (key.strip(), value.strip().strip("\"'"))
        for key, sep, value in (line.partition("=") for line in text.splitlines())
        if sep
    )
    for word in [fields.get("ID", ""), *fields.get("ID_LIKE", "").split()]:
        if word.lower() in _FAMILIES:
            return _FAMILIES[word.lower()]
    return System.OTHER


def host_system() -> System:
    if sys.platform == "darwin":
        return System.HOMEBREW
    try:
        return system_from_os_release(OS_RELEASE.read_text(errors="replace"))
    except OSError:
        return System.OTHER


def qemu_target(arch: Arch) -> str:
    """QEMU's own name for the group of targets that builds ARCH's emulator (x86, ppc...)."""
    target = arch.qemu_binary.removeprefix("qemu-system-")
    return {"x86_64": "x86", "i386": "x86", "ppc64": "ppc", "riscv64": "riscv"}.get(
        target, target)


def qemu_package(arch: Arch, system: System) -> str:
    """The package that holds ARCH's emulator on SYSTEM ('' where unknown)."""
    match system:
        case System.DEBIAN:
            return arch.qemu_package
        case System.FEDORA:
            return f"qemu-system-{qemu_target(arch)}-core"
        case System.ARCH:
            return f"qemu-system-{qemu_target(arch)}"
        case System.HOMEBREW:
            return "qemu"
        case _:
            return ""


_INSTALL = {
    System.DEBIAN: "sudo apt-get install {}",
    System.FEDORA: "sudo dnf install {}",
    System.ARCH: "sudo pacman -S {}",
    System.HOMEBREW: "brew install {}",
}


def install_hint(arch: Arch, system: System) -> str:
    """One line saying how to install ARCH's emulator on SYSTEM."""
    if system in _INSTALL:
        return "install it: " + _INSTALL[system].format(qemu_package(arch, system))
    names = ", ".join(f"{label} {qemu_package(arch, family)}" for label, family in (
        ("Debian/Ubuntu", System.DEBIAN), ("Fedora", System.FEDORA),
        ("Arch", System.ARCH), ("Homebrew", System.HOMEBREW)))
    return f"install the package that provides {arch.qemu_binary} ({names})"
