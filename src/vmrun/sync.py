"""Copying a project directory into a guest and chosen results back, as tar streams: packing
with rsync-style rules, the guest's sh+tar argv, and unpacking the guest's untrusted output.
Nothing here touches a VM; the caller streams the bytes over SSH.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import secrets
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vmrun.errors import UsageError, VmrunError


class TransferError(VmrunError):
    """The guest's tar stream is broken, or its results go over a transfer limit."""


@dataclass(frozen=True)
class Rule:
    include: bool
    pattern: str


@dataclass(frozen=True)
class Limits:
    max_files: int = 100_000        # entries (files, dirs, links) in one transfer
    max_bytes: int = 4 << 30        # total bytes of regular file contents
    max_file_bytes: int = 2 << 30   # one file


@dataclass(frozen=True)
class PackReport:
    files: int      # entries written: files, directories and symlinks
    bytes: int      # bytes of regular file contents


@dataclass(frozen=True)
class CollectReport:
    files: int                  # entries written: files, directories and symlinks
    bytes: int                  # bytes of regular file contents written
    skipped: tuple[str, ...]    # "NAME: reason", the first _SKIPPED_SHOWN of them
    skipped_count: int


_SKIPPED_SHOWN = 20
_LIMIT_HINT = "select less, or raise the limit"


# -- include/exclude rules --------------------------------------------------------------------


def parse_rules(includes_and_excludes: Sequence[tuple[str, str]]) -> tuple[Rule, ...]:
    """Rules from ("include"|"exclude", PATTERN) pairs in command-line order."""
    rules: list[Rule] = []
    for kind, pattern in includes_and_excludes:
        if kind not in ("include", "exclude"):
            raise UsageError(f"unknown rule kind {kind!r}", hint='use "include" or "exclude"')
        where = f"--{kind} {pattern!r}"
        if "\0" in pattern:
            raise UsageError(f"{where}: a pattern cannot contain NUL")
        if not pattern.strip("/"):
            raise UsageError(f"--{kind}: empty pattern", hint="name a file, a directory or a glob")
        if ".." in pattern.split("/"):
            raise UsageError(f"{where}: a pattern cannot contain a '..' component",
                             hint="patterns match paths inside the transfer, from its root")
        try:
            _matcher(pattern)
        except re.error as e:
            raise UsageError(f"{where}: bad pattern ({e})") from None
        rules.append(Rule(include=kind == "include", pattern=pattern))
    return tuple(rules)


def is_selected(relpath: str, is_dir: bool, rules: Sequence[Rule]) -> bool:
    """Whether RELPATH is in the transfer: rsync's rules, the first match wins, no match
    includes, and a path under an excluded directory is out, as rsync never descends there."""
    parts = [part for part in relpath.split("/") if part not in ("", ".")]
    for depth in range(1, len(parts)):
        if not _first_match("/".join(parts[:depth]), True, rules):
            return False
    return _first_match("/".join(parts), is_dir, rules) if parts else True


@dataclass(frozen=True)
class _Matcher:
    regex: re.Pattern[str]
    dir_only: bool
    # "dir/***": besides the directory itself, anything beneath it, of any type
    beneath: re.Pattern[str] | None


@functools.lru_cache(maxsize=1024)
def _matcher(pattern: str) -> _Matcher:
    anchored = pattern.startswith("/")
    body = pattern.lstrip("/")
    dir_only = body.endswith("/")
    body = body.rstrip("/")
    beneath_too = body.endswith("/***")
    if beneath_too:
        body = body[:-4]
    # rsync matches an unanchored pattern against the path's trailing components; one without
    # an inner "/" thus matches the last component only, as "*" never crosses a "/".
    prefix = "" if anchored else "(?:.*/)?"
    core = prefix + _glob_regex(body)
    return _Matcher(
        regex=re.compile(core, re.DOTALL),
        dir_only=dir_only or beneath_too,
        beneath=re.compile(core + "/.*", re.DOTALL) if beneath_too else None,
    )


