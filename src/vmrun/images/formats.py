"""Disk image headers read in pure Python, and the safety check for foreign images.

Nothing here runs qemu-img or reads a whole image: every read is bounded (the qcow2
header cluster is at most 2 MiB, its snapshot table at most 16 MiB, a VMDK descriptor at
most 1 MiB), so a hostile file costs little to look at. `check_foreign_image` is the gate
a downloaded or user-supplied image passes before qemu-img or QEMU opens it.
"""

from __future__ import annotations

import dataclasses
import re
import stat
import struct
import uuid
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from vmrun.errors import ImageError, UnsafeImage

__all__ = [
    "HeaderExtension",
    "ImageFormat",
    "ImageInfo",
    "Qcow2Header",
    "References",
    "Snapshot",
    "check_foreign_image",
    "detect_format",
    "inspect_image",
    "parse_qcow2_header",
]


class References(StrEnum):
    """What a checked image may name besides itself (backing files, VMDK extents).

    REFUSE: nothing (an image given to `--image` or imported). BESIDE: a backing file by a
    plain name in the image's directory (a stored layer). FOLLOW: the user's explicit word
    to follow a chain: a backing file by any path name, never a `json:` or protocol name,
    and VMDK extents as plain names beside the descriptor. IGNORE: any backing name, for a
    caller that opens the image with its backing disabled (VMDK extents still refused).
    """

    REFUSE = "refuse"
    BESIDE = "beside"
    FOLLOW = "follow"
    IGNORE = "ignore"


class ImageFormat(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"
    VMDK = "vmdk"
    VDI = "vdi"
    VHDX = "vhdx"
    ISO = "iso"


@dataclass(frozen=True)
class HeaderExtension:
    """One qcow2 header extension: its type, a name for known types, its data length."""

    kind: int
    name: str
    length: int


@dataclass(frozen=True)
class Snapshot:
    """One entry of a qcow2 internal snapshot table."""

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    virtual_size: int | None


@dataclass(frozen=True)
class Qcow2Header:
    """The fields of a qcow2 (version 2 or 3) header, its extensions and its snapshots."""

    version: int
    cluster_bits: int
    cluster_size: int
    virtual_size: int
    backing_file: str | None
    backing_format: str | None
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    compression_type: int
    data_file: str | None
    extensions: tuple[HeaderExtension, ...]
    snapshots: tuple[Snapshot, ...]


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about an image: its format and sizes (and qcow2 details)."""

    path: Path
    format: ImageFormat
    virtual_size: int
    file_size: int
    qcow2: Qcow2Header | None = None

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (`json.dumps` works on it as is)."""
        out: dict[str, object] = {
            "path": str(self.path),
            "format": self.format.value,
            "virtual_size": self.virtual_size,
            "file_size": self.file_size,
        }
        if self.qcow2 is not None:
            out["qcow2"] = dataclasses.asdict(self.qcow2)
        return out


# Limits. Sizes beyond these are refused by the check; the read caps bound the parser.
MAX_VIRTUAL_SIZE = 64 << 40
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
MAX_L1_ENTRIES = (32 << 20) // 8  # QEMU's own cap on the active L1 table: 32 MiB
MAX_REFCOUNT_TABLE_BYTES = 8 << 20  # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_TABLE_BYTES = 16 << 20
MAX_SNAPSHOT_EXTRA = 1024
MAX_BACKING_NAME = 1023
MAX_EXTENSIONS = 1024
MAX_VMDK_DESCRIPTOR = 1 << 20
MIN_IMAGE_SIZE = 512
PROBE_BYTES = 0x8000 + 2048  # enough for every magic, the ISO volume descriptor included

QCOW2_MAGIC = b"QFI\xfb"
VMDK_MAGIC = b"KDMV"
VMDK_DESCRIPTOR_MAGIC = b"# Disk DescriptorFile"
VDI_SIGNATURE = 0xBEDA107F
VHDX_MAGIC = b"vhdxfile"
ISO_MAGIC = b"CD001"

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441
EXTENSION_NAMES = {
    EXT_END: "end",
    EXT_BACKING_FORMAT: "backing format",
    EXT_FEATURE_TABLE: "feature name table",
    EXT_BITMAPS: "bitmaps",
    EXT_ENCRYPTION: "full disk encryption",
    EXT_DATA_FILE: "external data file",
}

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
)

