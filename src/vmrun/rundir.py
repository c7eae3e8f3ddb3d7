"""Per-run directories: one per VM, locked while its run lives, removed when it ends."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from vmrun import cache as cachelib

Notice = Callable[[str], None]



def runs_root() -> Path:
    """Where run directories (overlays, logs, sockets) go: $VMRUN_RUNS_DIR, else the cache."""
    explicit = os.environ.get("VMRUN_RUNS_DIR")
    return Path(explicit) if explicit else cachelib.cache_dir() / "runs"




def remove_dead_runs(root: Path) -> None:
    """Remove what dead runs left: their lock file is free (never a guess by age).

    A run locks ROOT/NAME.lock before it creates ROOT/NAME, and the remover deletes the
    directory before the lock file, so a directory whose lock can be taken is dead.
    """
    if not root.is_dir():
        return
    for lock_path in root.glob("*.lock"):
        run_dir = lock_path.with_suffix("")
        if (run_dir / "kept").exists():
            continue
        with cachelib.held_if_free(lock_path) as dead:
            if dead:
                shutil.rmtree(run_dir, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    lock_path.unlink()


def live_runs(root: Path) -> list[Path]:
    """The run directories whose owner is alive (holds its lock)."""
    alive = []
    for lock_path in sorted(root.glob("*.lock")) if root.is_dir() else []:
        with cachelib.held_if_free(lock_path) as dead:
            if not dead:
                alive.append(lock_path.with_suffix(""))
    return alive


def _take_run_lock(root: Path, name: str | None) -> tuple[Path, int]:
    while True:
        path = root / f"run-{name + '-' if name else ''}{secrets.token_hex(6)}"
        lock_path = path.with_suffix(".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        # A remover may have taken and deleted the lock file between create and lock.
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return path, fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def run_directory(*, keep: Callable[[], bool], notice: Notice,
                  name: str | None = None) -> Iterator[Path]:
    """A fresh run directory, named run-[NAME-]RANDOM (NAME: --name, already checked)."""
    root = runs_root()
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    remove_dead_runs(root)
    path, lock = _take_run_lock(root, name)
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        if keep():
            (path / "kept").touch()
            notice(f"kept the run directory {path} (serial.log, qemu.log, qemu.argv)")
        else:
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                path.with_suffix(".lock").unlink()
        os.close(lock)
