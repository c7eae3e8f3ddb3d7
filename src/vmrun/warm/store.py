"""Templates on disk: one directory per key holding ram, state and meta.json.

A template is made in a hidden staging directory and renamed into place once its
metadata is written, so a crash while making one leaves only a staging directory, which
no run trusts (prune and the next maker remove it). A template is never written after it
is made: runs map its RAM file copy-on-write, and a replacement is a new directory
renamed over the old one (copies still running keep the old files they mapped).

Checks on every use: the metadata names this key and shape; each file has its recorded
size and identity (inode, mtime, ctime); the small device-state file is hashed every time.
The RAM file (up to the guest's memory size) is hashed only when its identity changed:
writing one byte into it changes its mtime and ctime (no user can set ctime back), so it
is then hashed in full and refused when its digest differs."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmrun import cache as cachelib
from vmrun.warm import ramfile
from vmrun.warm.key import Shape

META_FORMAT = 1
FILES = ("ram", "state")


def templates_root() -> Path:
    return cachelib.cache_dir() / "templates"


@dataclass(frozen=True)
class Template:
    directory: Path

    @property
    def key(self) -> str:
        return self.directory.name

    @property
    def ram(self) -> Path:
        return self.directory / "ram"

    @property
    def state(self) -> Path:
        return self.directory / "state"

    @property
    def meta(self) -> Path:
        return self.directory / "meta.json"

    @property
    def used(self) -> Path:
        return self.directory / "used"


def identity(path: Path) -> dict[str, int]:
    info = os.stat(path)
    return {"size": info.st_size, "ino": info.st_ino, "mtime_ns": info.st_mtime_ns,
            "ctime_ns": info.st_ctime_ns}


def file_record(path: Path, digest: str) -> dict[str, Any]:
    return {**identity(path), "digest": digest}


def write_meta(directory: Path, key: str, shape: Shape, files: dict[str, dict[str, Any]],
               made: float) -> None:
    meta = {"format": META_FORMAT, "key": key, "made": made, "shape": shape.to_json(),
            "files": files}
    with cachelib.staged(directory / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))


def read_meta(template: Template) -> dict[str, Any] | None:
    try:
        meta = json.loads(template.meta.read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == META_FORMAT else None


def refusal(template: Template, key: str, shape: Shape) -> str | None:
    """Why TEMPLATE must not be restored for KEY and SHAPE; None when it may be."""
    meta = read_meta(template)
    if meta is None:
        return "its metadata is missing or unreadable"
    if meta.get("key") != key or meta.get("shape") != shape.to_json():
        return "it was made for another machine, kernel, QEMU or vmrun"
    files = meta.get("files")
    if not isinstance(files, dict):
        return "its metadata is missing or unreadable"
    changed = False
    for name in FILES:
        recorded = files.get(name)
        path = template.directory / name
        try:
            now = identity(path)
        except OSError:
            return f"its {name} file is missing"
        if not isinstance(recorded, dict) or now["size"] != recorded.get("size"):
            return f"its {name} file is truncated or has the wrong size"
        same = all(now[field] == recorded.get(field) for field in now)
        if name == "ram" and same:
            continue
        digest = ramfile.digest_of(path) if name == "ram" else cachelib.sha256_file(path)
        if digest != recorded.get("digest"):
            return f"its {name} file changed on disk"
        if not same:
            files[name] = {**now, "digest": digest}
            changed = True
    if changed:
        # Same content under a new identity (copied or restored from a backup): noted,
        # so the next run does not hash it again.
        with contextlib.suppress(OSError):
            write_meta(template.directory, key, shape, files, float(meta.get("made", 0)))
    return None


def find(key: str) -> Template | None:
    template = Template(templates_root() / key)
    return template if template.directory.is_dir() else None


def mark_used(template: Template) -> None:
    with contextlib.suppress(OSError):
        template.used.touch()


@contextlib.contextmanager
def maker_lock(key: str) -> Iterator[bool]:
    """Whether this run may make KEY's template: only one run makes it at a time, the
    others boot cold without waiting."""
    root = templates_root()
    root.mkdir(parents=True, exist_ok=True)
    with cachelib.held_if_free(root / f"{key}.lock", create=True) as free:
        if free:
            remove_staging(root, key)
        yield free


def staging_directory(key: str) -> Path:
    path = templates_root() / f".{key}.part-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    return path


def remove_staging(root: Path, key: str = "*") -> None:
    """Leftovers of makers that died (the caller holds the key's lock, or prunes)."""
    for leftover in root.glob(f".{key}.*"):
        shutil.rmtree(leftover, ignore_errors=True)


def publish(staging: Path, key: str) -> Template:
    """Rename STAGING into place as KEY's template, over an older one if there is one."""
    final = templates_root() / key
    old = None
    if final.exists():
        old = final.with_name(f".{key}.old-{secrets.token_hex(4)}")
        os.rename(final, old)
    os.rename(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return Template(final)


def remove(template: Template) -> None:
    """Take TEMPLATE out of use: renamed aside first, so no run picks it up half gone."""
    aside = template.directory.with_name(f".{template.key}.old-{secrets.token_hex(4)}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(template.directory, aside)
        shutil.rmtree(aside, ignore_errors=True)


@dataclass(frozen=True)
class Listing:
    key: str
    arch: str
    accel: str
    memory_mib: int
    share: str
    size: int  # bytes allocated on disk (the RAM file is sparse)
    made: float
    last_used: float

    def to_json(self) -> dict[str, object]:
        return {"key": self.key, "arch": self.arch, "accel": self.accel,
                "memory_mib": self.memory_mib, "share": self.share, "size": self.size,
                "made": self.made, "last_used": self.last_used}


def listing(template: Template) -> Listing:
    meta = read_meta(template) or {}
    shape = meta.get("shape") or {}
    size = 0
    for path in template.directory.iterdir():
        with contextlib.suppress(OSError):
            size += path.stat().st_blocks * 512
    made = float(meta.get("made", 0))
    try:
        last_used = template.used.stat().st_mtime
    except OSError:
        last_used = made
    return Listing(key=template.key, arch=str(shape.get("arch", "?")),
                   accel=str(shape.get("accel", "?")),
                   memory_mib=int(shape.get("memory_mib", 0)),
                   share=str(shape.get("share", "?")), size=size, made=made,
                   last_used=last_used)


def all_templates() -> list[Template]:
    root = templates_root()
    if not root.is_dir():
        return []
    return [Template(path) for path in sorted(root.iterdir())
            if path.is_dir() and not path.name.startswith(".")]


def prune(unused_days: float, now: float | None = None) -> list[str]:
    """Remove templates unused for UNUSED_DAYS, unreadable ones and makers' leftovers;
    the keys removed."""
    root = templates_root()
    now = time.time() if now is None else now
    removed = []
    for template in all_templates():
        meta = read_meta(template)
        stale = meta is None or now - listing(template).last_used > unused_days * 86400
        if stale:
            remove(template)
            removed.append(template.key)
    if root.is_dir():
        for lock in root.glob("*.lock"):
            with cachelib.held_if_free(lock) as free:
                if free:
                    remove_staging(root, lock.stem)
                    if not (root / lock.stem).exists():
                        lock.unlink(missing_ok=True)
    return removed


