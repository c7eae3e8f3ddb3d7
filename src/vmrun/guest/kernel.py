"""Turn an x86 bzImage into the ELF vmlinux inside it, which QEMU can boot directly (PVH).

PVH boot skips the real-mode setup code and the kernel's self-decompression, the
slowest steps of booting under TCG.
"""

from __future__ import annotations

import bz2
import importlib
import lzma
import struct
import zlib

from vmrun.errors import VmrunError

__all__ = ["extract_vmlinux", "has_pvh_note", "kernel_release_from_bzimage"]

_HDRS_OFFSET = 0x202
_SETUP_SECTS = 0x1F1
_VERSION = 0x206
_KERNEL_VERSION = 0x20E
_PAYLOAD_OFFSET = 0x248
_PAYLOAD_LENGTH = 0x24C

_PT_NOTE = 4
_SHT_NOTE = 7
_SHT_NOBITS = 8
_XEN_ELFNOTE_PHYS32_ENTRY = 18


def _is_bzimage(image: bytes) -> bool:
    return len(image) >= 0x250 and image[_HDRS_OFFSET : _HDRS_OFFSET + 4] == b"HdrS"


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside an x86 bzImage.

    An image that already is ELF is returned unchanged. Data the build appends after
    the ELF file (the relocation table of a relocatable kernel) is dropped.
    """
    if bzimage[:4] == b"\x7fELF":
        return bzimage
    if not _is_bzimage(bzimage):
        raise VmrunError("not an x86 bzImage: no 'HdrS' magic at offset 0x202")
    version, = struct.unpack_from("<H", bzimage, _VERSION)
    if version < 0x208:
        raise VmrunError(
            f"bzImage boot protocol {version >> 8}.{version & 0xFF:02d} is too old "
            "to locate its payload (need 2.08)"
        )
    setup_sects = bzimage[_SETUP_SECTS] or 4
    offset, length = struct.unpack_from("<II", bzimage, _PAYLOAD_OFFSET)
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(bzimage):
        raise VmrunError(
            f"bzImage payload (offset {start:#x}, length {length}) lies outside the file"
        )
    # Decompress from the payload start to the end of the file rather than trusting
    # payload_length, and require the stream to end: that is what tells us it is whole.
    vmlinux = _decompress(bzimage[start:])
    if vmlinux[:4] != b"\x7fELF":
        raise VmrunError("bzImage payload did not decompress to an ELF file")
    return vmlinux[: _elf_end(vmlinux)]


def _decompress(data: bytes) -> bytes:
    if data.startswith(b"\xfd7zXZ\x00"):
        return _lzma(data, lzma.FORMAT_XZ, "xz")
    if data.startswith(b"\x1f\x8b"):
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = inflater.decompress(data)
        except zlib.error as e:
            raise VmrunError(f"corrupt gzip payload in bzImage: {e}") from e
        if not inflater.eof:
            raise VmrunError("gzip payload in bzImage is truncated")
        return out
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        return _zstd(data)
    if data.startswith(b"\x5d\x00\x00"):
        return _lzma(data, lzma.FORMAT_ALONE, "lzma")
    if data.startswith(b"BZh"):
        bunzip = bz2.BZ2Decompressor()
        try:
            out = bunzip.decompress(data)
        except OSError as e:
            raise VmrunError(f"corrupt bzip2 payload in bzImage: {e}") from e
        if not bunzip.eof:
            raise VmrunError("bzip2 payload in bzImage is truncated")
        return out
    for magic, name in ((b"\x02\x21\x4c\x18", "lz4"), (b"\x89LZO", "lzo")):
        if data.startswith(magic):
            raise VmrunError(
                f"bzImage payload is {name}-compressed, which vmrun cannot decompress",
                hint="use a kernel compressed with xz, gzip or zstd, or pass a vmlinux",
            )
    raise VmrunError(f"bzImage payload has an unknown compression (starts {data[:6].hex()})")


def _lzma(data: bytes, fmt: int, name: str) -> bytes:
    decompressor = lzma.LZMADecompressor(format=fmt)
    try:
        out = decompressor.decompress(data)
    except lzma.LZMAError as e:
        raise VmrunError(f"corrupt {name} payload in bzImage: {e}") from e
    if not decompressor.eof:
        raise VmrunError(f"{name} payload in bzImage is truncated")
    return out


def _zstd(data: bytes) -> bytes:
    try:
        zstandard = importlib.import_module("zstandard")
    except ImportError:
        raise VmrunError(
            "bzImage payload is zstd-compressed and the 'zstandard' package is missing",
            hint="pip install zstandard",
        ) from None
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
        out: bytes = decompressor.decompress(data)
    except zstandard.ZstdError as e:
        raise VmrunError(f"corrupt zstd payload in bzImage: {e}") from e
    # Older zstandard releases have no .eof; a truncated frame then shows up as a bad ELF.
    if not getattr(decompressor, "eof", True):
        raise VmrunError("zstd payload in bzImage is truncated")
    return out


def _elf_layout(elf: bytes) -> tuple[str, bool]:
    if len(elf) < 0x34 or elf[:4] != b"\x7fELF":
        raise VmrunError("not an ELF file")
    if elf[4] not in (1, 2) or elf[5] not in (1, 2):
        raise VmrunError(f"unsupported ELF class/encoding {elf[4]}/{elf[5]}")
    return ("<" if elf[5] == 1 else ">"), elf[4] == 2


def _program_headers(elf: bytes) -> list[tuple[int, int, int]]:
    """(p_type, p_offset, p_filesz) of each program header."""
    end, is64 = _elf_layout(elf)
    if is64:
        phoff, = struct.unpack_from(end + "Q", elf, 0x20)
        phentsize, phnum = struct.unpack_from(end + "HH", elf, 0x36)
        fmt, fields = end + "IIQQQQ", (0, 2, 5)
    else:
        phoff, = struct.unpack_from(end + "I", elf, 0x1C)
        phentsize, phnum = struct.unpack_from(end + "HH", elf, 0x2A)
        fmt, fields = end + "IIIIII", (0, 1, 4)
    out = []
    for i in range(phnum if phoff else 0):
        ph = struct.unpack_from(fmt, elf, phoff + i * phentsize)
        out.append((ph[fields[0]], ph[fields[1]], ph[fields[2]]))
    return out


def _section_headers(elf: bytes) -> list[tuple[int, int, int]]:
    """(sh_type, sh_offset, sh_size) of each section header."""
    end, is64 = _elf_layout(elf)
    if is64:
        shoff, = struct.unpack_from(end + "Q", elf, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", elf, 0x3A)
        fmt = end + "IIQQQQ"
    else:
        shoff, = struct.unpack_from(end + "I", elf, 0x20)
        shentsize, shnum = struct.unpack_from(end + "HH", elf, 0x2E)
        fmt = end + "IIIIII"
    if not shoff:
        return []
    if shnum == 0:  # extended numbering: the count lives in section 0's sh_size
        shnum = struct.unpack_from(fmt, elf, shoff)[5]
    out = []
    for i in range(shnum):
        sh = struct.unpack_from(fmt, elf, shoff + i * shentsize)
        out.append((sh[1], sh[4], sh[5]))
    return out


def _elf_end(elf: bytes) -> int:
    """Where the ELF file proper ends: past that, a bzImage payload holds relocations."""
    try:
        end, is64 = _elf_layout(elf)
        if is64:
            phoff, shoff = struct.unpack_from(end + "QQ", elf, 0x20)
            phentsize, phnum, shentsize = struct.unpack_from(end + "HHH", elf, 0x36)
        else:
            phoff, shoff = struct.unpack_from(end + "II", elf, 0x1C)
            phentsize, phnum, shentsize = struct.unpack_from(end + "HHH", elf, 0x2A)
        sections = _section_headers(elf)
        ends: list[int] = [0x40 if is64 else 0x34, phoff + phnum * phentsize]
        if sections:
            ends.append(shoff + len(sections) * shentsize)
        ends += [off + size for _, off, size in _program_headers(elf)]
        ends += [off + size for kind, off, size in sections if kind != _SHT_NOBITS]
    except struct.error as e:
        raise VmrunError(f"truncated ELF kernel: {e}") from e
    last = max(ends)
    if last > len(elf):
        raise VmrunError("ELF kernel is truncated: its headers point past the end")
    return last


def _notes(elf: bytes, offset: int, size: int, end: str) -> list[tuple[bytes, int]]:
    """(owner, type) of each note in a note segment or section."""
    out = []
    pos, stop = offset, min(offset + size, len(elf))
    while pos + 12 <= stop:
        namesz, descsz, kind = struct.unpack_from(end + "III", elf, pos)
        pos += 12
        owner = elf[pos : pos + namesz].rstrip(b"\0")
        pos += namesz + (-namesz % 4)
        pos += descsz + (-descsz % 4)
        if pos > stop:
            break
        out.append((owner, kind))
    return out


def has_pvh_note(elf: bytes) -> bool:
    """Whether an ELF kernel has a PVH entry point (a Xen PHYS32_ENTRY note).

    QEMU boots an ELF ``-kernel`` through PVH only when this note is present.
    """
    try:
        end, _ = _elf_layout(elf)
        regions = [(off, size) for kind, off, size in _program_headers(elf) if kind == _PT_NOTE]
        regions += [(off, size) for kind, off, size in _section_headers(elf) if kind == _SHT_NOTE]
        return any(
            owner == b"Xen" and kind == _XEN_ELFNOTE_PHYS32_ENTRY
            for off, size in regions
            for owner, kind in _notes(elf, off, size, end)
        )
    except struct.error as e:
        raise VmrunError(f"truncated ELF kernel: {e}") from e


def kernel_release_from_bzimage(bzimage: bytes) -> str | None:
    """The release (``uname -r``) a bzImage announces, or None if it names none."""
    if not _is_bzimage(bzimage):
        return None
    pointer, = struct.unpack_from("<H", bzimage, _KERNEL_VERSION)
    if pointer == 0:
        return None
    start = pointer + 0x200
    stop = bzimage.find(b"\0", start, start + 512)
    if stop < 0:
        return None
    words = bzimage[start:stop].decode("ascii", "replace").split()
    return words[0] if words else None
