"""The cache directory: content-addressed files written to a temp name, then renamed."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """Where vmrun keeps what it fetched and built: $VMRUN_CACHE_DIR, else XDG."""
    explicit = os.environ.get("VMRUN_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vmrun"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def key_of(*parts: str | bytes) -> str:
    """A stable content key for a tuple of inputs (length-prefixed, so no ambiguity)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


@contextlib.contextmanager
def locked(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold an exclusive (or SHARED) flock on PATH (created if needed) for the duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def held_if_free(path: Path, *, create: bool = False) -> Iterator[bool]:
    """Whether the lock file PATH (which must exist, unless CREATE) is free; if so it is
    held inside the block.

    A lock file whose owner died is free: that, never a guess by age, is how leftovers of
    dead runs, pulls and template makers are told from live ones.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged(final: Path) -> Iterator[Path]:
    """Yield a temp path next to FINAL; on success it is renamed onto FINAL.

    The caller writes and verifies the temp file inside the block; if the block raises,
    the temp file is removed and FINAL is never touched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def remove_stale_parts(directory: Path) -> None:
    """Remove leftovers of writes that died midway (callers hold the directory's lock)."""
    if not directory.is_dir():
        return
    for leftover in directory.glob(".*.part"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
