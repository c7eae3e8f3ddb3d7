"""What a kernel file is (bzImage, arm64 Image, ELF vmlinux, ...) and for which architecture,
from its header alone; and which of them QEMU can boot as ``-kernel`` for an architecture."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from vmrun.errors import VmrunError
from vmrun.guest.kernel import has_pvh_note, kernel_release_from_bzimage

__all__ = ["KernelImage", "bootable_for", "identify", "release_of"]

# ELF e_machine -> vmrun's architecture name.
_ELF_MACHINES = {62: "x86_64", 3: "i386", 183: "aarch64", 40: "armv7", 243: "riscv64",
                 21: "ppc64le", 22: "s390x"}
_BZIMAGE_MAGIC_AT = 0x202
_XLOADFLAGS_AT = 0x236
_XLF_KERNEL_64 = 1
_IMAGE_MAGIC_AT = 0x38  # arm64 and riscv64 Image headers
_ZIMAGE_MAGIC_AT = 0x24  # 32-bit arm zImage
_ZIMAGE_MAGIC = 0x016F2818
_GZIP = b"\x1f\x8b"
_PEEK = 0x40  # bytes of a compressed Image's header worth decompressing


@dataclass(frozen=True)
class KernelImage:
    """A kernel file's format (as a reader would name it) and its architecture."""

    format: str  # "bzImage", "ELF vmlinux", "arm64 Image", ...
    arch: str  # vmrun's architecture name
    compressed: bool = False  # gzip around it (arm64's vmlinuz)
    pvh: bool = False  # an x86 ELF with a PVH entry point, which QEMU needs to boot it


def identify(data: bytes) -> KernelImage | None:
    """What DATA (a kernel file's bytes, or at least its first 64 KiB; an ELF whole) is;
    None when it is no kernel vmrun knows."""
    if data[:4] == b"\x7fELF":
        return _elf(data)
    if len(data) >= 0x250 and data[_BZIMAGE_MAGIC_AT : _BZIMAGE_MAGIC_AT + 4] == b"HdrS":
        version, = struct.unpack_from("<H", data, _BZIMAGE_MAGIC_AT + 4)
        is64 = version >= 0x20C and data[_XLOADFLAGS_AT] & _XLF_KERNEL_64
        return KernelImage("bzImage", "x86_64" if is64 else "i386")
    if data[:2] == _GZIP:
        inner = _peek_gzip(data)
        found = _raw_image(inner) if inner is not None else None
        return None if found is None else KernelImage(found.format, found.arch, compressed=True)
    if data[:2] == b"MZ" and data[4:8] == b"zimg":
        return KernelImage("EFI zboot image", _pe_arch(data) or "unknown")
    return _raw_image(data)


def _raw_image(data: bytes) -> KernelImage | None:
    magic = data[_IMAGE_MAGIC_AT : _IMAGE_MAGIC_AT + 4]
    if magic == b"ARM\x64":
        return KernelImage("arm64 Image", "aarch64")
    if magic == b"RSC\x05":
        return KernelImage("RISC-V Image", "riscv64")
    if len(data) >= _ZIMAGE_MAGIC_AT + 4 and struct.unpack_from(
            "<I", data, _ZIMAGE_MAGIC_AT)[0] == _ZIMAGE_MAGIC:
        return KernelImage("arm zImage", "armv7")
    return None


def _elf(data: bytes) -> KernelImage | None:
    if len(data) < 0x34 or data[5] not in (1, 2):
        return None
    machine, = struct.unpack_from("<H" if data[5] == 1 else ">H", data, 0x12)
    arch = _ELF_MACHINES.get(machine)
    if arch is None:
        return None
    if arch == "ppc64le" and data[5] != 1:
        arch = "ppc64"  # big-endian: no vmrun guest
    pvh = False
    if arch in ("x86_64", "i386"):
        try:
            pvh = has_pvh_note(data)
        except VmrunError:
            return None
    return KernelImage("ELF vmlinux", arch, pvh=pvh)


def _peek_gzip(data: bytes) -> bytes | None:
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[: 1 << 16], _PEEK)
    except zlib.error:
        return None


def _pe_arch(data: bytes) -> str | None:
    """The architecture a PE file (an EFI zboot kernel) is for."""
    if len(data) < 0x40:
        return None
    pe, = struct.unpack_from("<I", data, 0x3C)
    if len(data) < pe + 6 or data[pe : pe + 4] != b"PE\0\0":
        return None
    machine, = struct.unpack_from("<H", data, pe + 4)
    return {0xAA64: "aarch64", 0x5064: "riscv64", 0x8664: "x86_64"}.get(machine)


def bootable_for(image: KernelImage, arch: str) -> str | None:
    """Why QEMU cannot boot IMAGE as ARCH's ``-kernel``; None when it can."""
    if image.arch != arch:
        return (f"it is a kernel for {image.arch} ({image.format}), not for {arch}: "
                f"use --arch {image.arch}")
    if image.format == "EFI zboot image":
        return ("an EFI zboot kernel (CONFIG_EFI_ZBOOT) is not loaded by QEMU's -kernel: "
                f"give arch/{_KERNEL_DIR.get(arch, arch)}/boot/Image instead")
    if image.format == "ELF vmlinux" and arch in ("x86_64", "i386") and not image.pvh:
        return ("an x86 ELF vmlinux boots only through its PVH entry, which it lacks: "
                "build with CONFIG_PVH=y or give arch/x86/boot/bzImage")
    if image.format == "ELF vmlinux" and arch in ("aarch64", "armv7", "riscv64"):
        return (f"QEMU enters a {arch} ELF vmlinux without the Linux boot protocol: "
                f"give arch/{_KERNEL_DIR[arch]}/boot/{'zImage' if arch == 'armv7' else 'Image'}")
    if image.compressed and arch != "aarch64":
        return f"QEMU does not decompress a gzip-compressed {arch} kernel: give it uncompressed"
    return None


_KERNEL_DIR = {"aarch64": "arm64", "armv7": "arm", "riscv64": "riscv", "x86_64": "x86",
               "i386": "x86"}


def release_of(data: bytes, image: KernelImage) -> str | None:
    """The release (``uname -r``) the kernel in DATA announces, where it can be read
    without decompressing the kernel; None otherwise."""
    if image.format == "bzImage":
        return kernel_release_from_bzimage(data)
    if image.compressed or image.format == "EFI zboot image":
        return None
    at = data.find(b"Linux version ")
    while at >= 0:
        words = data[at + 14 : at + 14 + 128].split(b" ", 1)
        word = words[0].decode("ascii", "replace")
        if word and word[0].isdigit() and "\0" not in word:
            return word
        at = data.find(b"Linux version ", at + 1)
    return None
