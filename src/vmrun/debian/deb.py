"""Read Debian binary packages (.deb) in pure Python: the ar container and its tarballs."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import importlib
import io
import lzma
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO, cast

from vmrun.errors import FetchError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

_AR_MAGIC = b"!<arch>\n"
_AR_HEADER_SIZE = 60
_CONTROL_LIMIT = 1 << 20


@dataclass(frozen=True)
class _ArMember:
    name: str
    offset: int
    size: int


def parse_stanzas(text: str, *, source: str) -> list[dict[str, str]]:
    """Parse deb822 text (control files, Packages, Release) into one dict per stanza.

    Continuation lines are joined to their field with a newline, stripped.
    """
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key: str | None = None
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            if current:
                stanzas.append(current)
                current = {}
            key = None
            continue
        if line[0] in " \t":
            if key is None:
                raise FetchError(f"{source}: line {number}: continuation line without a field")
            current[key] += "\n" + line.strip()
            continue
        if line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep or not key:
            raise FetchError(f"{source}: line {number}: not a 'Field: value' line")
        current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def _ar_members(f: BinaryIO, deb: Path) -> list[_ArMember]:
    if f.read(len(_AR_MAGIC)) != _AR_MAGIC:
        raise FetchError(f"{deb}: not a .deb (no ar archive header)")
    total = f.seek(0, os.SEEK_END)
    members: list[_ArMember] = []
    long_names = b""
    pos = len(_AR_MAGIC)
    while pos < total:
        f.seek(pos)
        header = f.read(_AR_HEADER_SIZE)
        if len(header) < _AR_HEADER_SIZE or header[58:60] != b"`\n":
            raise FetchError(f"{deb}: corrupt ar member header at offset {pos}")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise FetchError(f"{deb}: corrupt ar member size at offset {pos}") from None
        start = pos + _AR_HEADER_SIZE
        if size < 0 or start + size > total:
            raise FetchError(f"{deb}: ar member at offset {pos} runs past the end of the file")
        pos = start + size + (size & 1)
        name = header[:16].decode("ascii", "replace").rstrip(" ")
        offset, length = start, size
        if name.startswith("#1/"):
            # BSD ar keeps long names at the start of the member's data.
            try:
                name_length = int(name[3:])
            except ValueError:
                raise FetchError(f"{deb}: corrupt BSD ar member name {name!r}") from None
            if not 0 <= name_length <= size:
                raise FetchError(f"{deb}: corrupt BSD ar member name {name!r}")
            f.seek(start)
            name = f.read(name_length).rstrip(b"\0").decode("utf-8", "replace")
            offset, length = start + name_length, size - name_length
        elif name == "//":
            f.seek(start)
            long_names = f.read(size)
            continue
        elif name in ("/", "/SYM64/"):
            continue
        elif name.startswith("/") and name[1:].isdigit():
            index = int(name[1:])
            end = long_names.find(b"/\n", index)
            if end < 0:
                raise FetchError(f"{deb}: corrupt GNU ar long name {name!r}")
            name = long_names[index:end].decode("utf-8", "replace")
        else:
            name = name.removesuffix("/")
        members.append(_ArMember(name=name, offset=offset, size=length))
    return members


class _MemberReader(io.RawIOBase):
    """A read-only window onto one ar member, so that a tar reader stops at its end."""

    def __init__(self, f: BinaryIO, offset: int, size: int) -> None:
        self._f = f
        self._pos = offset
        self._end = offset + size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        count = min(len(view), self._end - self._pos)
        if count <= 0:
            return 0
        self._f.seek(self._pos)
        data = self._f.read(count)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _decompressed(raw: BinaryIO, member: str, deb: Path) -> IO[bytes]:
    suffix = member.rpartition(".")[2] if member.count(".") > 1 else ""
    if suffix == "xz":
        return lzma.LZMAFile(raw)
    if suffix == "gz":
        # typeshed does not count GzipFile as an IO[bytes]; tarfile only needs read().
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
    if suffix == "bz2":
        return bz2.BZ2File(raw)
    if suffix == "zst":
        try:
            zstandard = importlib.import_module("zstandard")
        except ImportError:
            raise FetchError(
                f"{deb}: {member} is zstd-compressed and the 'zstandard' module is missing",
                hint="install it with: pip install zstandard",
            ) from None
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return cast(IO[bytes], reader)
    if suffix == "":
        return raw
    raise FetchError(f"{deb}: {member} uses an unsupported compression")


@contextlib.contextmanager
def _open_tar(deb: Path, stem: str) -> Iterator[tarfile.TarFile]:
    """Stream the tarball STEM(.compression) held in DEB."""
    try:
        f = open(deb, "rb")
    except OSError as err:
        raise FetchError(f"{deb}: {err.strerror}") from None
    with f:
        members = _ar_members(f, deb)
        by_name = {member.name: member for member in members}
        version = by_name.get("debian-binary")
        if version is None:
            raise FetchError(f"{deb}: not a .deb (no debian-binary member)")
        f.seek(version.offset)
        first_line = f.read(min(version.size, 64)).split(b"\n")[0]
        if not first_line.startswith(b"2."):
            raise FetchError(f"{deb}: unsupported .deb format version {first_line!r}")
        found = [m for m in members if m.name == stem or m.name.startswith(stem + ".")]
        if not found:
            raise FetchError(f"{deb}: no {stem} member")
        member = found[0]
        raw = io.BufferedReader(_MemberReader(f, member.offset, member.size), 1 << 16)
        stream = _decompressed(raw, member.name, deb)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                yield tar
        except Exception as err:
            # Writes are turned into FetchError by the caller, so what is left is reading.
            if _is_stream_error(err):
                raise FetchError(f"{deb}: corrupt {member.name}: {err}") from None
            raise


def _is_stream_error(err: Exception) -> bool:
    # gzip and bz2 report corruption as OSError; zstandard has its own ZstdError.
    if isinstance(err, tarfile.TarError | EOFError | lzma.LZMAError | zlib.error | OSError):
        return True
    return type(err).__module__.startswith("zstandard")


def _member_path(name: str, deb: Path) -> str:
    """The member's path relative to the root, "" for the root; refuses escapes."""
    if name.startswith("/"):
        raise FetchError(f"{deb}: refusing absolute member path {name!r}")
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise FetchError(f"{deb}: refusing member path with '..': {name!r}")
        parts.append(part)
    return "/".join(parts)


