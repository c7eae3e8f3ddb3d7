from __future__ import annotations

import bz2
import gzip
import importlib
import lzma
import os
import re
import struct
import sys
from pathlib import Path

import pytest

from vmrun.errors import VmrunError
from vmrun.guest.kernel import extract_vmlinux, has_pvh_note, kernel_release_from_bzimage


def cached_amd64_kernels() -> list[Path]:
    """The amd64 bzImages the guest cache holds (the VM tests, which run first, fetch one)."""
    cache = Path(os.environ.get("VMRUN_CACHE_DIR", "/nonexistent")) / "kernels"
    found = []
    for image in sorted(cache.glob("*/vmlinuz")):
        release = kernel_release_from_bzimage(image.read_bytes()[:1 << 16])
        if release is not None and release.endswith("-amd64"):
            found.append(image)
    return found
PHYS32_ENTRY = 18


def note(owner: bytes, kind: int, desc: bytes, end: str = "<") -> bytes:
    name = owner + b"\0"
    return (
        struct.pack(end + "III", len(name), len(desc), kind)
        + name + bytes(-len(name) % 4)
        + desc + bytes(-len(desc) % 4)
    )


def fake_kernel(
    notes: bytes, *, is64: bool = True, little: bool = True, in_segment: bool = True,
    in_section: bool = True,
) -> bytes:
    """An ELF executable with one PT_LOAD of code and the notes in a PT_NOTE / SHT_NOTE."""
    end = "<" if little else ">"
    ehsize = 0x40 if is64 else 0x34
    ph_fmt = end + ("IIQQQQQQ" if is64 else "IIIIIIII")
    sh_fmt = end + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII")
    phentsize, shentsize = struct.calcsize(ph_fmt), struct.calcsize(sh_fmt)
    code = b"\x90" * 4096
    shstrtab = b"\0.text\0.notes\0.shstrtab\0.bss\0"
    phnum = 1 + in_segment
    code_off = ehsize + phnum * phentsize
    notes_off = code_off + len(code)
    strtab_off = notes_off + len(notes)
    shoff = strtab_off + len(shstrtab)
    shoff += -shoff % 8
    shnum = 4 + in_section

    def phdr(kind: int, off: int, size: int) -> bytes:
        addr = 0x1000000 + off
        if is64:
            return struct.pack(ph_fmt, kind, 5, off, addr, addr, size, size, 4)
        return struct.pack(ph_fmt, kind, off, addr, addr, size, size, 5, 4)

    def shdr(name: int, kind: int, off: int, size: int) -> bytes:
        return struct.pack(sh_fmt, name, kind, 0, 0, off, size, 0, 0, 4, 0)

    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1 if little else 2, 1]) + bytes(9)
    hfmt = end + ("HHIQQQIHHHHHH" if is64 else "HHIIIIIHHHHHH")
    header = ident + struct.pack(
        hfmt, 2, 62 if is64 else 3, 1, 0x1000000, ehsize, shoff, 0, ehsize, phentsize, phnum,
        shentsize, shnum, shnum - 1,
    )
    phdrs = phdr(1, code_off, len(code)) + (phdr(4, notes_off, len(notes)) if in_segment else b"")
    body = header + phdrs + code + notes + shstrtab
    sections = [
        shdr(0, 0, 0, 0),
        shdr(1, 1, code_off, len(code)),
        # A NOBITS section whose offset+size lies past the file: must not count.
        shdr(24, 8, shoff, 1 << 20),
    ]
    if in_section:
        sections.append(shdr(7, 7, notes_off, len(notes)))
    sections.append(shdr(14, 3, strtab_off, len(shstrtab)))
    return body + bytes(shoff - len(body)) + b"".join(sections)


PVH_NOTES = note(b"Linux", 6, b"6.1.0\0") + note(b"Xen", PHYS32_ENTRY, struct.pack("<I", 0x1000))