V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
SNAPSHOT_FIXED = struct.Struct(">QIHHIIQII")  # 40 bytes, see QEMU docs/interop/qcow2.txt


def detect_format(path: Path) -> ImageFormat:
    """The format named by the file's magic bytes; anything unrecognised is raw."""
    return _detect(_read_at(path, 0, PROBE_BYTES))


def _detect(head: bytes) -> ImageFormat:
    if head.startswith(QCOW2_MAGIC):
        return ImageFormat.QCOW2
    if head.startswith(VMDK_MAGIC) or head.startswith(VMDK_DESCRIPTOR_MAGIC):
        return ImageFormat.VMDK
    if len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == VDI_SIGNATURE:
        return ImageFormat.VDI
    if head.startswith(VHDX_MAGIC):
        return ImageFormat.VHDX
    if head[0x8001:0x8006] == ISO_MAGIC:
        return ImageFormat.ISO
    return ImageFormat.RAW


# --- qcow2 -------------------------------------------------------------------------------


def parse_qcow2_header(
    data: bytes, *, file_size: int | None = None, snapshot_table: bytes | None = None
) -> Qcow2Header:
    """Parse a qcow2 header from the first bytes of the image (ideally its first cluster).

    `file_size` lets the parser tell a short read from a file that really ends there.
    Snapshots come from `snapshot_table` (the bytes at `snapshots_offset`), or from `data`
    when it reaches that far; otherwise `snapshots` is empty. Raises ImageError for
    anything structurally impossible: truncation, a bad magic or version, cluster bits
    QEMU cannot use, names or extensions running past the header cluster.
    """
    if len(data) < 4 or data[:4] != QCOW2_MAGIC:
        if len(data) < 4 and QCOW2_MAGIC.startswith(data):
            raise ImageError(f"truncated qcow2 header ({len(data)} bytes)")
        raise ImageError("not a qcow2 image (bad magic)")
    if len(data) < V2_HEADER_LENGTH:
        raise ImageError(f"truncated qcow2 header ({len(data)} of {V2_HEADER_LENGTH} bytes)")
    (version, backing_offset, backing_size, cluster_bits, size, crypt_method, l1_size,
     l1_offset, reftable_offset, reftable_clusters, nb_snapshots,
     snapshots_offset) = struct.unpack_from(">IQIIQIIQQIIQ", data, 4)
    if version not in (2, 3):
        raise ImageError(f"unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageError(
            f"qcow2 cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"
        )
    cluster_size = 1 << cluster_bits
    v3 = _v3_fields(data, cluster_size, file_size) if version == 3 else V2_FIELDS
    # Extensions run from the end of the header to the backing file name, or else to the
    # end of the header cluster (QEMU reads them the same way).
    ext_end = backing_offset if backing_offset else cluster_size
    if ext_end > cluster_size:
        raise ImageError(f"qcow2 backing file offset {backing_offset} past the header cluster")
    extensions = _extensions(data, v3.header_length, ext_end, file_size)
    backing_file = (_backing_name(data, backing_offset, backing_size, cluster_size, file_size)
                    if backing_offset else None)
    if nb_snapshots > MAX_SNAPSHOTS:
        raise ImageError(f"too many qcow2 snapshots ({nb_snapshots} > {MAX_SNAPSHOTS})")
    if snapshot_table is None and nb_snapshots and len(data) > snapshots_offset:
        snapshot_table = data[snapshots_offset:snapshots_offset + MAX_SNAPSHOT_TABLE_BYTES]
    snapshots: tuple[Snapshot, ...] = ()
    if snapshot_table is not None and nb_snapshots:
        snapshots = _parse_snapshot_table(snapshot_table, nb_snapshots, version)

    return Qcow2Header(
        version=version, cluster_bits=cluster_bits, cluster_size=cluster_size,
        virtual_size=size, backing_file=backing_file,
        backing_format=_extension_text(extensions, EXT_BACKING_FORMAT, "backing format"),
        crypt_method=crypt_method, l1_size=l1_size, l1_table_offset=l1_offset,
        refcount_table_offset=reftable_offset, refcount_table_clusters=reftable_clusters,
        nb_snapshots=nb_snapshots, snapshots_offset=snapshots_offset,
        incompatible_features=v3.incompatible, compatible_features=v3.compatible,
        autoclear_features=v3.autoclear, refcount_order=v3.refcount_order,
        header_length=v3.header_length, compression_type=v3.compression_type,
        data_file=_extension_text(extensions, EXT_DATA_FILE, "data file name"),
        extensions=tuple(extension for extension, _ in extensions), snapshots=snapshots,
    )


