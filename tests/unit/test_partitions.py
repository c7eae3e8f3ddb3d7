from __future__ import annotations

import shutil
import struct
import subprocess
import uuid
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmrun.cli import main
from vmrun.errors import UsageError
from vmrun.images.attach import prepare, root_for_boot
from vmrun.images.partitions import (
    DPS_ROOT,
    GPT_NO_AUTO,
    HEAD_SECTORS,
    ROOT_TYPES,
    find_root_partition,
    gpt_partitions,
    gpt_type_guids,
    image_arch,
    mbr_partitions,
    read_head,
)
from vmrun.spec import Boot

ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")


def gpt_disk(path: Path, types: list[uuid.UUID], size: int = 4 << 20) -> None:
    """A disk with a GPT listing partitions of TYPES (what the parser reads, no more)."""
    header = b"EFI PART" + struct.pack("<IIIIQQQQ16sQII", 0x10000, 92, 0, 0, 1, 0, 34, 0,
                                         bytes(16), 2, 128, 128)
    entries = b"".join(t.bytes_le + uuid.uuid4().bytes_le + struct.pack("<QQQ", 2048, 4095, 0)
                       + bytes(72) for t in types)
    with open(path, "wb") as f:
        f.write(bytes(446) + bytes(64) + b"\x55\xaa")  # protective MBR (partition elided)
        f.write(header.ljust(512, b"\0"))
        f.write(entries)
        f.truncate(size)


def by_arch(arch: str) -> uuid.UUID:
    return next(t for t, a in ROOT_TYPES.items() if a == arch)


@pytest.mark.parametrize("arch", ["x86_64", "aarch64", "armv7", "i386", "s390x", "ppc64le",
                                  "riscv64"])
def test_root_partition_type_names_the_arch(tmp_path: Path, arch: str) -> None:
    image = tmp_path / "disk.raw"
    gpt_disk(image, [ESP, by_arch(arch)])
    assert gpt_type_guids(image.read_bytes()[:32768]) == [ESP, by_arch(arch)]
    assert image_arch(image, "raw") == arch


def test_qcow2_is_read_through_qemu_img(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    gpt_disk(raw, [by_arch("s390x")])
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
                   check=True)
    assert image_arch(image, "qcow2") == "s390x"