def _glob_regex(glob: str) -> str:
    out: list[str] = []
    i, n = 0, len(glob)
    while i < n:
        char = glob[i]
        if char == "*":
            stars = i
            while i < n and glob[i] == "*":
                i += 1
            out.append(".*" if i - stars > 1 else "[^/]*")
            continue
        if char == "?":
            out.append("[^/]")
        elif char == "[" and (found := _char_class(glob, i)) is not None:
            regex, i = found
            out.append(regex)
            continue
        elif char == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(glob[i]))
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def _char_class(glob: str, start: int) -> tuple[str, int] | None:
    i = start + 1
    negate = i < len(glob) and glob[i] in "!^"
    if negate:
        i += 1
    first = i
    if i < len(glob) and glob[i] == "]":
        i += 1
    while i < len(glob) and glob[i] != "]":
        i += 1
    if i >= len(glob):
        return None
    members = "".join(c if c == "-" else re.escape(c) for c in glob[first:i])
    # A class never matches "/", like "*" and "?".
    return ("[^/" + members + "]" if negate else "(?!/)[" + members + "]"), i + 1


def _matches(matcher: _Matcher, relpath: str, is_dir: bool) -> bool:
    if matcher.regex.fullmatch(relpath) and (is_dir or not matcher.dir_only):
        return True
    return matcher.beneath is not None and matcher.beneath.fullmatch(relpath) is not None


def _first_match(relpath: str, is_dir: bool, rules: Sequence[Rule]) -> bool:
    for rule in rules:
        if _matches(_matcher(rule.pattern), relpath, is_dir):
            return rule.include
    return True


# -- host to guest ----------------------------------------------------------------------------


def walk(root: Path, rules: Sequence[Rule]) -> Iterator[str]:
    """Relative POSIX paths of the selected entries under ROOT, each directory's entries in
    name order and before their contents. Symlinks are entries, never followed; sockets,
    FIFOs and device nodes are left out."""
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory", hint="copy in a project directory")
    # An explicit stack, as a deep tree must not hit Python's recursion limit.
    stack = [iter(_sorted_entries(root, ""))]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        relpath, entry = item
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(mode):
            if _first_match(relpath, True, rules):
                yield relpath
                stack.append(iter(_sorted_entries(Path(entry.path), relpath + "/")))
        elif (stat.S_ISREG(mode) or stat.S_ISLNK(mode)) and _first_match(relpath, False, rules):
            yield relpath


def _sorted_entries(directory: Path, prefix: str) -> list[tuple[str, os.DirEntry[str]]]:
    try:
        with os.scandir(directory) as entries:
            found = sorted(entries, key=lambda entry: entry.name)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UsageError(f"cannot read {directory}: {e.strerror}",
                         hint="exclude it, or make it readable") from None
    return [(prefix + entry.name, entry) for entry in found]


def pack(
    root: Path, rules: Sequence[Rule], out: BinaryIO, *, limits: Limits = Limits(),
) -> PackReport:
    """Write an uncompressed PAX tar of walk()'s entries to OUT (a pipe will do): owner root,
    no setuid/setgid/sticky bits, symlinks as symlinks, hard links as separate files."""
    # Limits are checked on a first pass, so that going over one sends nothing at all.
    base = os.fspath(root)
    entries: list[tuple[str, os.stat_result]] = []
    planned = 0
    for relpath in walk(root, rules):
        try:
            st = os.lstat(os.path.join(base, relpath))
        except FileNotFoundError:
            continue
        if len(entries) >= limits.max_files:
            raise UsageError(f"copying in {root}: over max_files={limits.max_files} entries "
                             f"at {relpath}", hint=_LIMIT_HINT)
        if stat.S_ISREG(st.st_mode):
            _check_pack_size(root, relpath, st.st_size, planned, limits)
            planned += st.st_size
        entries.append((relpath, st))

    written = total = 0
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                      encoding="utf-8", errors="surrogateescape") as tar:
        for relpath, st in entries:
            info = tarfile.TarInfo(relpath)
            # The guest extracts as its login user: no owner to keep, no privileges to pass on.
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = st.st_mode & 0o777
            info.mtime = int(st.st_mtime)
            path = os.path.join(base, relpath)
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif stat.S_ISLNK(st.st_mode):
                try:
                    info.linkname = os.readlink(path)
                except FileNotFoundError:
                    continue
                info.type = tarfile.SYMTYPE
                tar.addfile(info)
            else:
                fd = _open_regular(path)
                if fd is None:
                    continue
                with os.fdopen(fd, "rb") as file:
                    # The size that counts is the one at open time: the file may have changed.
                    info.size = os.fstat(file.fileno()).st_size
                    _check_pack_size(root, relpath, info.size, total, limits)
                    tar.addfile(info, _Exactly(file, info.size, relpath))
                total += info.size
            written += 1
    return PackReport(files=written, bytes=total)


