"""Firmware for a full boot: BIOS (QEMU's own SeaBIOS) or UEFI (OVMF, AAVMF/edk2).

Which one an image needs is read from its partition table: a BIOS boot partition or an
MBR with boot code can boot from BIOS, an EFI system partition from UEFI. Debian's and
Ubuntu's cloud images have both; on x86 vmrun then picks BIOS, which boots seconds faster
under TCG and needs no variable store.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from vmrun.errors import UsageError
from vmrun.images.partitions import SECTOR, gpt_type_guids


class Firmware(StrEnum):
    AUTO = "auto"
    BIOS = "bios"
    UEFI = "uefi"


ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
BIOS_BOOT = uuid.UUID("21686148-6449-6e6f-744e-656564454649")

# UEFI code and variable-store templates, per architecture, in the places Debian, Ubuntu,
# Fedora and Homebrew put them: (code, vars) pairs, first found wins.
_SHARE_DIRS = ("/usr/share", "/usr/local/share", "/opt/homebrew/share")
UEFI_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "x86_64": (
        ("OVMF/OVMF_CODE_4M.fd", "OVMF/OVMF_VARS_4M.fd"),  # Debian 12, Ubuntu 22.04+
        ("OVMF/OVMF_CODE.fd", "OVMF/OVMF_VARS.fd"),  # older Debian and Ubuntu
        ("edk2/ovmf/OVMF_CODE.fd", "edk2/ovmf/OVMF_VARS.fd"),  # Fedora
        ("qemu/edk2-x86_64-code.fd", "qemu/edk2-i386-vars.fd"),  # Homebrew, QEMU's own
    ),
    "aarch64": (
        ("AAVMF/AAVMF_CODE.fd", "AAVMF/AAVMF_VARS.fd"),  # Debian, Ubuntu
        ("edk2/aarch64/QEMU_EFI-pflash.raw", "edk2/aarch64/vars-template-pflash.raw"),  # Fedora
        ("qemu/edk2-aarch64-code.fd", "qemu/edk2-arm-vars.fd"),  # Homebrew, QEMU's own
    ),
    "armv7": (
        ("AAVMF/AAVMF32_CODE.fd", "AAVMF/AAVMF32_VARS.fd"),
        ("qemu/edk2-arm-code.fd", "qemu/edk2-arm-vars.fd"),
    ),
}
UEFI_PACKAGES = {"x86_64": "ovmf", "aarch64": "qemu-efi-aarch64", "armv7": "qemu-efi-arm"}
# Architectures whose QEMU machine boots a disk with firmware of its own (SeaBIOS on x86,
# s390-ccw's loader, SLOF on pseries): no file to find.
BUILTIN_BIOS = frozenset({"x86_64", "i386", "s390x", "ppc64le"})


@dataclass(frozen=True)
class FirmwareFiles:
    kind: Firmware  # BIOS or UEFI, never AUTO
    code: Path | None = None  # UEFI: the read-only code flash
    vars_template: Path | None = None  # UEFI: copied per run into the writable vars flash


def bootable_by(head: bytes) -> set[Firmware]:
    """The firmware kinds the disk whose first sectors are HEAD can boot from."""
    kinds: set[Firmware] = set()
    types = set(gpt_type_guids(head))
    if ESP in types:
        kinds.add(Firmware.UEFI)
    if BIOS_BOOT in types:
        kinds.add(Firmware.BIOS)
    if not types and len(head) >= SECTOR and head[510:512] == b"\x55\xaa":
        if any(head[:440]):  # boot code in the MBR
            kinds.add(Firmware.BIOS)
        partition_types = {head[446 + 16 * i + 4] for i in range(4)}
        if 0xEF in partition_types:  # an EFI system partition in an MBR table
            kinds.add(Firmware.UEFI)
    return kinds


def choose_firmware(arch: str, requested: Firmware, bootable: set[Firmware],
                    image: str) -> Firmware:
    """The firmware to boot IMAGE with on ARCH: REQUESTED, or what the image can boot."""
    supported = {Firmware.UEFI} if arch in UEFI_PAIRS else set()
    if arch in BUILTIN_BIOS:
        supported.add(Firmware.BIOS)
    if requested != Firmware.AUTO:
        if requested not in supported:
            raise UsageError(f"{arch} guests cannot boot with {requested} firmware here",
                             hint="--firmware " + " or ".join(sorted(supported)))
        return requested
    if arch in ("s390x", "ppc64le"):
        return Firmware.BIOS  # their machine's own loader reads the disk
    # BIOS first: under TCG it reaches the bootloader seconds before OVMF does.
    for kind in (Firmware.BIOS, Firmware.UEFI):
        if kind in supported and kind in bootable:
            return kind
    if not bootable:
        raise UsageError(f"image {image} has no bootloader vmrun can tell (no EFI system "
                         "partition, BIOS boot partition or MBR boot code)",
                         hint="use --boot fast to run in its root partition instead, "
                         "or --firmware bios|uefi to try anyway")
    raise UsageError(f"image {image} boots with {'/'.join(sorted(bootable))}, which {arch} "
                     "guests cannot use")


def find_uefi(arch: str, share_dirs: Iterable[str] = _SHARE_DIRS) -> FirmwareFiles:
    """The UEFI firmware for ARCH installed here; UsageError naming the package if none."""
    pairs: Sequence[tuple[str, str]] = UEFI_PAIRS.get(arch, ())
    extra = os.environ.get("VMRUN_UEFI_CODE"), os.environ.get("VMRUN_UEFI_VARS")
    if extra[0] and extra[1]:
        return FirmwareFiles(Firmware.UEFI, Path(extra[0]), Path(extra[1]))
    for share in share_dirs:
        for code, variables in pairs:
            code_path, vars_path = Path(share) / code, Path(share) / variables
            if code_path.is_file() and vars_path.is_file():
                return FirmwareFiles(Firmware.UEFI, code_path, vars_path)
    package = UEFI_PACKAGES.get(arch)
    raise UsageError(f"no UEFI firmware for {arch} guests found",
                     hint=(f"apt-get install {package} (or set VMRUN_UEFI_CODE and "
                           "VMRUN_UEFI_VARS)") if package else None)


def firmware_files(arch: str, kind: Firmware) -> FirmwareFiles:
    if kind == Firmware.UEFI:
        return find_uefi(arch)
    return FirmwareFiles(Firmware.BIOS)
