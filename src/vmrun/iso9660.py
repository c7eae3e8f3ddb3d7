"""A small ISO 9660 writer: one flat root directory, Joliet and Rock Ridge names.

Enough for a cloud-init NoCloud seed (`user-data`, `meta-data`, ...) without genisoimage or
xorriso. The image is laid out as:

    0-15    system area (zeros)
    16      primary volume descriptor
    17      Joliet supplementary volume descriptor (escape `%/E`, UCS-2 level 3)
    18      volume descriptor set terminator
    19-22   path tables: primary L, primary M, Joliet L, Joliet M (root only)
    23-     primary root directory (Rock Ridge SUSP entries), then Joliet root directory
    then    file data, each file starting on a sector

The output depends only on the arguments, so the same seed gives the same bytes.
"""

from __future__ import annotations

import stat
import string
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

from vmrun.errors import UsageError

SECTOR = 2048
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_NAME = 64  # Joliet's limit, in characters

_D_CHARACTERS = frozenset(string.ascii_uppercase + string.digits + "_")
_JOLIET_FORBIDDEN = frozenset("*/:;?\\")
_FIRST_DIRECTORY_SECTOR = 23
_FILE_MODE = stat.S_IFREG | 0o444
_DIR_MODE = stat.S_IFDIR | 0o555
# RRIP 1.09 "RR" flags: which Rock Ridge entries a record carries.
_RR_PX = 0x01
_RR_NM = 0x08
# Directory record: 33 fixed bytes, the identifier, a pad byte, then the system use area.
_MAX_RECORD = 255


@dataclass(frozen=True)
class _Entry:
    name: str  # the real name, as Rock Ridge gives it
    iso_name: bytes  # 8.3 d-characters plus ";1"
    joliet_name: bytes  # UCS-2 big-endian
    data: bytes
    extent: int = 0


def write_iso(
    out: BinaryIO,
    files: Mapping[str, bytes],
    *,
    volume_id: str,
    timestamp: datetime = EPOCH,
) -> None:
    """Write an ISO 9660 image holding `files` in its root directory to `out`.

    Names are plain file names (no `/`, no NUL, at most 64 characters); Rock Ridge and
    Joliet readers see them exactly, plain ISO 9660 readers see 8.3 upper-case versions.
    `volume_id` is written as given (cloud-init's `cidata` is lower case, like
    cloud-localds writes it); `timestamp` is every date in the image.
    """
    _check_volume_id(volume_id)
    if timestamp.tzinfo is None:
        raise UsageError("ISO timestamp has no time zone", hint="pass an aware datetime")
    when = timestamp.astimezone(UTC)
    entries = _entries(files)

    # Sizes first: a record's length does not depend on its extent or size fields.
    primary_dir = _directory_sectors(_primary_records(entries, 0, 0, when))
    joliet_dir = _directory_sectors(_joliet_records(entries, 0, 0, when))
    primary_at = _FIRST_DIRECTORY_SECTOR
    joliet_at = primary_at + primary_dir
    next_free = joliet_at + joliet_dir
    placed: list[_Entry] = []
    for entry in entries:
        if entry.data:
            placed.append(_with_extent(entry, next_free))
            next_free += _sectors(len(entry.data))
        else:
            placed.append(entry)  # an empty file has no extent; 0 is the convention
    total = next_free

    out.write(bytes(16 * SECTOR))
    out.write(_volume_descriptor(
        joliet=False, volume_id=volume_id, total=total, when=when,
        path_tables=(19, 20), root=_root_record(primary_at, primary_dir, when),
    ))
    out.write(_volume_descriptor(
        joliet=True, volume_id=volume_id, total=total, when=when,
        path_tables=(21, 22), root=_root_record(joliet_at, joliet_dir, when),
    ))
    out.write(_pad(b"\xff" + b"CD001" + b"\x01"))
    out.write(_pad(_path_table_root(primary_at, little=True)))
    out.write(_pad(_path_table_root(primary_at, little=False)))
    out.write(_pad(_path_table_root(joliet_at, little=True)))
    out.write(_pad(_path_table_root(joliet_at, little=False)))
    out.write(_pack_directory(_primary_records(placed, primary_at, primary_dir, when)))
    out.write(_pack_directory(_joliet_records(placed, joliet_at, joliet_dir, when)))
    for entry in placed:
        if entry.data:
            out.write(_pad(entry.data))


