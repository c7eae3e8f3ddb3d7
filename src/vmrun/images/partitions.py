"""A disk image's partition table: the architecture it declares and its root partition.

The Discoverable Partitions Specification gives root (and /usr) partitions a type GUID
per architecture; images built to it (Debian's cloud images among them) say what they are
for. An image without such a partition tells nothing, and nothing is claimed.

The root partition (what `--boot fast` mounts) is found the way the guest kernel will
number it, from the disk's first sectors only: a GPT (behind a protective MBR, with valid
header and entry checksums) or else a classic MBR's four primary slots. Every count,
offset and size comes from the image, so each is bounded before it is used.
"""

from __future__ import annotations

import struct
import tempfile
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from vmrun.images import qemu_img

SECTOR = 512
HEAD_SECTORS = 64  # the protective MBR, the GPT header and 128 entries of 128 bytes

# Root and /usr partition types of the Discoverable Partitions Specification.
ROOT_TYPES: dict[uuid.UUID, str] = {
    uuid.UUID(text): arch
    for text, arch in (
        ("4f68bce3-e8cd-4db1-96e7-fbcaf984b709", "x86_64"),
        ("8484680c-9521-48c6-9c11-b0720656f69e", "x86_64"),
        ("44479540-f297-41b2-9af7-d131d5f0458a", "i386"),
        ("b921b045-1df0-41c3-af44-4c6f280d3fae", "aarch64"),
        ("b0e01050-ee5f-4390-949a-9101b17104e9", "aarch64"),
        ("69dad710-2ce4-4e3c-b16c-21a1d49abed3", "armv7"),
        ("5eead9a9-fe09-4a1e-a1d7-520d00531306", "s390x"),
        ("c31c45e6-3f39-412e-80fb-4809c4980599", "ppc64le"),
        ("72ec70a6-cf74-40e6-bd49-4bda08e8f224", "riscv64"),
    )
}


# The root partition type of each architecture (ROOT_TYPES also holds the /usr types).
DPS_ROOT: dict[str, uuid.UUID] = {
    arch: uuid.UUID(text)
    for arch, text in (
        ("x86_64", "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"),
        ("i386", "44479540-f297-41b2-9af7-d131d5f0458a"),
        ("aarch64", "b921b045-1df0-41c3-af44-4c6f280d3fae"),
        ("armv7", "69dad710-2ce4-4e3c-b16c-21a1d49abed3"),
        ("s390x", "5eead9a9-fe09-4a1e-a1d7-520d00531306"),
        ("ppc64le", "c31c45e6-3f39-412e-80fb-4809c4980599"),
        ("riscv64", "72ec70a6-cf74-40e6-bd49-4bda08e8f224"),
    )
}
LINUX_DATA = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")  # "Linux filesystem data"
ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
BIOS_BOOT = uuid.UUID("21686148-6449-6e6f-744e-656564454649")
NEVER_ROOT = frozenset({ESP, BIOS_BOOT})
GPT_NO_AUTO = 1 << 63  # DPS: "do not mount this automatically"
MBR_LINUX = 0x83
MBR_PROTECTIVE = 0xEE
MBR_EXTENDED = frozenset({0x05, 0x0F, 0x85})
# The kernel numbers at most this many partitions on a disk (DISK_MAX_PARTS - 1).
MAX_PARTITION_NUMBER = 255


@dataclass(frozen=True)
class Partition:
    """One partition as the guest kernel will see it: /dev/vda<number>."""

    number: int  # GPT entry index + 1, or MBR slot 1-4
    kind: uuid.UUID | int  # the GPT type GUID or the MBR type byte
    first: int  # first sector
    sectors: int
    attributes: int = 0  # GPT attribute bits (0 for MBR)


def _mbr_slots(head: bytes) -> list[tuple[int, int, int, int]] | None:
    """The MBR's four (boot flag, type, first, sectors) slots, or None without a signature."""
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa":
        return None
    return [(head[446 + 16 * i], head[446 + 16 * i + 4],
             *struct.unpack_from("<II", head, 446 + 16 * i + 8)) for i in range(4)]