def _check_pack_size(root: Path, relpath: str, size: int, total: int, limits: Limits) -> None:
    if size > limits.max_file_bytes:
        raise UsageError(f"copying in {root}: {relpath} ({size} bytes) is over "
                         f"max_file_bytes={limits.max_file_bytes}", hint=_LIMIT_HINT)
    if total + size > limits.max_bytes:
        raise UsageError(f"copying in {root}: over max_bytes={limits.max_bytes} at {relpath}",
                         hint=_LIMIT_HINT)


def _open_regular(path: str) -> int | None:
    # O_NONBLOCK: should the file have turned into a FIFO since the walk, open must not hang.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:  # it became a symlink
            return None
        raise UsageError(f"cannot read {path}: {e.strerror}",
                         hint="exclude it, or make it readable") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


# A file's first SIZE bytes, as tarfile wants them; a file that shrank is an error.
class _Exactly:
    def __init__(self, file: BinaryIO, size: int, relpath: str) -> None:
        self._file, self._left, self._relpath = file, size, relpath

    def read(self, n: int = -1, /) -> bytes:
        want = self._left if n < 0 else min(n, self._left)
        data = self._file.read(want)
        if len(data) < want:
            raise TransferError(f"{self._relpath} shrank while it was being copied",
                                hint="run again once nothing writes to it")
        self._left -= len(data)
        return data


def guest_unpack_argv(dest: str) -> list[str]:
    """argv for the guest: create DEST and extract the tar on stdin into it. The caller quotes
    it for ssh (shlex.join); DEST travels as a positional argument, never as script text."""
    if not dest or "\0" in dest:
        raise UsageError(f"bad destination in the guest: {dest!r}", hint="name a directory")
    return ["sh", "-c", _UNPACK_SCRIPT, "sh", dest]


_UNPACK_SCRIPT = 'mkdir -p -- "$1" && exec tar -x -f - -C "$1"'


def guest_pack_argv(directory: str, patterns: Sequence[str]) -> list[str]:
    """argv for the guest: write to stdout a tar of what the shell globs PATTERNS match under
    DIRECTORY (split on newlines only; a pattern matching nothing is skipped), named relative
    to DIRECTORY, or an empty archive when nothing matches. The caller quotes it for ssh."""
    if not directory or "\0" in directory:
        raise UsageError(f"bad directory in the guest: {directory!r}", hint="name a directory")
    for pattern in patterns:
        where = f"--collect {pattern!r}"
        # The guest's sh splits on newlines: each piece is a pattern of its own.
        pieces = [piece for piece in pattern.split("\n") if piece]
        if not pieces or "\0" in pattern:
            raise UsageError(f"{where}: empty pattern or NUL in it", hint="name what to copy")
        if any(piece.startswith("/") for piece in pieces):
            raise UsageError(f"{where}: the pattern is absolute",
                             hint="patterns are relative to the guest's working directory")
        if any(".." in piece.split("/") for piece in pieces):
            raise UsageError(f"{where}: a pattern cannot contain a '..' component",
                             hint="patterns are relative to the guest's working directory")
    # "./" keeps cd from taking a leading "-" as an option or searching CDPATH.
    if not directory.startswith("/"):
        directory = "./" + directory
    return ["sh", "-c", _PACK_SCRIPT, "sh", directory, *patterns]