def bzimage(
    payload: bytes, *, setup_sects: int = 3, payload_length: int | None = None,
    trailer: bytes = b"", version: bytes = b"6.1.0-test (someone@example) #1 SMP",
) -> bytes:
    """A bzImage shaped like the real thing: setup, then protected-mode code with the payload."""
    sectors = setup_sects or 4
    setup = bytearray((sectors + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    version_at = 0x400
    setup[version_at : version_at + len(version) + 1] = version + b"\0"
    struct.pack_into("<H", setup, 0x20E, version_at - 0x200)
    decompressor_stub = b"\xcc" * 1000
    length = len(payload) if payload_length is None else payload_length
    struct.pack_into("<II", setup, 0x248, len(decompressor_stub), length)
    return bytes(setup) + decompressor_stub + payload + trailer


def xz_only(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)


def xz(data: bytes) -> bytes:
    # The kernel build appends the uncompressed size after the stream.
    return xz_only(data) + struct.pack("<I", len(data))


XZ_KERNEL = xz_only(fake_kernel(PVH_NOTES))


def test_extract_xz() -> None:
    elf = fake_kernel(PVH_NOTES)
    vmlinux = extract_vmlinux(bzimage(xz(elf), trailer=b"\0" * 300))
    assert vmlinux == elf
    assert has_pvh_note(vmlinux)


def test_xz_stream_longer_than_payload_length() -> None:
    elf = fake_kernel(PVH_NOTES)
    payload = xz(elf)
    assert extract_vmlinux(bzimage(payload, payload_length=len(payload) // 2)) == elf


def test_setup_sects_zero_means_four() -> None:
    elf = fake_kernel(PVH_NOTES)
    assert extract_vmlinux(bzimage(xz(elf), setup_sects=0)) == elf


def test_appended_relocations_are_dropped() -> None:
    elf = fake_kernel(PVH_NOTES)
    relocs = b"\x01\x02\x03\x04" * 100
    assert extract_vmlinux(bzimage(xz(elf + relocs))) == elf


def test_extract_gzip_bzip2_lzma() -> None:
    elf = fake_kernel(PVH_NOTES)
    assert extract_vmlinux(bzimage(gzip.compress(elf), trailer=b"junk")) == elf
    assert extract_vmlinux(bzimage(bz2.compress(elf))) == elf
    assert extract_vmlinux(bzimage(lzma.compress(elf, format=lzma.FORMAT_ALONE))) == elf


def test_extract_zstd(monkeypatch: pytest.MonkeyPatch) -> None:
    elf = fake_kernel(PVH_NOTES)
    try:
        zstandard = importlib.import_module("zstandard")
    except ImportError:
        payload = b"\x28\xb5\x2f\xfd" + bytes(20)
    else:
        payload = zstandard.ZstdCompressor().compress(elf)
        assert extract_vmlinux(bzimage(payload)) == elf
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(VmrunError, match="zstandard"):
        extract_vmlinux(bzimage(payload))


def test_elf_passes_through() -> None:
    elf = fake_kernel(PVH_NOTES)
    assert extract_vmlinux(elf) is elf


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"MZ" + bytes(0x300), "HdrS"),
        (bzimage(b"\x02\x21\x4c\x18" + bytes(50)), "lz4"),
        (bzimage(b"\x89LZO" + bytes(50)), "lzo"),
        (bzimage(b"\x00\x11\x22\x33" * 20), "unknown compression"),
        (bzimage(XZ_KERNEL[: len(XZ_KERNEL) // 2]), "truncated"),
        (bzimage(xz(b"not an elf at all")), "ELF"),
        (bzimage(b"\xfd7zXZ\x00" + bytes(100)), "corrupt xz"),
        (bzimage(gzip.compress(b"x" * 10000)[:40]), "truncated"),
        (bzimage(xz(b"x"), payload_length=10**6), "outside the file"),
    ],
    ids=["no-hdrs", "lz4", "lzo", "unknown", "xz-cut", "not-elf", "xz-corrupt", "gzip-cut",
         "length"],
)
def test_bad_images(image: bytes, message: str) -> None:
    with pytest.raises(VmrunError, match=message):
        extract_vmlinux(image)


def test_old_boot_protocol() -> None:
    image = bytearray(bzimage(xz(fake_kernel(PVH_NOTES))))
    struct.pack_into("<H", image, 0x206, 0x207)
    with pytest.raises(VmrunError, match="2.08"):
        extract_vmlinux(bytes(image))


@pytest.mark.parametrize("is64", [False, True])
@pytest.mark.parametrize("little", [False, True])
def test_pvh_note_variants(is64: bool, little: bool) -> None:
    end = "<" if little else ">"
    notes = note(b"Linux", 6, b"x", end) + note(b"Xen", PHYS32_ENTRY, b"\0" * 4, end)
    assert has_pvh_note(fake_kernel(notes, is64=is64, little=little))
    assert has_pvh_note(fake_kernel(notes, is64=is64, little=little, in_segment=False))
    assert has_pvh_note(fake_kernel(notes, is64=is64, little=little, in_section=False))
    other = note(b"Xen", 17, b"\0" * 4, end) + note(b"Linux", PHYS32_ENTRY, b"\0" * 4, end)
    assert not has_pvh_note(fake_kernel(other, is64=is64, little=little))
    assert not has_pvh_note(fake_kernel(b"", is64=is64, little=little))


def test_kernel_release() -> None:
    assert kernel_release_from_bzimage(bzimage(b"")) == "6.1.0-test"
    image = bytearray(bzimage(b""))
    struct.pack_into("<H", image, 0x20E, 0)
    assert kernel_release_from_bzimage(bytes(image)) is None
    assert kernel_release_from_bzimage(b"\x7fELF" + bytes(1000)) is None


def test_real_debian_kernel() -> None:
    kernels = cached_amd64_kernels()
    if not kernels:
        pytest.skip("no Debian amd64 kernel in the cache (the VM tests fetch one)")
    image = kernels[0].read_bytes()
    release = kernel_release_from_bzimage(image)
    assert release is not None and re.fullmatch(r"\d+\.\d+\.\d+-\d+-amd64", release)
    vmlinux = extract_vmlinux(image)
    assert vmlinux[:4] == b"\x7fELF"
    assert has_pvh_note(vmlinux)