def gpt_partitions(head: bytes, disk_sectors: int | None = None) -> list[Partition] | None:
    """The GPT's partitions as the kernel accepts them, or None when there is no valid GPT.

    Like the kernel: the MBR must hold a protective (0xEE) entry; the header must be at
    LBA 1 with correct CRC32s of itself and of its entry array, of 128-byte entries.
    Entries that end past the disk (when its size is known), run backwards or start at
    sector 0 are skipped; numbering stays by entry index. Entries beyond HEAD are not
    seen (vmrun reads 128 entries, what partitioning tools write).
    """
    slots = _mbr_slots(head)
    if slots is None or not any(kind == MBR_PROTECTIVE for _, kind, _, _ in slots):
        return None
    header = head[SECTOR:2 * SECTOR]
    if len(header) < 92 or header[:8] != b"EFI PART":
        return None
    header_size, header_crc = struct.unpack_from("<II", header, 12)
    my_lba, = struct.unpack_from("<Q", header, 24)
    entries_lba, count, size, entries_crc = struct.unpack_from("<QIII", header, 72)
    if not 92 <= header_size <= SECTOR or my_lba != 1:
        return None
    if zlib.crc32(header[:16] + bytes(4) + header[20:header_size]) != header_crc:
        return None
    if size != 128 or count > 1024 or entries_lba < 2:  # the kernel takes 128-byte entries only
        return None
    start = entries_lba * SECTOR
    if start >= len(head):
        return None  # the entries lie elsewhere on the disk: nothing to go by
    array = head[start:start + count * size]
    if len(array) == count * size and zlib.crc32(array) != entries_crc:
        return None  # (an array longer than HEAD cannot be checked; what is seen is used)
    found: list[Partition] = []
    for index in range(min(count, len(array) // size, MAX_PARTITION_NUMBER)):
        entry = array[index * size:index * size + 128]
        if entry[:16] == bytes(16):
            continue
        first, last, attributes = struct.unpack_from("<QQQ", entry, 32)
        if first == 0 or last < first or (disk_sectors is not None and last >= disk_sectors):
            continue
        found.append(Partition(number=index + 1, kind=uuid.UUID(bytes_le=entry[:16]),
                               first=first, sectors=last - first + 1, attributes=attributes))
    return found


def mbr_partitions(head: bytes, disk_sectors: int | None = None) -> list[Partition] | None:
    """A classic MBR's primary partitions, or None when HEAD holds no MBR (or a GPT's).

    Like the kernel: a table whose boot flags are not 0 or 0x80 is not one (it is likely
    a FAT boot sector), a protective 0xEE entry means GPT, empty slots are skipped and
    numbering is by slot; one that starts past the disk's end is dropped, one that runs
    past it cut short. Extended partitions are skipped (their logical ones are not read).
    """
    slots = _mbr_slots(head)
    if slots is None:
        return None
    if any(flag not in (0, 0x80) for flag, _, _, _ in slots):
        return None
    if any(kind == MBR_PROTECTIVE for _, kind, _, _ in slots):
        return None
    found = []
    for slot, (_, kind, first, sectors) in enumerate(slots, 1):
        if sectors == 0 or first == 0 or kind == 0 or kind in MBR_EXTENDED:
            continue
        if disk_sectors is not None:
            if first >= disk_sectors:
                continue
            sectors = min(sectors, disk_sectors - first)
        found.append(Partition(number=slot, kind=kind, first=first, sectors=sectors))
    return found


def find_root_partition(head: bytes, arch: str, disk_sectors: int | None = None) -> int | None:
    """The number of the partition to use as the root filesystem, or None if none fits.

    GPT: the first partition of the Discoverable Partitions Specification's root type for
    ARCH (not marked no-auto), else the largest "Linux filesystem data" partition; the EFI
    system and BIOS boot partitions never. MBR: the largest partition of type 0x83.
    """
    gpt = gpt_partitions(head, disk_sectors)
    if gpt is not None:
        candidates = [p for p in gpt if p.kind not in NEVER_ROOT]
        dps = DPS_ROOT.get(arch)
        for partition in candidates:
            if partition.kind == dps and not partition.attributes & GPT_NO_AUTO:
                return partition.number
        return _largest(p for p in candidates if p.kind == LINUX_DATA)
    mbr = mbr_partitions(head, disk_sectors)
    if mbr is not None:
        return _largest(p for p in mbr if p.kind == MBR_LINUX)
    return None


def _largest(partitions: Iterable[Partition]) -> int | None:
    best: Partition | None = None
    for partition in partitions:
        if best is None or partition.sectors > best.sectors:
            best = partition
    return None if best is None else best.number


def gpt_type_guids(head: bytes) -> list[uuid.UUID]:
    """The partition type GUIDs of a GPT whose first sectors are HEAD (empty if none)."""
    header = head[SECTOR:2 * SECTOR]
    if header[:8] != b"EFI PART":
        return []
    entries_lba, count, size = struct.unpack_from("<QII", header, 72)
    if size < 128 or size > 1024 or count > 1024:
        return []
    start = entries_lba * SECTOR
    types = []
    for index in range(count):
        entry = head[start + index * size:start + index * size + 16]
        if len(entry) < 16:
            break  # entries past what was read: the ones that matter come first
        if entry != bytes(16):
            types.append(uuid.UUID(bytes_le=entry))
    return types


def read_head(path: Path, fmt: str) -> bytes:
    """The first sectors of the disk as the guest sees it (through qemu-img for qcow2 etc.)."""
    if fmt == "raw":
        with open(path, "rb") as f:
            return f.read(HEAD_SECTORS * SECTOR)
    with tempfile.TemporaryDirectory(prefix="vmrun-head-") as tmp:
        out = Path(tmp) / "head.raw"
        qemu_img.run_qemu_img(["dd", "-f", fmt, "-O", "raw", f"bs={SECTOR}",
                               f"count={HEAD_SECTORS}", f"if={qemu_img.filename(path)}",
                               f"of={out}"])
        return out.read_bytes()


def head_arch(head: bytes) -> str | None:
    """The architecture the GPT in HEAD declares by its root or /usr type, if exactly one."""
    found = {ROOT_TYPES[t] for t in gpt_type_guids(head) if t in ROOT_TYPES}
    return found.pop() if len(found) == 1 else None


def image_arch(path: Path, fmt: str) -> str | None:
    """The architecture the image's root partition declares, or None if it says nothing."""
    return head_arch(read_head(path, fmt))
