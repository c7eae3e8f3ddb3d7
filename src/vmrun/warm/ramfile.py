"""A template's RAM file: copied sparsely and hashed in one pass; hashed again on demand.

The digest covers every non-zero 64 KiB chunk with its offset, so it does not depend on
where the filesystem keeps holes: a file and its sparse copy hash alike."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

CHUNK = 64 << 10
READ = 4 << 20
_ZERO = bytes(CHUNK)


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the parts of the file that may hold data, chunk-aligned."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        start -= start % CHUNK
        end = min(size, -(-end // CHUNK) * CHUNK)
        yield start, end
        offset = end


def _chunks(fd: int, size: int) -> Iterator[tuple[int, memoryview]]:
    """Every non-zero chunk of the file, with its offset."""
    buffer = bytearray(READ)
    view = memoryview(buffer)
    for start, end in _data_ranges(fd, size):
        offset = start
        while offset < end:
            got = os.preadv(fd, [view[: min(READ, end - offset)]], offset)
            if got <= 0:
                break
            for at in range(0, got, CHUNK):
                piece = view[at: min(at + CHUNK, got)]
                if piece != _ZERO[: len(piece)]:
                    yield offset + at, piece
            offset += got


def _update(digest: hashlib._Hash, offset: int, piece: memoryview) -> None:
    digest.update(offset.to_bytes(8, "little"))
    digest.update(piece)


def digest_of(path: Path) -> str:
    """The RAM file's content digest (see the module's docstring)."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        for offset, piece in _chunks(fd, size):
            _update(digest, offset, piece)
    finally:
        os.close(fd)
    return digest.hexdigest()


def copy_sparse(source: Path, target: Path) -> str:
    """Copy SOURCE's non-zero chunks into a new TARGET of the same size; their digest."""
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return copy_sparse_fd(src, target)
    finally:
        os.close(src)


def copy_sparse_fd(src: int, target: Path) -> str:
    """copy_sparse from an open file (a memfd, say)."""
    digest = hashlib.sha256()
    size = os.fstat(src).st_size
    dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(dst, size)
        for offset, piece in _chunks(src, size):
            _update(digest, offset, piece)
            os.pwrite(dst, piece, offset)
    finally:
        os.close(dst)
    return digest.hexdigest()


def memory_file(size: int) -> int:
    """Anonymous shared memory for the guest RAM of a run making a template: QEMU maps it
    through /proc/self/fd (it is in RAM like a cold run's, nothing is written back to
    disk, and nothing of it outlives the processes holding it, SIGKILL included)."""
    fd = os.memfd_create("vmrun-template-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd
