"""One table of everything that differs per guest architecture."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from enum import StrEnum

from vmrun.errors import UsageError


class Transport(StrEnum):
    MMIO = "mmio"
    PCI = "pci"
    CCW = "ccw"


@dataclass(frozen=True)
class Arch:
    name: str
    debian_arch: str
    qemu_binary: str
    qemu_package: str
    machine: str  # for the fast boot: microvm where the arch has it
    cpu_tcg: str
    console: str  # the kernel's name for the serial console
    transport: Transport
    kernel_package: str
    kernel_glob: str  # where the kernel image lies inside the kernel .deb
    suite: str
    aliases: tuple[str, ...] = ()

    @property
    def device_suffix(self) -> str:
        return {Transport.MMIO: "device", Transport.PCI: "pci", Transport.CCW: "ccw"}[
            self.transport
        ]

    def device(self, kind: str) -> str:
        """The QEMU device name of a virtio device on this arch's transport."""
        return f"virtio-{kind}-{self.device_suffix}"


ARCHES: dict[str, Arch] = {
    arch.name: arch
    for arch in (
        Arch(
            name="x86_64",
            debian_arch="amd64",
            qemu_binary="qemu-system-x86_64",
            qemu_package="qemu-system-x86",
            machine="microvm",
            cpu_tcg="max",
            console="ttyS0",
            transport=Transport.MMIO,
            kernel_package="linux-image-amd64",
            kernel_glob="boot/vmlinuz-*",
            suite="bookworm",
            aliases=("amd64", "x86-64"),
        ),
        Arch(
            name="aarch64",
            debian_arch="arm64",
            qemu_binary="qemu-system-aarch64",
            qemu_package="qemu-system-arm",
            machine="virt",
            cpu_tcg="max",
            console="ttyAMA0",
            transport=Transport.MMIO,
            kernel_package="linux-image-arm64",
            kernel_glob="boot/vmlinuz-*",
            suite="bookworm",
            aliases=("arm64",),
        ),
    )
}


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def lookup_arch(name: str) -> Arch:
    wanted = name.lower()
    for arch in ARCHES.values():
        if wanted == arch.name or wanted in arch.aliases:
            return arch
    known = ", ".join(sorted(ARCHES))
    raise UsageError(f"unknown architecture {name!r}", hint=f"known: {known}")
