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
    little_endian: bool
    bits: int
    aliases: tuple[str, ...] = ()
    kernel_args: tuple[str, ...] = ()
    virtiofs: bool = True  # whether virtiofsd can serve this guest (else 9p)
    full_machine: str = ""  # for --boot full (the image's own firmware); "": machine

    @property
    def full_transport(self) -> Transport:
        """Full boots use a machine with PCI (or CCW on s390x), never virtio-mmio."""
        return Transport.CCW if self.transport == Transport.CCW else Transport.PCI

    @property
    def device_suffix(self) -> str:
        return {Transport.MMIO: "device", Transport.PCI: "pci", Transport.CCW: "ccw"}[
            self.transport
        ]

    def device(self, kind: str) -> str:
        """The QEMU device name of a virtio device on this arch's transport."""
        return f"virtio-{kind}-{self.device_suffix}"


# Kernel arguments every x86 guest gets: a TSC that is not re-checked against timers
# that TCG emulates unevenly, and the CPU's RNG trusted for early entropy.
X86_ARGS = ("tsc=reliable", "no_timer_check", "random.trust_cpu=on")

ARCHES: dict[str, Arch] = {
    arch.name: arch
    for arch in (
        Arch(
            name="x86_64", debian_arch="amd64", aliases=("amd64", "x86-64"),
            qemu_binary="qemu-system-x86_64", qemu_package="qemu-system-x86",
            machine="microvm", cpu_tcg="max", console="ttyS0", transport=Transport.MMIO,
            kernel_package="linux-image-amd64", kernel_glob="boot/vmlinuz-*",
            suite="bookworm", kernel_args=X86_ARGS, little_endian=True, bits=64,
            full_machine="q35",
        ),
        Arch(
            # cortex-a57 (ARMv8.0, the Debian arm64 baseline): -cpu max emulates pointer
            # authentication at great cost and boots five times slower under TCG.
            name="aarch64", debian_arch="arm64", aliases=("arm64",),
            qemu_binary="qemu-system-aarch64", qemu_package="qemu-system-arm",
            machine="virt", cpu_tcg="cortex-a57", console="ttyAMA0", transport=Transport.MMIO,
            kernel_package="linux-image-arm64", kernel_glob="boot/vmlinuz-*",
            suite="bookworm", little_endian=True, bits=64, full_machine="virt",
        ),
        Arch(
            name="armv7", debian_arch="armhf", aliases=("armhf", "arm", "armv7l"),
            qemu_binary="qemu-system-arm", qemu_package="qemu-system-arm",
            machine="virt,highmem=off", cpu_tcg="cortex-a15", console="ttyAMA0",
            transport=Transport.MMIO, kernel_package="linux-image-armmp",
            kernel_glob="boot/vmlinuz-*", suite="bookworm", little_endian=True, bits=32,
        ),
        Arch(
            name="i386", debian_arch="i386", aliases=("i686", "x86"),
            qemu_binary="qemu-system-i386", qemu_package="qemu-system-x86",
            machine="microvm", cpu_tcg="max", console="ttyS0", transport=Transport.MMIO,
            kernel_package="linux-image-686", kernel_glob="boot/vmlinuz-*",
            suite="bookworm", kernel_args=X86_ARGS, little_endian=True, bits=32,
            full_machine="q35",
        ),
        Arch(
            name="s390x", debian_arch="s390x", aliases=(),
            qemu_binary="qemu-system-s390x", qemu_package="qemu-system-misc",
            machine="s390-ccw-virtio", cpu_tcg="max", console="ttysclp0",
            transport=Transport.CCW, kernel_package="linux-image-s390x",
            kernel_glob="boot/vmlinuz-*", suite="bookworm", little_endian=False, bits=64,
            # FUSE messages travel in the guest's byte order and virtiofsd does not
            # convert them; 9p's wire format is fixed little-endian.
            virtiofs=False,
        ),
        Arch(
            name="ppc64le", debian_arch="ppc64el", aliases=("ppc64el", "powerpc64le"),
            qemu_binary="qemu-system-ppc64", qemu_package="qemu-system-ppc",
            # TCG cannot provide the Spectre mitigations pseries asks for by default.
            machine="pseries,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,"
            "cap-ccf-assist=off", cpu_tcg="power9", console="hvc0", transport=Transport.PCI,
            kernel_package="linux-image-powerpc64le", kernel_glob="boot/vmlinux-*",
            suite="bookworm", little_endian=True, bits=64,
            # Debian's ppc64el kernel uses 64 KiB pages; bookworm's virtiofsd then fails
            # file opens with EINVAL (seen here), so this guest shares over 9p.
            virtiofs=False,
        ),
        Arch(
            # riscv64 is an official Debian architecture from trixie on.
            name="riscv64", debian_arch="riscv64", aliases=(),
            qemu_binary="qemu-system-riscv64", qemu_package="qemu-system-misc",
            machine="virt", cpu_tcg="rv64", console="ttyS0", transport=Transport.MMIO,
            kernel_package="linux-image-riscv64", kernel_glob="boot/vmlinu*-*",
            suite="trixie", little_endian=True, bits=64,
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
