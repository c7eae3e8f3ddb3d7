"""A deterministic writer for newc ("070701") cpio archives, the format of an initramfs."""

from __future__ import annotations

import posixpath
import stat
from typing import BinaryIO

from vmrun.errors import VmrunError

__all__ = ["CpioWriter"]

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"
_BLOCK = 512


def _pad4(n: int) -> int:
    return -n % 4


def _normalise(path: str) -> str:
    if "\0" in path:
        raise VmrunError(f"cpio entry name contains a NUL byte: {path!r}")
    # Checked before normpath, which would silently fold "a/../b" into "b".
    if ".." in path.split("/"):
        raise VmrunError(f"cpio entry name has a '..' component: {path!r}")
    name = posixpath.normpath(path.lstrip("/"))
    if name in ("", ".") or name.startswith("/"):
        raise VmrunError(f"cpio entry name is empty or the root: {path!r}")
    return name


class CpioWriter:
    """Write a newc cpio archive to ``out``, one entry per call, then call :meth:`finish`.

    Output depends only on the calls made: mtime, uid and gid are 0 and inode numbers
    count up from 1. Names are stored without a leading ``/``; missing parent
    directories are written (mode 0755) before the entry that needs them.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._written = 0
        self._next_ino = 1
        self._dirs: dict[str, int] = {}
        self._names: set[str] = set()
        self._finished = False

    def directory(self, path: str, mode: int = 0o755) -> None:
        """Add a directory; adding one that already exists with the same mode does nothing."""
        name = _normalise(path)
        perm = stat.S_IMODE(mode)
        if name in self._dirs:
            if self._dirs[name] != perm:
                raise VmrunError(
                    f"cpio directory {name!r} already written with mode {self._dirs[name]:o}"
                )
            return
        self._parents(name)
        self._claim(name)
        self._dirs[name] = perm
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file holding ``data``."""
        name = self._prepare(path)
        self._entry(name, stat.S_IFREG | stat.S_IMODE(mode), data=data)

    def symlink(self, path: str, target: str) -> None:
        """Add a symbolic link to ``target``, stored as given."""
        if not target or "\0" in target:
            raise VmrunError(f"bad symlink target for {path!r}: {target!r}")
        name = self._prepare(path)
        self._entry(name, stat.S_IFLNK | 0o777, data=target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node."""
        name = self._prepare(path)
        self._entry(name, stat.S_IFCHR | stat.S_IMODE(mode), rdev=(major, minor))

    def finish(self) -> None:
        """Write the trailer and pad the archive to a multiple of 512 bytes."""
        if self._finished:
            return
        self._header(_TRAILER, ino=0, mode=0, nlink=1, size=0, rdev=(0, 0))
        self._write(b"\0" * (-self._written % _BLOCK))
        self._finished = True

    def _prepare(self, path: str) -> str:
        name = _normalise(path)
        self._parents(name)
        self._claim(name)
        return name

    def _parents(self, name: str) -> None:
        parent = posixpath.dirname(name)
        if parent and parent not in self._dirs:
            self.directory(parent)

    def _claim(self, name: str) -> None:
        if self._finished:
            raise VmrunError("cpio archive already finished")
        if name in self._names:
            raise VmrunError(f"cpio entry {name!r} written twice")
        self._names.add(name)

    def _entry(
        self, name: str, mode: int, *, data: bytes = b"", nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        ino = self._next_ino
        self._next_ino += 1
        self._header(name, ino=ino, mode=mode, nlink=nlink, size=len(data), rdev=rdev)
        self._write(data)
        self._write(b"\0" * _pad4(len(data)))

    def _header(
        self, name: str, *, ino: int, mode: int, nlink: int, size: int, rdev: tuple[int, int]
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
        for value in fields:
            if not 0 <= value <= 0xFFFFFFFF:
                raise VmrunError(f"cpio field out of range for {name!r}: {value}")
        header = _MAGIC + b"".join(b"%08X" % v for v in fields) + encoded
        self._write(header)
        self._write(b"\0" * _pad4(len(header)))

    def _write(self, data: bytes) -> None:
        if data:
            self._out.write(data)
            self._written += len(data)


def read_newc(archive: bytes) -> dict[str, bytes]:
    """The members of an uncompressed newc archive (what CpioWriter writes), by name: for
    tests and benchmarks that look inside vmrun's initramfs."""
    files: dict[str, bytes] = {}
    offset = 0
    while archive[offset:offset + 6] == b"070701":
        fields = [int(archive[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        size, name_size = fields[6], fields[11]
        name_end = offset + 110 + name_size
        name = archive[offset + 110:name_end - 1].decode()
        data = name_end + (-name_end % 4)
        if name == "TRAILER!!!":
            break
        files[name] = archive[data:data + size]
        offset = data + size + (-(data + size) % 4)
    return files