# The matches are collected after the patterns in "$@", then the patterns shifted away. The
# unquoted $pattern is split on newlines and globbed, never evaluated. A glob such as ".*"
# matches "." and "..": those are taken only when the pattern names them literally (and ".."
# never, as no pattern has a ".." component). dd writes the empty archive, as tar refuses to.
_PACK_SCRIPT = """\
cd "$1" || exit
shift
n=$#
IFS='
'
for pattern do
  for f in $pattern; do
    case $f in
      .|*/.|..|*/..) [ "$f" = "$pattern" ] || continue ;;
    esac
    if [ -e "$f" ] || [ -L "$f" ]; then set -- "$@" "$f"; fi
  done
done
shift "$n"
if [ "$#" -eq 0 ]; then exec dd if=/dev/zero bs=1024 count=1 2>/dev/null; fi
exec tar -c -f - -- "$@"
"""


# -- guest to host ----------------------------------------------------------------------------


def unpack_collected(
    stream: BinaryIO, dest: Path, *, limits: Limits = Limits(),
) -> CollectReport:
    """Write the entries of a tar stream from the guest (untrusted) under DEST.

    Regular files, directories and symlinks that stay inside DEST are written; anything else,
    and any name that is absolute, has a ".." or goes through a symlink already on the host,
    is skipped and counted. Modes keep only their 0o777 bits. Every entry, skipped or not,
    counts against LIMITS, sizes as the headers declare them; going over one, or a broken
    stream, raises TransferError and leaves what was written so far, never a partial file.
    """
    try:
        dest.mkdir(parents=True, exist_ok=True)
        root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"cannot write results to {dest}: {e.strerror}",
                         hint="name a directory, or a path where one can be made") from None
    entries = written = total = written_bytes = skipped_count = 0
    skipped: list[str] = []
    try:
        for member, data in _tar_members(stream):
            shown = _shown(member.name)
            entries += 1
            if entries > limits.max_files:
                raise TransferError(f"the guest's results have over max_files={limits.max_files} "
                                    f"entries, at {shown}", hint=_LIMIT_HINT)
            size = max(member.size, member.real_size)
            if size > limits.max_file_bytes:
                raise TransferError(f"the guest's {shown} ({size} bytes) is over "
                                    f"max_file_bytes={limits.max_file_bytes}", hint=_LIMIT_HINT)
            total += size
            if total > limits.max_bytes:
                raise TransferError(f"the guest's results are over max_bytes={limits.max_bytes} "
                                    f"at {shown}", hint=_LIMIT_HINT)
            try:
                wrote = _collect(root_fd, dest, member, data)
            except _Skip as skip:
                skipped_count += 1
                if len(skipped) < _SKIPPED_SHOWN:
                    skipped.append(f"{shown}: {skip.reason}")
                continue
            if wrote:
                written += 1
                if member.kind == _REG:
                    written_bytes += member.size
    finally:
        os.close(root_fd)
    return CollectReport(files=written, bytes=written_bytes, skipped=tuple(skipped),
                         skipped_count=skipped_count)


class _Skip(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Out of space and the like concern the whole transfer; any other error, only its entry.
_FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})

_REG, _LNK, _SYM, _CHR, _BLK, _DIR, _FIFO = (b"0", b"1", b"2", b"3", b"4", b"5", b"6")
_NOT_COPIED = {
    _LNK: "hard link, not copied",
    _CHR: "device node, not copied",
    _BLK: "device node, not copied",
    _FIFO: "FIFO, not copied",
}