def read_control(deb: Path) -> dict[str, str]:
    """The fields of DEB's control file (control.tar.* -> ./control)."""
    with _open_tar(deb, "control.tar") as tar:
        for member in tar:
            if member.isreg() and _member_path(member.name, deb) == "control":
                handle = tar.extractfile(member)
                if handle is None:
                    break
                text = handle.read(_CONTROL_LIMIT).decode("utf-8", "replace")
                stanzas = parse_stanzas(text, source=f"{deb}: control")
                if stanzas:
                    return stanzas[0]
                break
    raise FetchError(f"{deb}: no control file in control.tar")


def _prepare_parents(dest: Path, rel: str, deb: Path) -> None:
    # A symlink among the parents would send the write outside DEST (lib -> /etc).
    current = dest
    for part in rel.split("/")[:-1]:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            continue
        if stat.S_ISLNK(mode):
            raise FetchError(f"{deb}: refusing {rel!r}: it would be written through a symlink")
        if not stat.S_ISDIR(mode):
            raise FetchError(f"{deb}: refusing {rel!r}: a parent is not a directory")


def _clear(target: Path, rel: str, deb: Path) -> None:
    """Remove what is at TARGET (never following it) so a new entry can take its place."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        raise FetchError(f"{deb}: refusing {rel!r}: a directory is in the way")
    target.unlink()


def extract_deb(deb: Path, dest: Path, *, select: Callable[[str], bool] | None = None) -> list[str]:
    """Extract DEB's data.tar into DEST; return the relative paths written, in archive order.

    Only regular files, hard links, directories and symlinks are written; device nodes
    and FIFOs are skipped, setuid/setgid bits dropped, and symlinks are never followed.
    SELECT, if given, sees each normalized member path ("usr/bin/x") and says whether to
    extract it. Absolute or '..' member paths, and writes through a symlink already in
    DEST, raise FetchError.
    """
    dest.mkdir(parents=True, exist_ok=True)
    extracted: list[str] = []
    regular: set[str] = set()
    directories: list[tuple[Path, int, float]] = []
    with _open_tar(deb, "data.tar") as tar:
        for member in tar:
            rel = _member_path(member.name, deb)
            if not rel or (select is not None and not select(rel)):
                continue
            if not (member.isdir() or member.isreg() or member.issym() or member.islnk()):
                continue
            try:
                written = _extract_member(tar, member, rel, dest, deb, regular, directories)
            except OSError as err:
                raise FetchError(f"{deb}: cannot extract {rel!r} into {dest}: {err}") from None
            if written:
                extracted.append(rel)
    try:
        for directory, mode, mtime in reversed(directories):
            os.chmod(directory, mode)
            os.utime(directory, (mtime, mtime))
    except OSError as err:
        raise FetchError(f"{deb}: cannot set modes under {dest}: {err}") from None
    return extracted


def _extract_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    rel: str,
    dest: Path,
    deb: Path,
    regular: set[str],
    directories: list[tuple[Path, int, float]],
) -> bool:
    target = dest / rel
    _prepare_parents(dest, rel, deb)
    if member.isdir():
        try:
            mode = os.lstat(target).st_mode
        except FileNotFoundError:
            os.mkdir(target, 0o755)
        else:
            if not stat.S_ISDIR(mode):
                _clear(target, rel, deb)
                os.mkdir(target, 0o755)
        # Applied last: a read-only directory would block the files inside it.
        directories.append((target, member.mode & 0o1777, member.mtime))
    elif member.isreg():
        handle = tar.extractfile(member)
        if handle is None:
            return False
        _clear(target, rel, deb)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(target, flags, 0o600), "wb") as out:
            while chunk := _read_member(handle, deb, rel):
                out.write(chunk)
            # The mask drops setuid, setgid and sticky bits.
            os.fchmod(out.fileno(), member.mode & 0o777)
        os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
        regular.add(rel)
    elif member.issym():
        _clear(target, rel, deb)
        os.symlink(member.linkname, target)
        os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
    else:
        source = _member_path(member.linkname, deb)
        if source not in regular:
            raise FetchError(
                f"{deb}: hard link {rel!r} points to unextracted {source!r}",
                hint="a selection must include the targets of the hard links it keeps",
            )
        _clear(target, rel, deb)
        os.link(dest / source, target, follow_symlinks=False)
        regular.add(rel)
    return True


def _read_member(handle: IO[bytes], deb: Path, rel: str) -> bytes:
    try:
        return handle.read(1 << 20)
    except Exception as err:
        if _is_stream_error(err):
            raise FetchError(f"{deb}: corrupt data.tar at {rel!r}: {err}") from None
        raise