def test_no_gpt_or_no_root_type_tells_nothing(tmp_path: Path) -> None:
    plain = tmp_path / "plain.raw"
    plain.write_bytes(bytes(1 << 20))
    assert image_arch(plain, "raw") is None
    generic = tmp_path / "generic.raw"
    gpt_disk(generic, [uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")])
    assert image_arch(generic, "raw") is None


def test_a_mismatch_with_arch_is_refused_before_anything_boots(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "arm.raw"
    gpt_disk(image, [by_arch("aarch64")])
    assert main(["--arch", "x86_64", "--image", str(image), "--", "true"]) == 125
    err = capsys.readouterr().err
    assert "is for aarch64" in err and "--arch aarch64" in err


# --- the root partition ------------------------------------------------------------------

LINUX = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
BIOS_BOOT = uuid.UUID("21686148-6449-6e6f-744e-656564454649")
SWAP = uuid.UUID("0657fd6d-a4ab-43c4-84e5-0933c84b4f4f")
X86_ROOT = DPS_ROOT["x86_64"]
Entry = tuple[uuid.UUID, int, int] | tuple[uuid.UUID, int, int, int]  # type, first, last[, attrs]


def protective_mbr(disk_sectors: int = 1 << 20) -> bytes:
    slot = struct.pack("<B3sB3sII", 0, b"\0\x02\0", 0xEE, b"\xff\xff\xff", 1,
                       min(disk_sectors - 1, 0xFFFFFFFF))
    return bytes(446) + slot + bytes(48) + b"\x55\xaa"


def gpt_head(entries: list[Entry], *, count: int = 128, entries_lba: int = 2,
             disk_sectors: int = 1 << 20, mbr: bytes | None = None) -> bytes:
    """The first 64 sectors of a disk with a valid GPT (checksums and all) listing ENTRIES."""
    array = bytearray(count * 128)
    for index, entry in enumerate(entries):
        kind, first, last = entry[:3]
        attrs = entry[3] if len(entry) == 4 else 0
        array[index * 128:index * 128 + 56] = (kind.bytes_le + uuid.uuid4().bytes_le
                                               + struct.pack("<QQQ", first, last, attrs))
    header = bytearray(b"EFI PART" + struct.pack(
        "<IIIIQQQQ16sQIII", 0x10000, 92, 0, 0, 1, disk_sectors - 1, 34, disk_sectors - 34,
        uuid.uuid4().bytes, entries_lba, count, 128, zlib.crc32(array)))
    header[16:20] = struct.pack("<I", zlib.crc32(header))
    head = bytearray((mbr if mbr is not None else protective_mbr(disk_sectors)).ljust(512, b"\0"))
    head += bytes(header).ljust(512, b"\0")
    head = head.ljust(HEAD_SECTORS * 512, b"\0")
    start = entries_lba * 512
    head[start:start + len(array)] = array
    return bytes(head[:HEAD_SECTORS * 512])


def mbr_head(slots: list[tuple[int, int, int, int]], code: bytes = b"") -> bytes:
    """A classic MBR: (boot flag, type, first, sectors) per slot."""
    table = b"".join(struct.pack("<B3sB3sII", flag, bytes(3), kind, bytes(3), first, sectors)
                     for flag, kind, first, sectors in slots)
    return (code.ljust(446, b"\0") + table.ljust(64, b"\0") + b"\x55\xaa").ljust(
        HEAD_SECTORS * 512, b"\0")


def test_the_dps_root_for_the_arch_comes_first() -> None:
    head = gpt_head([(ESP, 2048, 10239), (LINUX, 10240, 999999), (X86_ROOT, 1000000, 1000999)])
    assert find_root_partition(head, "x86_64") == 3  # though the generic one is larger
    assert find_root_partition(head, "aarch64") == 2  # another arch's root: the generic one
    assert find_root_partition(head, "riscv64") == 2


def test_the_first_dps_root_not_marked_no_auto() -> None:
    head = gpt_head([(X86_ROOT, 2048, 4095, GPT_NO_AUTO), (X86_ROOT, 4096, 8191),
                     (X86_ROOT, 8192, 900000)])
    assert find_root_partition(head, "x86_64") == 2
    only_no_auto = gpt_head([(X86_ROOT, 2048, 4095, GPT_NO_AUTO)])
    assert find_root_partition(only_no_auto, "x86_64") is None


def test_else_the_largest_linux_partition() -> None:
    head = gpt_head([(BIOS_BOOT, 34, 2047), (LINUX, 2048, 4095), (SWAP, 4096, 900000),
                     (LINUX, 900001, 1000000), (LINUX, 1000001, 1000002)])
    assert find_root_partition(head, "x86_64") == 4


def test_esp_and_bios_boot_are_never_the_root() -> None:
    assert find_root_partition(gpt_head([(ESP, 2048, 999999), (BIOS_BOOT, 34, 2047)]),
                               "x86_64") is None
    assert find_root_partition(gpt_head([]), "x86_64") is None


def test_numbering_is_by_entry_index_with_gaps() -> None:
    entries: list[Entry] = [(ESP, 2048, 4095)]
    entries += [(uuid.UUID(int=0), 0, 0)] * 12
    entries.append((LINUX, 4096, 8191))
    assert find_root_partition(gpt_head(entries), "x86_64") == 14  # like Ubuntu's p1/p14/p15


def test_partitions_past_the_disk_or_backwards_are_skipped() -> None:
    head = gpt_head([(LINUX, 2048, 5000), (LINUX, 6000, 2_000_000), (LINUX, 9000, 8000)],
                    disk_sectors=1_000_000)
    assert find_root_partition(head, "x86_64") == 2
    assert find_root_partition(head, "x86_64", disk_sectors=1_000_000) == 1


def test_a_gpt_needs_its_checksums_and_a_protective_mbr() -> None:
    good = gpt_head([(X86_ROOT, 2048, 4095)])
    assert find_root_partition(good, "x86_64") == 1
    bad_header = bytearray(good)
    bad_header[512 + 40] ^= 1
    assert find_root_partition(bytes(bad_header), "x86_64") is None
    bad_entries = bytearray(good)
    bad_entries[1024 + 40] ^= 1
    assert find_root_partition(bytes(bad_entries), "x86_64") is None
    no_pmbr = gpt_head([(X86_ROOT, 2048, 4095)], mbr=bytes(510) + b"\x55\xaa")
    assert find_root_partition(no_pmbr, "x86_64") is None
    assert gpt_partitions(good[:1024]) is None  # the entries were not read


def test_mbr_largest_linux_partition() -> None:
    head = mbr_head([(0x80, 0x83, 2048, 1000), (0, 0x82, 4096, 99999), (0, 0x83, 200000, 5000),
                     (0, 0x0C, 300000, 10)])
    assert find_root_partition(head, "x86_64") == 3
    assert find_root_partition(head, "x86_64", disk_sectors=201000) == 1  # 3 cut short
    assert find_root_partition(head, "x86_64", disk_sectors=100000) == 1  # 3 past the end
    assert find_root_partition(mbr_head([(0, 0x83, 0, 0), (0, 0x07, 2048, 9)]), "x86_64") is None


def test_mbr_that_is_no_partition_table() -> None:
    slots = [(0, 0x83, 2048, 1000)]
    assert find_root_partition(mbr_head(slots + [(0x12, 0x83, 4096, 99999)]), "x86_64") is None
    assert find_root_partition(mbr_head(slots + [(0, 0xEE, 1, 99999)]), "x86_64") is None
    assert find_root_partition(mbr_head(slots)[:510] + b"\0\0", "x86_64") is None
    assert find_root_partition(b"", "x86_64") is None
    assert find_root_partition(bytes(HEAD_SECTORS * 512), "x86_64") is None


def sfdisk(path: Path, layout: str, size: int = 64 << 20) -> bytes:
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(path)],
                   input=layout.encode(), check=True, capture_output=True)
    return read_head(path, "raw")


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk (fdisk) is missing")
def test_tables_written_by_sfdisk(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    head = sfdisk(disk, f"label: gpt\nsize=4MiB, type={ESP}\nsize=8MiB, type={LINUX}\n"
                        f"size=16MiB, type={X86_ROOT}\nsize=20MiB, type={LINUX}\n")
    assert find_root_partition(head, "x86_64", disk_sectors=(64 << 20) // 512) == 3
    assert find_root_partition(head, "aarch64") == 4
    assert [p.number for p in gpt_partitions(head) or []] == [1, 2, 3, 4]
    head = sfdisk(disk, "label: dos\nsize=4MiB, type=c\nsize=8MiB, type=83\n"
                        "size=16MiB, type=82\nsize=20MiB, type=83\n")
    assert find_root_partition(head, "x86_64") == 4
    assert [p.kind for p in mbr_partitions(head) or []] == [0x0C, 0x83, 0x82, 0x83]


def test_prepare_and_the_boot_choice(tmp_path: Path) -> None:
    raw = tmp_path / "rooted.raw"
    with open(raw, "wb") as f:
        f.write(gpt_head([(ESP, 2048, 4095), (X86_ROOT, 4096, 8191)], disk_sectors=8192 + 34))
        f.truncate((8192 + 34) * 512)
    qcow2 = tmp_path / "rooted.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True)
    plain = tmp_path / "plain.raw"
    plain.write_bytes(bytes(1 << 20))
    for image in (raw, qcow2):
        base = prepare(str(image), guest_arch="x86_64", debian_arch="amd64", notice=print)
        assert base.root == 2
        assert root_for_boot(base, Boot.AUTO, "ref") == 2
        assert root_for_boot(base, Boot.FAST, "ref") == 2
        assert root_for_boot(base, Boot.DISK, "ref") is None
        with pytest.raises(UsageError, match="vmrun.fullboot"):
            root_for_boot(base, Boot.FULL, "ref")
    base = prepare(str(plain), guest_arch="x86_64", debian_arch="amd64", notice=print)
    assert base.root is None
    assert root_for_boot(base, Boot.AUTO, "ref") is None
    with pytest.raises(UsageError, match=r"image ref has no root partition") as caught:
        root_for_boot(base, Boot.FAST, "ref")
    assert caught.value.hint == "use --boot disk to attach it as a plain disk"


# --- hostile tables ------------------------------------------------------------------------

def check_answer(head: bytes, arch: str, disk_sectors: int | None) -> None:
    number = find_root_partition(head, arch, disk_sectors)
    if number is None:
        return
    assert 1 <= number <= 255
    gpt = gpt_partitions(head, disk_sectors)
    listed = gpt if gpt is not None else mbr_partitions(head, disk_sectors)
    assert listed is not None
    chosen = next(p for p in listed if p.number == number)
    assert chosen.kind in (DPS_ROOT[arch], LINUX, 0x83)
    assert chosen.sectors >= 1


ARCHES = st.sampled_from(sorted(DPS_ROOT))
SIZES = st.one_of(st.none(), st.integers(0, 1 << 64))
KINDS = st.sampled_from([ESP, BIOS_BOOT, LINUX, SWAP, X86_ROOT, DPS_ROOT["aarch64"],
                         uuid.UUID(int=0)])
ENTRIES = st.lists(st.tuples(KINDS, st.integers(0, (1 << 64) - 1),
                             st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1)),
                   max_size=140)


@settings(max_examples=300, deadline=None)
@given(ENTRIES, st.integers(0, 1024), st.integers(0, 80), ARCHES, SIZES)
def test_fuzz_valid_checksums_hostile_fields(entries: list[Entry], count: int, lba: int,
                                             arch: str, disk_sectors: int | None) -> None:
    # Checksums that match make the parser look at every field the table claims.
    try:
        head = gpt_head(entries[:count], count=count, entries_lba=lba)
    except (ValueError, IndexError, struct.error):
        return  # the table does not fit into what is read: nothing to parse
    check_answer(head, arch, disk_sectors)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, HEAD_SECTORS * 512 - 1), st.integers(0, 255)),
                max_size=40), st.booleans(), ARCHES, SIZES)
def test_fuzz_mutated_tables(flips: list[tuple[int, int]], use_gpt: bool, arch: str,
                             disk_sectors: int | None) -> None:
    base = (gpt_head([(ESP, 2048, 4095), (X86_ROOT, 4096, 9999), (LINUX, 10000, 20000)])
            if use_gpt else mbr_head([(0x80, 0x83, 2048, 4096), (0, 0x83, 9000, 90)]))
    head = bytearray(base)
    for offset, value in flips:
        head[offset] = value
    check_answer(bytes(head), arch, disk_sectors)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=HEAD_SECTORS * 512), ARCHES, SIZES)
def test_fuzz_random_heads(head: bytes, arch: str, disk_sectors: int | None) -> None:
    check_answer(head, arch, disk_sectors)
    check_answer(protective_mbr() + head[512:], arch, disk_sectors)