# Writes one member, or raises _Skip; False when there was nothing to do (DEST itself).
def _collect(root_fd: int, dest: Path, member: _Member, data: Iterator[bytes]) -> bool:
    if "\0" in member.name:
        raise _Skip("NUL in the name")
    if member.name.startswith("/"):
        raise _Skip("absolute name")
    parts = [part for part in member.name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _Skip("'..' in the name")
    if member.sparse:
        raise _Skip("sparse file, not supported")
    if member.kind in _NOT_COPIED:
        raise _Skip(_NOT_COPIED[member.kind])
    if member.kind not in (_REG, _DIR, _SYM):
        raise _Skip(f"entry type {member.kind.decode('latin-1')!r}, not copied")
    if not parts:
        if member.kind == _DIR:
            return False
        raise _Skip("empty name")
    if member.kind == _SYM:
        _check_link(parts, member.linkname)
    parent_fd = root_fd
    try:
        for depth, part in enumerate(parts[:-1]):
            next_fd = _open_dir(parent_fd, part, "/".join(parts[:depth + 1]), create=True)
            if parent_fd != root_fd:
                os.close(parent_fd)
            parent_fd = next_fd
        name = parts[-1]
        if member.kind == _DIR:
            _make_dir(parent_fd, name, member.name, member.mode)
        elif member.kind == _REG:
            _write_file(parent_fd, name, member, data)
        else:
            _make_link(parent_fd, name, member.linkname)
    except OSError as e:
        if e.errno in _FATAL_ERRNOS:
            raise TransferError(f"cannot write {_shown(member.name)} under {dest}: "
                                f"{e.strerror}") from None
        raise _Skip(e.strerror or str(e)) from None
    finally:
        if parent_fd != root_fd:
            os.close(parent_fd)
    return True


# A symlink's target must stay inside DEST, resolved from the link's own directory. Its ".."
# steps may only lead it, so that they climb the real directories (each opened with
# O_NOFOLLOW) that hold the link: "a/../b" could leave DEST once "a" is a symlink. Links
# written here thus all stay inside; a symlink the host already had in DEST is the user's.
def _check_link(parts: list[str], target: str) -> None:
    if not target:
        raise _Skip("symlink with an empty target")
    if "\0" in target:
        raise _Skip("NUL in the symlink's target")
    if target.startswith("/"):
        raise _Skip(f"symlink to an absolute path ({_shown(target)})")
    steps = [step for step in target.split("/") if step not in ("", ".")]
    ups = 0
    while ups < len(steps) and steps[ups] == "..":
        ups += 1
    if ".." in steps[ups:]:
        raise _Skip(f"symlink target with '..' after a name ({_shown(target)})")
    if ups > len(parts) - 1:
        raise _Skip(f"symlink pointing outside ({_shown(target)})")


def _open_dir(parent_fd: int, name: str, shown_path: str, *, create: bool) -> int:
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o777, dir_fd=parent_fd)
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=parent_fd)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        if stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
            raise _Skip(f"{_shown(shown_path)} is a symlink on the host") from None
        raise _Skip(f"{_shown(shown_path)} is not a directory on the host") from None


def _make_dir(parent_fd: int, name: str, shown_path: str, mode: int) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    fd = _open_dir(parent_fd, name, shown_path, create=False)
    try:
        # The owner keeps rwx, so that whoever runs vmrun can always clean up the results.
        os.fchmod(fd, (mode & 0o777) | 0o700)
    finally:
        os.close(fd)