@dataclass(frozen=True)
class _V3Fields:
    """The header fields version 3 added (version 2 images have fixed values)."""

    incompatible: int
    compatible: int
    autoclear: int
    refcount_order: int
    header_length: int
    compression_type: int


V2_FIELDS = _V3Fields(0, 0, 0, 4, V2_HEADER_LENGTH, 0)


def _v3_fields(data: bytes, cluster_size: int, file_size: int | None) -> _V3Fields:
    if len(data) < V3_MIN_HEADER_LENGTH:
        raise ImageError(f"truncated qcow2 header ({len(data)} of {V3_MIN_HEADER_LENGTH} bytes)")
    incompatible, compatible, autoclear, refcount_order, header_length = (
        struct.unpack_from(">QQQII", data, 72)
    )
    if header_length < V3_MIN_HEADER_LENGTH or header_length % 8:
        raise ImageError(f"bad qcow2 header_length {header_length}")
    if header_length > cluster_size:
        raise ImageError(f"qcow2 header_length {header_length} runs past the header cluster")
    _need(data, header_length, file_size, "qcow2 header")
    if refcount_order > 6:
        raise ImageError(f"bad qcow2 refcount_order {refcount_order}")
    compression_type = data[104] if header_length > 104 else 0
    return _V3Fields(incompatible, compatible, autoclear, refcount_order, header_length,
                     compression_type)


def _extensions(data: bytes, start: int, end: int,
                file_size: int | None) -> list[tuple[HeaderExtension, bytes]]:
    """The header extensions between START and END, each with its payload."""
    found: list[tuple[HeaderExtension, bytes]] = []
    offset = start
    while offset + 8 <= end:
        if len(found) >= MAX_EXTENSIONS:
            raise ImageError(f"more than {MAX_EXTENSIONS} qcow2 header extensions")
        _need(data, offset + 8, file_size, "qcow2 header extension")
        kind, length = struct.unpack_from(">II", data, offset)
        offset += 8
        if kind == EXT_END:
            found.append((HeaderExtension(kind, EXTENSION_NAMES[kind], length), b""))
            break
        if length > end - offset:
            raise ImageError(
                f"qcow2 header extension 0x{kind:08x} length {length} runs past "
                "the header cluster"
            )
        _need(data, offset + length, file_size, f"qcow2 header extension 0x{kind:08x}")
        name = EXTENSION_NAMES.get(kind, "unknown")
        found.append((HeaderExtension(kind, name, length), data[offset:offset + length]))
        offset += (length + 7) & ~7
    return found


def _extension_text(extensions: list[tuple[HeaderExtension, bytes]], kind: int,
                    what: str) -> str | None:
    """The text of the last extension of KIND (QEMU keeps the last one), if any; every
    one of them must be valid text."""
    texts = [_text(payload, what) for extension, payload in extensions
             if extension.kind == kind]
    return texts[-1] if texts else None


def _backing_name(data: bytes, offset: int, size: int, cluster_size: int,
                  file_size: int | None) -> str:
    if size > MAX_BACKING_NAME:
        raise ImageError(f"qcow2 backing file name too long ({size} bytes)")
    if offset + size > cluster_size:
        raise ImageError("qcow2 backing file name runs past the header cluster")
    _need(data, offset + size, file_size, "qcow2 backing file name")
    return _text(data[offset:offset + size], "backing file")


def _need(data: bytes, end: int, file_size: int | None, what: str) -> None:
    if end <= len(data):
        return
    if file_size is not None and end > file_size:
        raise ImageError(f"truncated qcow2 header: {what} runs past the end of the file")
    raise ImageError(f"truncated qcow2 header: {what} needs {end} bytes, have {len(data)}")


