"""Whether a file without an image header looks like a raw disk, not a file given by mistake."""

from __future__ import annotations

from pathlib import Path

from vmrun.errors import ImageError

# (offset, magic, what): partition tables and the filesystems a whole disk may hold.
SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (510, b"\x55\xaa", "an MBR or boot sector"),  # also GPT's protective MBR and FAT
    (512, b"EFI PART", "a GPT"),
    (0x438, b"\x53\xef", "an ext2/3/4 filesystem"),
    (0, b"XFSB", "an XFS filesystem"),
    (0x10040, b"_BHRfS_M", "a btrfs filesystem"),
    (0, b"hsqs", "a squashfs filesystem"),
    (0, b"LUKS\xba\xbe", "a LUKS volume"),
    (0x218, b"LVM2 001", "an LVM physical volume"),
    (4086, b"SWAPSPACE2", "a swap area"),
    (0x8001, b"CD001", "an ISO 9660 filesystem"),
)
HEAD_BYTES = max(offset + len(magic) for offset, magic, _ in SIGNATURES)
SECTOR = 512


def disk_signature(head: bytes) -> str | None:
    """What HEAD (a file's first HEAD_BYTES) shows it to be: a partition table or a
    filesystem, "a blank disk" when its first sector is all zeros, or None."""
    for offset, magic, what in SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return what
    if len(head) >= SECTOR and not any(head[:SECTOR]):
        return "a blank disk"
    return None


def require_disk(path: Path, fmt: str, declared: str | None, option: str) -> None:
    """Refuse PATH, whose header check found format FMT, unless it is a disk: a format
    with a header, a raw file with a disk's signature, or one the user DECLARED raw with
    OPTION. A declared format that the header contradicts is refused too."""
    if declared is not None and fmt != declared and not (declared == "raw" and fmt == "iso"):
        raise ImageError(f"{path} has a {fmt} header, not {declared}",
                         hint=f"drop {option} {declared}: the header names the format")
    if fmt != "raw" or declared == "raw":
        return
    try:
        with path.open("rb") as file:
            head = file.read(HEAD_BYTES)
    except OSError as err:
        raise ImageError(f"{path}: cannot read image: {err.strerror or err}") from None
    if disk_signature(head) is None:
        raise ImageError(f"{path} does not look like a disk image: no image header, "
                         "partition table or filesystem signature",
                         hint=f"if it is a raw disk, say so with {option} raw")