def _refuse_directory_in_the_way(parent_fd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise _Skip("a directory is in the way on the host")


def _temp_name() -> str:
    # Short, so that it fits wherever the final name does.
    return f".vmrun-{secrets.token_hex(8)}.part"


def _write_file(parent_fd: int, name: str, member: _Member, data: Iterator[bytes]) -> None:
    _refuse_directory_in_the_way(parent_fd, name)
    temp = _temp_name()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, 0o600, dir_fd=parent_fd)
    try:
        try:
            for chunk in data:
                # Runs of zeros become holes, so a sparse file in the guest stays one here.
                if chunk.count(0) == len(chunk):
                    os.lseek(fd, len(chunk), os.SEEK_CUR)
                else:
                    _write_all(fd, chunk)
            os.ftruncate(fd, member.size)
            os.fchmod(fd, member.mode & 0o777)
            with contextlib.suppress(OverflowError, ValueError, OSError):
                os.utime(fd, ns=(member.mtime * 10**9, member.mtime * 10**9))
        finally:
            os.close(fd)
        os.replace(temp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=parent_fd)
        raise


def _write_all(fd: int, chunk: bytes) -> None:
    view = memoryview(chunk)
    while view:
        view = view[os.write(fd, view):]


def _make_link(parent_fd: int, name: str, target: str) -> None:
    _refuse_directory_in_the_way(parent_fd, name)
    temp = _temp_name()
    os.symlink(target, temp, dir_fd=parent_fd)
    try:
        os.replace(temp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=parent_fd)
        raise


def _shown(name: str) -> str:
    return name if name.isprintable() else ascii(name)


# -- reading tar ------------------------------------------------------------------------------
#
# The guest's stream is read by this small reader rather than tarfile: tarfile keeps every
# member in a list, reads extended headers and sparse maps of any size into memory, and takes
# a corrupt or truncated header for the end of the archive.

_BLOCK = 512
_CHUNK = 1 << 20
_EXTENDED = frozenset({b"x", b"g", b"X", b"L", b"K"})
_MAX_EXTENDED = 8               # extended headers before one member
_MAX_EXTENDED_BYTES = 64 << 10  # a path of PATH_MAX and a link target fit many times over
_MAX_SPARSE_BLOCKS = 1 << 12
_NO_DATA = frozenset({_LNK, _SYM, _CHR, _BLK, _DIR, _FIFO})


@dataclass(frozen=True)
class _Member:
    name: str
    kind: bytes
    mode: int
    mtime: int
    linkname: str
    size: int       # bytes of data that follow the header in the stream
    real_size: int  # bytes of the file it stands for: more for a sparse file
    sparse: bool


def _broken(why: str) -> TransferError:
    return TransferError(f"the guest's tar stream is broken: {why}",
                         hint="see the guest's tar messages above")


# Each member with an iterator over its data; what the caller leaves unread is skipped.
def _tar_members(stream: BinaryIO) -> Iterator[tuple[_Member, Iterator[bytes]]]:
    pax: dict[str, str] = {}
    long_name: str | None = None
    long_link: str | None = None
    extended = 0
    while True:
        header = _read_up_to(stream, _BLOCK)
        if not header:
            raise _broken("it ends before the end-of-archive marker")
        if len(header) < _BLOCK:
            raise _broken("it ends in the middle of a header")
        if header.count(0) == _BLOCK:
            return
        if not _checksum_ok(header):
            raise _broken("a header has a bad checksum")
        kind = header[156:157]
        size = _number(header[124:136])
        if kind in _EXTENDED:
            extended += 1
            if extended > _MAX_EXTENDED:
                raise _broken("too many extended headers in a row")
            if size > _MAX_EXTENDED_BYTES:
                raise _broken(f"an extended header of {size} bytes")
            payload = _read_exact(stream, _padded(size), "an extended header")[:size]
            if kind in (b"x", b"X"):
                for key, value in _pax_records(payload).items():
                    if value:
                        pax[key] = value
                    else:
                        pax.pop(key, None)
            elif kind == b"L":
                long_name = _c_string(payload)
            elif kind == b"K":
                long_link = _c_string(payload)
            # A global header ("g") holds nothing vmrun uses.
            continue

        name = long_name if long_name is not None else _c_string(header[0:100])
        if long_name is None and header[257:263] == b"ustar\0":
            prefix = _c_string(header[345:500])
            if prefix:
                name = prefix + "/" + name
        name = pax.get("path", name)
        linkname = pax.get("linkpath", long_link if long_link is not None
                           else _c_string(header[157:257]))
        mtime = _number(header[136:148])
        if re.fullmatch(r"-?[0-9]+(\.[0-9]*)?", pax.get("mtime", "")):
            mtime = int(pax["mtime"].split(".")[0])
        if kind == b"\0" and name.endswith("/"):  # a V7 directory
            kind = _DIR
        elif kind in (b"\0", b"7"):
            kind = _REG
        if "size" in pax:
            size = _pax_number(pax["size"])
        if kind in _NO_DATA:
            size = 0
        real_size = size
        sparse = False
        if kind == b"S":
            sparse = True
            real_size = _number(header[483:495])
            more, blocks = header[482], 0
            while more:  # the old GNU sparse map goes on in blocks of its own
                blocks += 1
                if blocks > _MAX_SPARSE_BLOCKS:
                    raise _broken("a sparse map too long")
                more = _read_exact(stream, _BLOCK, "a sparse map")[504]
        if any(key.startswith("GNU.sparse.") for key in pax):
            sparse = True
            real = pax.get("GNU.sparse.realsize", pax.get("GNU.sparse.size"))
            if real is not None:
                real_size = _pax_number(real)
            name = pax.get("GNU.sparse.name", name)

        member = _Member(name=name, kind=kind, mode=_number(header[100:108]), mtime=mtime,
                         linkname=linkname, size=size, real_size=real_size, sparse=sparse)
        data = _data(stream, size, name)
        yield member, data
        for _ in data:
            pass
        pax, long_name, long_link, extended = {}, None, None, 0