def _text(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ImageError(f"qcow2 {what} is not UTF-8") from None
    if "\0" in text:
        raise ImageError(f"qcow2 {what} contains a NUL byte")
    return text


def _snapshot_entry_size(fixed: bytes) -> int:
    """The size of a snapshot table entry from its first 40 bytes, before padding to 8.

    The last entry's padding may be missing at the end of the file.
    """
    *_, id_len, name_len, _sec, _nsec, _clock, _state, extra = SNAPSHOT_FIXED.unpack(fixed)
    if extra > MAX_SNAPSHOT_EXTRA:
        raise ImageError(f"qcow2 snapshot extra data too large ({extra} bytes)")
    return SNAPSHOT_FIXED.size + int(extra) + int(id_len) + int(name_len)


def _parse_snapshot_table(table: bytes, count: int, version: int) -> tuple[Snapshot, ...]:
    snapshots: list[Snapshot] = []
    offset = 0
    for index in range(count):
        if offset + SNAPSHOT_FIXED.size > len(table):
            raise ImageError(f"truncated qcow2 snapshot table (entry {index} of {count})")
        fixed = table[offset:offset + SNAPSHOT_FIXED.size]
        entry_size = _snapshot_entry_size(fixed)
        if offset + entry_size > len(table):
            raise ImageError(f"truncated qcow2 snapshot table (entry {index} of {count})")
        (_l1_offset, _l1_size, id_len, name_len, date_sec, _date_nsec, _clock, state_size,
         extra) = SNAPSHOT_FIXED.unpack(fixed)
        if version >= 3 and extra < 16:
            raise ImageError(f"qcow2 v3 snapshot {index} has only {extra} bytes of extra data")
        pos = offset + SNAPSHOT_FIXED.size
        extra_data = table[pos:pos + extra]
        virtual_size: int | None = None
        if extra >= 8:
            state_size = struct.unpack_from(">Q", extra_data, 0)[0]
        if extra >= 16:
            virtual_size = struct.unpack_from(">Q", extra_data, 8)[0]
        pos += extra
        snap_id = table[pos:pos + id_len].decode("utf-8", "replace")
        pos += id_len
        name = table[pos:pos + name_len].decode("utf-8", "replace")
        snapshots.append(Snapshot(snap_id, name, state_size, date_sec, virtual_size))
        offset += (entry_size + 7) & ~7
    return tuple(snapshots)


def _read_qcow2(f: BinaryIO, file_size: int) -> Qcow2Header:
    head = f.read(V3_MIN_HEADER_LENGTH)
    if len(head) < 24:
        return parse_qcow2_header(head, file_size=file_size)
    cluster_bits = struct.unpack_from(">I", head, 20)[0]
    cluster = 1 << min(max(cluster_bits, MIN_CLUSTER_BITS), MAX_CLUSTER_BITS)
    data = head + f.read(cluster - len(head))
    header = parse_qcow2_header(data, file_size=file_size)
    if not header.nb_snapshots:
        return header
    table = _read_snapshot_table(f, header, file_size)
    return parse_qcow2_header(data, file_size=file_size, snapshot_table=table)


def _read_snapshot_table(f: BinaryIO, header: Qcow2Header, file_size: int) -> bytes:
    """The snapshot table's bytes, read entry by entry so a hostile count costs no more."""
    if header.snapshots_offset % header.cluster_size:
        raise ImageError(f"qcow2 snapshot table offset {header.snapshots_offset} unaligned")
    _seek(f, header.snapshots_offset, file_size, "qcow2 snapshot table")
    table = bytearray()
    for _ in range(header.nb_snapshots):
        fixed = f.read(SNAPSHOT_FIXED.size)
        if len(fixed) < SNAPSHOT_FIXED.size:
            table += fixed
            break  # the parser reports the truncation
        rest = ((_snapshot_entry_size(fixed) + 7) & ~7) - SNAPSHOT_FIXED.size
        if len(table) + SNAPSHOT_FIXED.size + rest > MAX_SNAPSHOT_TABLE_BYTES:
            raise ImageError(
                f"qcow2 snapshot table larger than {MAX_SNAPSHOT_TABLE_BYTES >> 20} MiB"
            )
        table += fixed
        table += f.read(rest)
    return bytes(table)


# --- other formats ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Vmdk:
    virtual_size: int
    sparse: bool  # a KDMV file (its own data), rather than a text descriptor
    capacity: int
    grain_size: int
    gtes_per_gt: int
    create_type: str | None
    extents: tuple[tuple[str, str], ...]  # (type, file name)
    parent: str | None


_VMDK_EXTENT = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\S+)(?:\s+"([^"]*)")?', re.M)


