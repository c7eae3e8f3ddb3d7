"""Telling a disk image's architecture from its GPT: the root partition's type GUID.

The Discoverable Partitions Specification gives root (and /usr) partitions a type GUID
per architecture; images built to it (Debian's cloud images among them) say what they are
for. An image without such a partition tells nothing, and nothing is claimed.
"""

from __future__ import annotations

import struct
import tempfile
import uuid
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


def image_arch(path: Path, fmt: str) -> str | None:
    """The architecture the image's root partition declares, or None if it says nothing."""
    found = {ROOT_TYPES[t] for t in gpt_type_guids(read_head(path, fmt)) if t in ROOT_TYPES}
    return found.pop() if len(found) == 1 else None
