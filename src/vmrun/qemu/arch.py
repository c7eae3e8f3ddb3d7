"""One table of everything that differs per guest architecture."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

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


def host_tsc_khz(cpuinfo: str | None = None) -> int | None:
    """The host's TSC rate in kHz, which a TCG x86 guest's TSC runs at; None if unknown."""
    if host_arch() != "x86_64" and cpuinfo is None:
        return None
    try:
        tsc_sysfs = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz")
        if cpuinfo is None and tsc_sysfs.exists():
            return int(tsc_sysfs.read_text())
        text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    except (OSError, ValueError):
        return None
    first_cpu = text.split("\n\n", 1)[0]
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in first_cpu.splitlines())
    )
    if "constant_tsc" not in fields.get("flags", "").split():
        return None
    # Intel's brand string names the nominal clock, which is the TSC rate.
    nominal = re.search(r"@ *([0-9.]+) *GHz", fields.get("model name", ""))
    if nominal:
        return round(float(nominal.group(1)) * 1_000_000)
    try:
        return round(float(fields["cpu MHz"]) * 1000)
    except (KeyError, ValueError):
        return None


def lookup_arch(name: str) -> Arch:
    wanted = name.lower()
    for arch in ARCHES.values():
        if wanted == arch.name or wanted in arch.aliases:
            return arch
    known = ", ".join(sorted(ARCHES))
    raise UsageError(f"unknown architecture {name!r}", hint=f"known: {known}")