def _read_vmdk(f: BinaryIO, head: bytes, file_size: int) -> _Vmdk:
    sparse = head.startswith(VMDK_MAGIC)
    capacity = grain = gtes = 0
    if sparse:
        if len(head) < 512:
            raise ImageError(f"truncated vmdk header ({len(head)} bytes)")
        (_version, _flags, capacity, grain, desc_offset, desc_size, gtes) = struct.unpack_from(
            "<IIQQQQI", head, 4
        )
        descriptor = b""
        if desc_offset:
            _seek(f, desc_offset * 512, file_size, "vmdk descriptor")
            descriptor = f.read(min(desc_size * 512, MAX_VMDK_DESCRIPTOR))
    else:
        f.seek(0)
        descriptor = f.read(MAX_VMDK_DESCRIPTOR)
    text = descriptor.split(b"\0", 1)[0].decode("utf-8", "replace")
    extents = tuple(
        (m.group(3), m.group(4) or "") for m in _VMDK_EXTENT.finditer(text)
    )
    create = re.search(r'^createType\s*=\s*"([^"]*)"', text, re.M)
    parent = re.search(r'^parentFileNameHint\s*=\s*"([^"]*)"', text, re.M)
    if sparse and capacity:
        # QEMU uses the sparse header and ignores the embedded descriptor's extents.
        virtual_size = capacity * 512
    else:
        virtual_size = sum(int(m.group(2)) for m in _VMDK_EXTENT.finditer(text)) * 512
    return _Vmdk(
        virtual_size, sparse, capacity, grain, gtes,
        create.group(1) if create else None, extents,
        parent.group(1) if parent else None,
    )


@dataclass(frozen=True)
class _Vdi:
    virtual_size: int
    image_type: int
    block_size: int
    blocks_in_image: int


def _read_vdi(head: bytes) -> _Vdi:
    if len(head) < 0x188:
        raise ImageError(f"truncated vdi header ({len(head)} bytes)")
    image_type = struct.unpack_from("<I", head, 0x4C)[0]
    disk_size, block_size, _extra, blocks = struct.unpack_from("<QIII", head, 0x170)
    return _Vdi(disk_size, image_type, block_size, blocks)


VHDX_REGION_TABLE = 0x30000
VHDX_METADATA_REGION = uuid.UUID("8b7ca206-4790-4b9a-b8fe-575f050f886e").bytes_le
VHDX_VIRTUAL_DISK_SIZE = uuid.UUID("2fa54224-cd1b-4876-b211-5dbed83bf4b8").bytes_le
VHDX_FILE_PARAMETERS = uuid.UUID("caa16737-fa36-4d43-b3b6-33f0aa44e76b").bytes_le
VHDX_PARENT_LOCATOR = uuid.UUID("a8d35f2d-b30b-454d-abf7-d3d84834ab0c").bytes_le


@dataclass(frozen=True)
class _Vhdx:
    virtual_size: int
    has_parent: bool