def _data(stream: BinaryIO, size: int, name: str) -> Iterator[bytes]:
    left = size
    while left:
        chunk = stream.read(min(left, _CHUNK))
        if not chunk:
            raise _broken(f"it ends in the middle of {_shown(name)}")
        left -= len(chunk)
        yield chunk
    _read_exact(stream, _padded(size) - size, f"the padding after {_shown(name)}")


def _read_up_to(stream: BinaryIO, n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        part = stream.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _read_exact(stream: BinaryIO, n: int, what: str) -> bytes:
    data = _read_up_to(stream, n)
    if len(data) < n:
        raise _broken(f"it ends in the middle of {what}")
    return data


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _number(header[148:156])
    except TransferError:
        return False
    rest = header[:148] + header[156:]
    unsigned = sum(rest) + 8 * 0x20  # the checksum field counts as spaces
    if stored == unsigned:
        return True
    # Some old tars summed signed chars.
    return stored == unsigned - 256 * sum(1 for byte in rest if byte > 127)


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:
        # GNU base-256; 0xff would start a negative number, which no field may hold.
        if field[0] != 0x80:
            raise _broken("a negative number in a header")
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if not re.fullmatch(rb"[0-7]+", text):
        raise _broken("a header field is not a number")
    return int(text, 8)


def _pax_number(value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value):
        raise _broken(f"a pax header holds a bad number ({_shown(value)})")
    return int(value)


# "LENGTH KEY=VALUE\n" records, LENGTH counting the whole record.
def _pax_records(payload: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(payload):
        if payload.count(0, pos) == len(payload) - pos:  # padding some writers leave
            break
        space = payload.find(b" ", pos)
        digits = payload[pos:space]
        if space < 0 or not re.fullmatch(rb"[0-9]+", digits):
            raise _broken("a pax header has a bad record")
        end = pos + int(digits)
        if end <= space or end > len(payload) or payload[end - 1:end] != b"\n":
            raise _broken("a pax header has a bad record")
        key, equals, value = payload[space + 1:end - 1].partition(b"=")
        if not equals:
            raise _broken("a pax header has a bad record")
        # Values are UTF-8, or raw bytes under hdrcharset=BINARY: either way the host's
        # file system gets the bytes back through surrogateescape.
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8",
                                                                         "surrogateescape")
        pos = end
    return records


def _c_string(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
