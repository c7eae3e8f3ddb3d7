"""Reading a file the user named: regular files only, never more than a bound into memory."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vmrun.errors import UsageError

# cloud-init's own inputs are far smaller (EC2 caps user-data at 16 KiB); 16 MiB leaves
# room for large scripts and still bounds what a wrong path (/dev/zero, a disk) can cost.
USER_FILE_LIMIT = 16 << 20


def read_user_file(path: Path, what: str, *, limit: int = USER_FILE_LIMIT) -> bytes:
    """The bytes of the regular file PATH (WHAT names it in errors), at most LIMIT of them.

    A FIFO, device or directory is refused without reading from it: it is stat'ed before
    it is opened, opened non-blocking (so a FIFO without a writer cannot hang), and
    fstat'ed again after the open, so a file swapped in between is caught too.
    """
    try:
        _require_regular(os.stat(path).st_mode, path, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise UsageError(f"cannot read {what} {path}: {err.strerror or err}",
                         hint=f"{what} takes a readable file") from None
    with os.fdopen(fd, "rb") as file:
        try:
            _require_regular(os.fstat(fd).st_mode, path, what)
            data = file.read(limit + 1)
        except OSError as err:
            raise UsageError(f"cannot read {what} {path}: {err.strerror or err}",
                             hint=f"{what} takes a readable file") from None
    if len(data) > limit:
        raise UsageError(f"{what} {path} is larger than {_size(limit)}",
                         hint=f"{what} is read into memory; give a smaller file")
    return data


def _require_regular(mode: int, path: Path, what: str) -> None:
    if not stat.S_ISREG(mode):
        raise UsageError(f"{what} {path} is {_kind(mode)}, not a regular file",
                         hint=f"{what} takes a regular file")


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"