def _read_vhdx(f: BinaryIO, file_size: int) -> _Vhdx:
    f.seek(VHDX_REGION_TABLE)
    regions = f.read(64 << 10)
    if len(regions) < 16 or regions[:4] != b"regi":
        raise ImageError("vhdx region table missing or truncated")
    count = min(struct.unpack_from("<I", regions, 8)[0], (len(regions) - 16) // 32)
    meta_offset = meta_length = None
    for i in range(count):
        guid = regions[16 + 32 * i:32 + 32 * i]
        if guid == VHDX_METADATA_REGION:
            meta_offset, meta_length = struct.unpack_from("<QI", regions, 32 + 32 * i)
    if meta_offset is None or meta_length is None:
        raise ImageError("vhdx has no metadata region")
    _seek(f, meta_offset, file_size, "vhdx metadata region")
    meta = f.read(min(meta_length, 1 << 20))
    if len(meta) < 32 or meta[:8] != b"metadata":
        raise ImageError("vhdx metadata table missing or truncated")
    entries = min(struct.unpack_from("<H", meta, 10)[0], (len(meta) - 32) // 32)
    size: int | None = None
    has_parent = False
    for i in range(entries):
        base = 32 + 32 * i
        guid = meta[base:base + 16]
        item_offset, item_length = struct.unpack_from("<II", meta, base + 16)
        item = meta[item_offset:item_offset + item_length]
        if guid == VHDX_VIRTUAL_DISK_SIZE and len(item) >= 8:
            size = struct.unpack_from("<Q", item)[0]
        elif guid == VHDX_FILE_PARAMETERS and len(item) >= 8:
            has_parent = has_parent or bool(struct.unpack_from("<I", item, 4)[0] & 2)
        elif guid == VHDX_PARENT_LOCATOR:
            has_parent = True
    if size is None:
        raise ImageError("vhdx metadata has no virtual disk size")
    return _Vhdx(size, has_parent)


def _iso_size(head: bytes) -> int:
    if len(head) < 0x8000 + 132:
        raise ImageError("truncated iso primary volume descriptor")
    blocks = struct.unpack_from("<I", head, 0x8000 + 80)[0]
    block_size = struct.unpack_from("<H", head, 0x8000 + 128)[0]
    return int(blocks * block_size)


# --- inspection and the safety check ------------------------------------------------------


def _seek(f: BinaryIO, offset: int, file_size: int, what: str) -> None:
    if offset >= file_size:
        raise ImageError(f"{what} at offset {offset} lies past the end of the file")
    f.seek(offset)


def _read_at(path: Path, offset: int, length: int) -> bytes:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read(length)
    except OSError as e:
        raise ImageError(f"{path}: cannot read image: {e.strerror or e}") from e


@dataclass(frozen=True)
class _Details:
    info: ImageInfo
    vmdk: _Vmdk | None = None
    vdi: _Vdi | None = None
    vhdx: _Vhdx | None = None


def _inspect(path: Path) -> _Details:
    try:
        with path.open("rb") as f:
            file_size = path.stat().st_size
            head = f.read(PROBE_BYTES)
            fmt = _detect(head)
            if fmt is ImageFormat.QCOW2:
                f.seek(0)
                q = _read_qcow2(f, file_size)
                return _Details(ImageInfo(path, fmt, q.virtual_size, file_size, q))
            if fmt is ImageFormat.VMDK:
                vmdk = _read_vmdk(f, head, file_size)
                return _Details(ImageInfo(path, fmt, vmdk.virtual_size, file_size), vmdk=vmdk)
            if fmt is ImageFormat.VDI:
                vdi = _read_vdi(head)
                return _Details(ImageInfo(path, fmt, vdi.virtual_size, file_size), vdi=vdi)
            if fmt is ImageFormat.VHDX:
                vhdx = _read_vhdx(f, file_size)
                return _Details(ImageInfo(path, fmt, vhdx.virtual_size, file_size), vhdx=vhdx)
            if fmt is ImageFormat.ISO:
                return _Details(ImageInfo(path, fmt, _iso_size(head), file_size))
            return _Details(ImageInfo(path, fmt, file_size, file_size))
    except OSError as e:
        raise ImageError(f"{path}: cannot read image: {e.strerror or e}") from e


def inspect_image(path: Path) -> ImageInfo:
    """Format and sizes of an image from its headers alone (bounded reads, no qemu-img).

    Raises ImageError when the file cannot be read or its header is broken. This does
    not judge whether the image is safe to open; see `check_foreign_image`.
    """
    try:
        return _inspect(path).info
    except ImageError as e:
        if isinstance(e.__cause__, OSError):
            raise
        raise ImageError(f"{path}: {e}") from e


def check_foreign_image(
    path: Path, *, allow_backing: bool = False, references: References | None = None,
) -> ImageInfo:
    """Inspect an image from outside and refuse it unless its headers are safe to open.

    Raises UnsafeImage, naming the check that failed, for: a backing file (with
    `allow_backing`, any backing name but a plain relative name in the same directory;
    `references` says more precisely what else the image may name, see References),
    an external data file, the corrupt bit or unknown incompatible features, encryption,
    absurd sizes and tables, broken or truncated headers, and VMDK extents in other files.
    Raises ImageError only when the file cannot be read at all.
    """
    if references is None:
        references = References.BESIDE if allow_backing else References.REFUSE
    try:
        details = _inspect(path)
    except ImageError as e:
        if isinstance(e.__cause__, OSError):
            raise  # unreadable, not refused
        raise UnsafeImage(f"{path}: refused: {e}") from e
    info = details.info
    problem = _problem(details, references)
    if problem is not None:
        raise UnsafeImage(f"{path}: refused {info.format.value} image: {problem}")
    return info


def _problem(details: _Details, refs: References) -> str | None:
    """What is wrong with the image, or None: the first failing check, in words."""
    info = details.info
    if info.format is ImageFormat.RAW and info.file_size < MIN_IMAGE_SIZE:
        # Also what a qcow2 file cut inside its magic looks like.
        return f"too small to be a disk image ({info.file_size} bytes; truncated header?)"
    if info.virtual_size > MAX_VIRTUAL_SIZE:
        return f"virtual size {info.virtual_size} exceeds the {MAX_VIRTUAL_SIZE >> 40} TiB limit"
    if info.qcow2 is not None:
        return _qcow2_problem(info.qcow2, info.file_size, refs)
    if details.vmdk is not None:
        return _vmdk_problem(details.vmdk, refs, info.path)
    if details.vdi is not None:
        vdi = details.vdi
        if vdi.image_type not in (1, 2):
            return f"vdi image type {vdi.image_type} (only dynamic and static are accepted)"
        if vdi.block_size != 1 << 20:
            return f"vdi block size {vdi.block_size} (QEMU supports only 1 MiB)"
        if vdi.blocks_in_image * vdi.block_size < vdi.virtual_size:
            return "vdi block map smaller than the virtual size"
        if vdi.blocks_in_image > (MAX_VIRTUAL_SIZE >> 20):
            return f"vdi block count {vdi.blocks_in_image} absurd"
    if details.vhdx is not None and details.vhdx.has_parent:
        return _backing_problem("a vhdx parent", References.REFUSE)
    return None


def _qcow2_problem(q: Qcow2Header, file_size: int, refs: References) -> str | None:
    if q.backing_file is not None:
        problem = _backing_problem(q.backing_file, refs)
        if problem is not None:
            return problem
    if q.incompatible_features & INCOMPAT_DATA_FILE or q.data_file is not None:
        return f"external data file (incompatible bit 2, data file {q.data_file!r})"
    if any(e.kind == EXT_DATA_FILE for e in q.extensions):
        return "external data file header extension"
    unknown = q.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        bits = [i for i in range(64) if unknown >> i & 1]
        return f"unknown incompatible feature bits {bits}"
    if q.incompatible_features & INCOMPAT_CORRUPT:
        return "marked corrupt (incompatible bit 1)"
    if q.crypt_method != 0 or any(e.kind == EXT_ENCRYPTION for e in q.extensions):
        return f"encrypted (crypt_method {q.crypt_method}); encrypted images are not supported"
    if q.compression_type > 1:
        return f"unknown compression type {q.compression_type}"
    if q.compression_type and not q.incompatible_features & INCOMPAT_COMPRESSION:
        return "compression type set without its incompatible feature bit"
    for offset, what in (
        (q.l1_table_offset, "L1 table"), (q.refcount_table_offset, "refcount table"),
        (q.snapshots_offset, "snapshot table"),
    ):
        if offset % q.cluster_size:
            return f"{what} offset {offset} not cluster aligned"
    if q.l1_size > MAX_L1_ENTRIES:
        return f"L1 table too large ({q.l1_size} entries > {MAX_L1_ENTRIES})"
    entry_bytes = 16 if q.incompatible_features & INCOMPAT_EXTL2 else 8
    bytes_per_l1 = q.cluster_size * (q.cluster_size // entry_bytes)
    largest = max([q.virtual_size, *(s.virtual_size or 0 for s in q.snapshots)])
    needed = -(-largest // bytes_per_l1)
    # qemu-img resize --shrink keeps the old L1 size; allow up to a cluster of entries.
    allowed = max(needed, q.cluster_size // 8)
    if q.l1_size > allowed:
        return (
            f"L1 table size {q.l1_size} larger than needed for virtual size "
            f"{q.virtual_size} ({needed} entries)"
        )
    if q.l1_size < -(-q.virtual_size // bytes_per_l1):
        return f"L1 table size {q.l1_size} too small for virtual size {q.virtual_size}"
    if q.refcount_table_clusters * q.cluster_size > MAX_REFCOUNT_TABLE_BYTES:
        return f"refcount table too large ({q.refcount_table_clusters} clusters)"
    if q.nb_snapshots > MAX_SNAPSHOTS:
        return f"too many snapshots ({q.nb_snapshots} > {MAX_SNAPSHOTS})"
    for what, offset in (("L1 table", q.l1_table_offset),
                         ("refcount table", q.refcount_table_offset)):
        if offset >= file_size and not (what == "L1 table" and q.l1_size == 0):
            return f"{what} offset {offset} lies past the end of the file ({file_size} bytes)"
    return None


def _backing_problem(name: str, refs: References) -> str | None:
    """None when `name` is an acceptable backing file name, else why it is not."""
    if refs is References.IGNORE:
        return None  # never opened
    if refs is References.REFUSE:
        return f"backing file {name!r} (backing files are not allowed here)"
    if name.startswith("json:"):
        return f"backing file {name!r} is a json: name"
    if ":" in name.split("/", 1)[0]:
        return f"backing file {name!r} has a protocol prefix"
    if not name:
        return "backing file '' is not a plain name in the image's directory"
    if refs is References.FOLLOW:
        return None  # any path the user asked to follow; each layer is checked in turn
    pure = PurePosixPath(name)
    if pure.is_absolute():
        return f"backing file {name!r} is an absolute path"
    if ".." in pure.parts:
        return f"backing file {name!r} contains '..'"
    if len(pure.parts) != 1 or name in ("", "."):
        return f"backing file {name!r} is not a plain name in the image's directory"
    return None


def _vmdk_problem(vmdk: _Vmdk, refs: References, path: Path) -> str | None:
    if vmdk.parent is not None:
        if refs in (References.FOLLOW, References.IGNORE):
            # A VMDK parent has no recorded format: qemu would probe it.
            return f"vmdk parent {vmdk.parent!r} (a parent's format is never recorded)"
        problem = _backing_problem(vmdk.parent, refs)
        if problem is not None:
            return problem
    if not vmdk.sparse:
        if vmdk.extents and refs is References.FOLLOW:
            return _extents_problem(vmdk, path.parent)
        if vmdk.extents:
            names = ", ".join(repr(name) for _, name in vmdk.extents[:3])
            return f"vmdk descriptor names extents in other files ({names})"
        return "vmdk descriptor without a sparse header or extents"
    if vmdk.capacity == 0:
        return "vmdk sparse header with zero capacity (QEMU would follow its descriptor)"
    if vmdk.create_type not in (None, "monolithicSparse", "streamOptimized"):
        return f"vmdk create type {vmdk.create_type!r} references other files"
    if len(vmdk.extents) > 1 or any(kind != "SPARSE" for kind, _ in vmdk.extents):
        return "vmdk descriptor names more than its own sparse extent"
    if not 1 <= vmdk.grain_size <= 0x200000:
        return f"vmdk grain size {vmdk.grain_size} sectors absurd"
    if not 1 <= vmdk.gtes_per_gt <= 512:
        return f"vmdk grain table size {vmdk.gtes_per_gt} absurd"
    return None


VMDK_EXTENT_KINDS = ("FLAT", "SPARSE", "ZERO")


def _extents_problem(vmdk: _Vmdk, directory: Path) -> str | None:
    """None when every extent of a VMDK descriptor is a plain file beside it."""
    for kind, name in vmdk.extents:
        if kind not in VMDK_EXTENT_KINDS:
            return f"vmdk extent type {kind} (only {', '.join(VMDK_EXTENT_KINDS)})"
        if kind == "ZERO":
            continue
        pure = PurePosixPath(name)
        if not name or ":" in name or len(pure.parts) != 1 or name in (".", ".."):
            return f"vmdk extent {name!r} is not a plain name beside the descriptor"
        extent = directory / name
        try:
            mode = extent.lstat().st_mode
        except OSError:
            return f"vmdk extent {name!r} is missing"
        if not stat.S_ISREG(mode):
            return f"vmdk extent {name!r} is not a regular file (a link or a device)"
        if kind == "SPARSE":
            try:
                check_foreign_image(extent)
            except UnsafeImage as e:
                return f"vmdk extent {name!r}: {e}"
    return None