def iso_name(name: str) -> str:
    """The ISO 9660 level 1 name for `name`, before de-duplication: `user-data` -> `USER_DAT.;1`."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""

    def d_characters(text: str, limit: int) -> str:
        return "".join(c if c in _D_CHARACTERS else "_" for c in text.upper())[:limit]

    return f"{d_characters(stem, 8) or '_'}.{d_characters(ext, 3)};1"


def _check_name(name: str) -> None:
    hint = "seed files are plain file names like user-data"
    if not name or name in (".", ".."):
        raise UsageError(f"ISO file name {name!r} is not a file name", hint=hint)
    if "/" in name or "\0" in name:
        raise UsageError(f"ISO file name {name!r} contains '/' or NUL", hint=hint)
    if len(name) > MAX_NAME:
        raise UsageError(f"ISO file name {name[:20]!r}... is longer than {MAX_NAME} characters",
                         hint=hint)
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"ISO file name {name!r} is not valid Unicode", hint=hint) from None
    if len(encoded) > 128:
        raise UsageError(f"ISO file name {name!r} is longer than 128 bytes in UTF-8", hint=hint)


def _check_volume_id(volume_id: str) -> None:
    if not volume_id or len(volume_id) > 16 or not all(
        c.isascii() and c.isprintable() for c in volume_id
    ):
        raise UsageError(f"ISO volume id {volume_id!r} is not 1 to 16 printable ASCII characters",
                         hint="cloud-init's NoCloud seed uses 'cidata'")


def _entries(files: Mapping[str, bytes]) -> list[_Entry]:
    for name in files:
        _check_name(name)
    # Sorted by the real name, so the mapping's order does not change the image.
    items = sorted(files.items())
    iso_names = _unique([iso_name(n) for n, _ in items], _shorten_iso)
    joliet_names = _unique([_joliet_text(n) for n, _ in items], _shorten_joliet)
    return [
        _Entry(name, i.encode("ascii"), j.encode("utf-16-be"), bytes(data))
        for (name, data), i, j in zip(items, iso_names, joliet_names, strict=True)
    ]


def _unique(names: list[str], shorten: Callable[[str, str], str]) -> list[str]:
    seen: set[str] = set()
    result = []
    for name in names:
        candidate, n = name, 0
        while candidate in seen:
            n += 1
            candidate = shorten(name, str(n))
        seen.add(candidate)
        result.append(candidate)
    return result


def _shorten_iso(name: str, suffix: str) -> str:
    stem, rest = name.split(".", 1)
    return f"{stem[: 8 - len(suffix)]}{suffix}.{rest}"


def _shorten_joliet(name: str, suffix: str) -> str:
    return name[: MAX_NAME - len(suffix) - 1] + "_" + suffix


def _joliet_text(name: str) -> str:
    # UCS-2 has no surrogate pairs: characters outside the BMP get "_" (Rock Ridge keeps them).
    return "".join("_" if c in _JOLIET_FORBIDDEN or ord(c) > 0xFFFF else c for c in name)


def _iso_key(name: bytes) -> tuple[bytes, bytes]:
    # ECMA-119 9.3: order by name, then extension, each padded with spaces.
    stem, _, rest = name.partition(b".")
    return stem.ljust(8), rest.ljust(6)


def _with_extent(entry: _Entry, extent: int) -> _Entry:
    return _Entry(entry.name, entry.iso_name, entry.joliet_name, entry.data, extent)


def _sectors(size: int) -> int:
    return -(-size // SECTOR)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % SECTOR)


def _both16(value: int) -> bytes:
    return struct.pack("<H", value) + struct.pack(">H", value)


def _both32(value: int) -> bytes:
    return struct.pack("<I", value) + struct.pack(">I", value)


def _record_date(when: datetime) -> bytes:
    return bytes([when.year - 1900, when.month, when.day, when.hour, when.minute,
                  when.second, 0])


def _volume_date(when: datetime | None) -> bytes:
    if when is None:
        return b"0" * 16 + b"\0"
    return when.strftime("%Y%m%d%H%M%S").encode("ascii") + b"00\0"


def _directory_record(
    extent: int, size: int, when: datetime, flags: int, identifier: bytes, system_use: bytes,
) -> bytes:
    body = (
        b"\0"  # extended attribute record length
        + _both32(extent) + _both32(size) + _record_date(when)
        + bytes([flags, 0, 0]) + _both16(1) + bytes([len(identifier)]) + identifier
    )
    if len(identifier) % 2 == 0:
        body += b"\0"
    record = body + system_use
    if (len(record) + 1) % 2:
        record += b"\0"
    assert len(record) + 1 <= _MAX_RECORD, "name length checks keep records in bounds"
    return bytes([len(record) + 1]) + record


def _root_record(extent: int, sectors: int, when: datetime) -> bytes:
    return _directory_record(extent, sectors * SECTOR, when, 0x02, b"\0", b"")


def _dot_record(
    extent: int, sectors: int, when: datetime, *, rock_ridge: bool, root_dot: bool,
) -> bytes:
    system_use = b""
    if rock_ridge:
        if root_dot:
            # SUSP: "SP" first in the root's "." record says SUSP is in use, skipping 0 bytes.
            system_use += b"SP\x07\x01\xbe\xef\x00"
        system_use += _rr(_RR_PX) + _px(_DIR_MODE, links=2)
    identifier = b"\0" if root_dot else b"\1"
    return _directory_record(extent, sectors * SECTOR, when, 0x02, identifier, system_use)


def _file_record(entry: _Entry, when: datetime, *, rock_ridge: bool) -> bytes:
    if not rock_ridge:
        return _directory_record(entry.extent, len(entry.data), when, 0, entry.joliet_name, b"")
    name = entry.name.encode("utf-8")
    system_use = (
        _rr(_RR_PX | _RR_NM) + _px(_FILE_MODE, links=1)
        + b"NM" + bytes([5 + len(name), 1, 0]) + name
    )
    return _directory_record(entry.extent, len(entry.data), when, 0, entry.iso_name, system_use)


def _primary_records(
    entries: list[_Entry], extent: int, sectors: int, when: datetime,
) -> list[bytes]:
    return [
        _dot_record(extent, sectors, when, rock_ridge=True, root_dot=True),
        _dot_record(extent, sectors, when, rock_ridge=True, root_dot=False),
    ] + [_file_record(e, when, rock_ridge=True)
         for e in sorted(entries, key=lambda e: _iso_key(e.iso_name))]


def _joliet_records(
    entries: list[_Entry], extent: int, sectors: int, when: datetime,
) -> list[bytes]:
    return [
        _dot_record(extent, sectors, when, rock_ridge=False, root_dot=True),
        _dot_record(extent, sectors, when, rock_ridge=False, root_dot=False),
    ] + [_file_record(e, when, rock_ridge=False)
         for e in sorted(entries, key=lambda e: e.joliet_name)]


def _rr(flags: int) -> bytes:
    return b"RR\x05\x01" + bytes([flags])


def _px(mode: int, *, links: int) -> bytes:
    # RRIP 1.09 layout (36 bytes): mode, links, uid, gid; root owns everything.
    return b"PX\x24\x01" + _both32(mode) + _both32(links) + _both32(0) + _both32(0)


def _directory_sectors(records: list[bytes]) -> int:
    return len(_pack_directory(records)) // SECTOR


def _pack_directory(records: list[bytes]) -> bytes:
    # A directory record never crosses a sector boundary.
    sectors: list[bytes] = []
    current = b""
    for record in records:
        if len(current) + len(record) > SECTOR:
            sectors.append(_pad(current))
            current = b""
        current += record
    sectors.append(_pad(current))
    return b"".join(sectors)


def _path_table_root(extent: int, *, little: bool) -> bytes:
    order = "<" if little else ">"
    return bytes([1, 0]) + struct.pack(order + "IH", extent, 1) + b"\0\0"


def _text(value: str, width: int, *, joliet: bool) -> bytes:
    if joliet:
        encoded = value.encode("utf-16-be")
        return (encoded + " ".encode("utf-16-be") * width)[:width]
    return value.encode("ascii").ljust(width, b" ")


def _volume_descriptor(
    *, joliet: bool, volume_id: str, total: int, when: datetime,
    path_tables: tuple[int, int], root: bytes,
) -> bytes:
    l_table, m_table = path_tables
    escape = b"%/E" if joliet else b""
    created = _volume_date(when)
    descriptor = (
        bytes([2 if joliet else 1]) + b"CD001" + b"\x01\x00"
        + _text("", 32, joliet=joliet)  # system id
        + _text(volume_id, 32, joliet=joliet)
        + bytes(8)
        + _both32(total)
        + escape.ljust(32, b"\0")
        + _both16(1) + _both16(1) + _both16(SECTOR)
        + _both32(10)  # path table size: the root's record alone
        + struct.pack("<II", l_table, 0) + struct.pack(">II", m_table, 0)
        + root
        + _text("", 128, joliet=joliet)  # volume set id
        + _text("", 128, joliet=joliet)  # publisher
        + _text("", 128, joliet=joliet)  # data preparer
        + _text("VMRUN", 128, joliet=joliet)  # application
        + _text("", 37, joliet=joliet) * 3  # copyright, abstract, bibliographic files
        + created + created + _volume_date(None) + created
        + b"\x01\x00"
    )
    assert len(descriptor) == 883, len(descriptor)
    return _pad(descriptor)
