"""Disk operations: create, overlays and backing chains, snapshots, conversion, compaction.

Every qemu-img call names its formats; a file vmrun writes appears under its final name
only once complete (written under a temporary name beside it, then linked or renamed),
and an existing file is never overwritten except by `compact` in place.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from vmrun.errors import ImageError, UnsafeImage, UsageError
from vmrun.images import qemu_img

Progress = Callable[[float], None]

QCOW2_MAGIC = b"QFI\xfb"
MAX_CHAIN_DEPTH = 64
ZERO_BLOCK = 64 * 1024


class Format(StrEnum):
    RAW = "raw"
    QCOW2 = "qcow2"
    VMDK = "vmdk"
    VDI = "vdi"
    VHDX = "vhdx"


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"(\d+)\s*([KMGTP]?)(?:I?B)?", re.IGNORECASE)


def parse_size(size: str | int) -> int:
    """Bytes from 10G, 512M, 1T, 4096 (binary units); UsageError for anything else."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str) and (match := _SIZE.fullmatch(size.strip())):
        value = int(match.group(1)) * _UNITS[match.group(2).upper()]
    else:
        raise UsageError(f"bad size {size!r}", hint="use bytes or a number with K, M, G or T")
    if value <= 0:
        raise UsageError(f"bad size {size!r}: must be more than zero")
    return value


def check_format(fmt: str) -> Format:
    try:
        return Format(fmt)
    except ValueError:
        known = ", ".join(f.value for f in Format)
        raise UsageError(f"unknown disk format {fmt!r}", hint=f"one of {known}") from None


def detect_format(path: Path) -> Format:
    """qcow2 when PATH starts with the qcow2 magic, else raw. Never asks qemu-img to probe."""
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except FileNotFoundError:
        raise ImageError(f"{path} does not exist") from None
    except OSError as error:
        raise ImageError(f"cannot read {path}: {error.strerror}") from None
    return Format.QCOW2 if magic == QCOW2_MAGIC else Format.RAW


@contextmanager
def _output(dst: Path, *, replace: bool = False) -> Iterator[Path]:
    """A temporary name beside DST; published as DST when the block succeeds.

    Without REPLACE an existing DST is refused, also when it appears meanwhile.
    """
    if not replace and os.path.lexists(dst):
        raise UsageError(f"{dst} already exists", hint="remove it or choose another name")
    tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if replace:
            os.replace(tmp, dst)
        else:
            _link_no_clobber(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _link_no_clobber(tmp: Path, dst: Path) -> None:
    try:
        os.link(tmp, dst)
    except FileExistsError:
        raise UsageError(f"{dst} already exists", hint="remove it or choose another name") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # A file system without hard links: a small window remains.
        if os.path.lexists(dst):
            raise UsageError(f"{dst} already exists") from None
        os.rename(tmp, dst)


def _require(path: Path) -> None:
    if not path.exists():
        raise ImageError(f"{path} does not exist")


def create(path: Path, size: str | int, fmt: str = "qcow2") -> None:
    """A new empty image of SIZE bytes at PATH, which must not exist."""
    fmt = check_format(fmt)
    nbytes = parse_size(size)
    with _output(path) as tmp:
        qemu_img.run_qemu_img(["create", "-q", "-f", fmt, qemu_img.filename(tmp), str(nbytes)])


def overlay(base: Path, new: Path, *, base_format: str) -> None:
    """A new qcow2 overlay NEW on BASE (recorded by absolute path and with its format)."""
    base_format = check_format(base_format)
    _require(base)
    with _output(new) as tmp:
        qemu_img.run_qemu_img([
            "create", "-q", "-f", "qcow2", "-b", qemu_img.filename(base), "-F", base_format,
            qemu_img.filename(tmp),
        ])


@dataclass(frozen=True)
class Layer:
    path: Path
    format: str
    virtual_size: int
    actual_size: int
    backing: str | None  # the backing file name as the image records it


def _backing_path(layer: Path, name: str) -> Path:
    prefix, colon, _ = name.partition(":")
    if colon and "/" not in prefix:
        # "json:{...}", "nbd:host:port", "file:/etc/shadow": qemu would read a protocol.
        raise ImageError(f"{layer} names its backing file with a protocol ({name[:60]!r}); "
                         "refused")
    backing = Path(name)
    # qemu resolves a relative backing name against the overlay's directory.
    return backing if backing.is_absolute() else layer.parent / backing


def chain(path: Path, fmt: str | None = None) -> list[Layer]:
    """The backing chain of PATH, top layer first.

    Each backing file is checked to exist before qemu-img looks at it, so that a missing
    one is named together with the overlay that needs it. FMT defaults to what PATH's
    header says (qcow2 or raw).
    """
    return _walk(path, fmt, strict=False)


def _walk(path: Path, fmt: str | None, *, strict: bool) -> list[Layer]:
    _require(path)
    current = path
    current_fmt: str = check_format(fmt) if fmt is not None else detect_format(path)
    layers: list[Layer] = []
    seen: set[tuple[int, int]] = set()
    while True:
        st = current.stat()
        if (st.st_dev, st.st_ino) in seen or len(layers) >= MAX_CHAIN_DEPTH:
            raise ImageError(f"backing chain of {path} loops or is deeper than "
                             f"{MAX_CHAIN_DEPTH} layers (at {current})")
        seen.add((st.st_dev, st.st_ino))
        data = qemu_img.info(current, current_fmt)
        backing = data.get("backing-filename")
        layers.append(Layer(
            path=current, format=current_fmt, virtual_size=int(data.get("virtual-size", 0)),
            actual_size=int(data.get("actual-size", 0)), backing=backing,
        ))
        if not backing:
            return layers
        next_path = _backing_path(current, backing)
        if not next_path.exists():
            raise ImageError(
                f"backing file {next_path} of {current} is missing",
                hint="restore it, or point the overlay elsewhere with vmrun disk rebase",
            )
        recorded = data.get("backing-filename-format")
        if recorded:
            current_fmt = check_format(recorded)
        elif strict and current_fmt == Format.QCOW2:
            # Without a recorded format qemu-img would probe the backing file's format.
            raise ImageError(
                f"{current} does not record the format of its backing file {next_path}",
                hint=f"vmrun disk rebase {current} --unsafe --base {next_path} "
                "--base-format FORMAT",
            )
        else:
            # Listing only: read the header ourselves rather than let qemu-img probe.
            current_fmt = detect_format(next_path)
        current = next_path


# Incompatible qcow2 features vmrun knows: dirty, corrupt, external data file,
# compression type, extended L2.
_KNOWN_INCOMPATIBLE = 0b11111


def _chain_ok(path: Path, fmt: str) -> list[Layer]:
    """PATH's chain, checked to be complete and to name every backing format, with no
    layer that makes qemu-img read a file outside the chain (an external data file)."""
    from vmrun.images.formats import inspect_image

    layers = _walk(path, fmt, strict=True)
    for layer in layers:
        header = inspect_image(layer.path).qcow2 if layer.format == "qcow2" else None
        if header is None:
            continue
        if header.data_file is not None or header.incompatible_features & 0b100:
            raise UnsafeImage(f"{layer.path} keeps its data in another file "
                              f"({header.data_file or 'external data file bit'}): refused")
        if header.incompatible_features & ~_KNOWN_INCOMPATIBLE:
            raise UnsafeImage(f"{layer.path} has unknown incompatible features "
                              f"({header.incompatible_features:#x}): refused")
    return layers


def commit(overlay: Path, fmt: str = "qcow2", *, progress: Progress | None = None) -> None:
    """Write OVERLAY's changes into its backing file (and empty OVERLAY)."""
    fmt = check_format(fmt)
    layers = _chain_ok(overlay, fmt)
    if len(layers) < 2:
        raise UsageError(f"{overlay} has no backing file to commit into")
    qemu_img.run_qemu_img(["commit", "-f", fmt, qemu_img.filename(overlay)],
                          untrusted=False, progress=progress)


def rebase(
    overlay: Path,
    new_base: Path | None,
    *,
    base_format: str | None,
    unsafe: bool = False,
    progress: Progress | None = None,
) -> None:
    """Give qcow2 OVERLAY the backing file NEW_BASE, or none (standalone) when None.

    Safe mode keeps OVERLAY's content, copying what differs; UNSAFE only rewrites the
    backing file name (for a base that was moved or renamed).
    """
    if new_base is None:
        if unsafe:
            raise UsageError("--unsafe with --standalone would lose the base's data")
        backing_args = ["-b", ""]
    else:
        if base_format is None:
            raise UsageError("rebase needs the new base's format")
        _require(new_base)
        backing_args = ["-b", qemu_img.filename(new_base), "-F", check_format(base_format)]
    if unsafe:
        _require(overlay)
    else:
        # Safe mode reads the old chain: name a missing file before qemu-img trips on it.
        _chain_ok(overlay, "qcow2")
    qemu_img.run_qemu_img(
        ["rebase", "-f", "qcow2", *(["-u"] if unsafe else []), *backing_args,
         qemu_img.filename(overlay)],
        untrusted=False, progress=None if unsafe else progress,
    )


def convert(
    src: Path,
    dst: Path,
    *,
    src_format: str,
    dst_format: str,
    compress: bool = False,
    progress: Progress | None = None,
) -> None:
    """Copy SRC (with its whole backing chain) into a new standalone image DST."""
    src_format = check_format(src_format)
    dst_format = check_format(dst_format)
    if compress and dst_format != Format.QCOW2:
        raise UsageError(f"compression needs qcow2 output, not {dst_format}")
    _chain_ok(src, src_format)
    with _output(dst) as tmp:
        qemu_img.run_qemu_img(
            ["convert", "-f", src_format, "-O", dst_format, *(["-c"] if compress else []),
             qemu_img.filename(src), qemu_img.filename(tmp)],
            untrusted=False, progress=progress,
        )


def flatten(
    src: Path,
    dst: Path,
    *,
    dst_format: str = "qcow2",
    src_format: str | None = None,
    progress: Progress | None = None,
) -> None:
    """The whole chain of SRC as one standalone image DST."""
    fmt = check_format(src_format) if src_format is not None else detect_format(src)
    convert(src, dst, src_format=fmt, dst_format=dst_format, progress=progress)


def compact(
    src: Path,
    dst: Path | None = None,
    *,
    fmt: str = "qcow2",
    progress: Progress | None = None,
) -> None:
    """Rewrite SRC without unused or zeroed clusters, in place or into DST.

    An image with a backing file keeps it; internal snapshots would be lost, so an image
    with any is refused.
    """
    fmt = check_format(fmt)
    layers = _chain_ok(src, fmt)
    top = qemu_img.info(src, fmt)
    if top.get("snapshots"):
        raise UsageError(f"{src} has internal snapshots, which compacting would drop",
                         hint="delete them first (vmrun disk snapshot delete)")
    target = src if dst is None else dst
    args = ["convert", "-f", fmt, "-O", fmt, "-S", "4k"]
    if fmt == Format.QCOW2 and "cluster-size" in top:
        args += ["-o", f"cluster_size={int(top['cluster-size'])}"]
    if len(layers) > 1:
        backing = layers[0].backing
        assert backing is not None
        if not Path(backing).is_absolute() and target.parent.resolve() != src.parent.resolve():
            # A relative name would resolve against the new image's directory.
            backing = qemu_img.filename(layers[1].path)
        args += ["-B", backing, "-F", layers[1].format]
    with _output(target, replace=dst is None) as tmp:
        qemu_img.run_qemu_img([*args, qemu_img.filename(src), qemu_img.filename(tmp)],
                              untrusted=False, progress=progress)
        os.chmod(tmp, stat.S_IMODE(src.stat().st_mode))


def resize(path: Path, size: str, *, fmt: str = "qcow2", shrink: bool = False) -> None:
    """Set PATH's virtual size; making it smaller needs SHRINK (data past the end is lost)."""
    fmt = check_format(fmt)
    nbytes = parse_size(size)
    _require(path)
    current = int(qemu_img.info(path, fmt).get("virtual-size", 0))
    if nbytes < current and not shrink:
        raise UsageError(
            f"{path} is {current} bytes; resizing to {nbytes} would shrink it",
            hint="pass --shrink if the data past the new end may be lost",
        )
    qemu_img.run_qemu_img(["resize", "-q", "-f", fmt, *(["--shrink"] if shrink else []),
                           qemu_img.filename(path), str(nbytes)])


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    date: datetime
    vm_state_size: int
    vm_clock_ns: int


def _image_opts(path: Path) -> str:
    # `qemu-img snapshot` has no -f in QEMU 7.2; --image-opts names the driver instead.
    return "driver=qcow2,file.driver=file,file.filename=" + qemu_img.filename(path).replace(
        ",", ",,")


def _check_name(name: str) -> None:
    if not name or name.isdigit() or name.startswith("-"):
        # qemu-img matches a snapshot by ID or by name: "2" could pick another one.
        raise UsageError(f"bad snapshot name {name!r}",
                         hint="use a name that is not all digits and does not start with -")


def snapshot_list(path: Path) -> list[Snapshot]:
    """The internal snapshots of qcow2 image PATH."""
    _require(path)
    return [
        Snapshot(
            id=str(entry.get("id", "")), name=str(entry.get("name", "")),
            date=datetime.fromtimestamp(int(entry.get("date-sec", 0)), UTC),
            vm_state_size=int(entry.get("vm-state-size", 0)),
            vm_clock_ns=int(entry.get("vm-clock-sec", 0)) * 10**9
            + int(entry.get("vm-clock-nsec", 0)),
        )
        for entry in qemu_img.info(path, "qcow2").get("snapshots", [])
    ]


def _named(path: Path, name: str) -> Snapshot:
    _check_name(name)
    matches = [s for s in snapshot_list(path) if s.name == name]
    if not matches:
        raise ImageError(f"{path} has no snapshot named {name!r}")
    if len(matches) > 1:
        raise ImageError(f"{path} has several snapshots named {name!r}",
                         hint="qemu-img would pick the first; delete the extra ones by ID")
    return matches[0]


def snapshot_create(path: Path, name: str) -> None:
    """Record PATH's current state as internal snapshot NAME (names are unique)."""
    _check_name(name)
    if any(s.name == name for s in snapshot_list(path)):
        raise UsageError(f"{path} already has a snapshot named {name!r}")
    qemu_img.run_qemu_img(["snapshot", "-q", "--image-opts", "-c", name, _image_opts(path)])


def snapshot_apply(path: Path, name: str) -> None:
    """Revert PATH to its internal snapshot NAME."""
    _named(path, name)
    qemu_img.run_qemu_img(["snapshot", "-q", "--image-opts", "-a", name, _image_opts(path)])


def snapshot_delete(path: Path, name: str) -> None:
    """Delete PATH's internal snapshot NAME."""
    _named(path, name)
    qemu_img.run_qemu_img(["snapshot", "-q", "--image-opts", "-d", name, _image_opts(path)])


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy a raw file to new file DST, leaving holes where SRC has holes or zero blocks."""
    with open(src, "rb") as source, _output(dst) as tmp, open(tmp, "wb") as target:
        size = os.fstat(source.fileno()).st_size
        for start, end in _data_ranges(source.fileno(), size):
            _copy_range(source.fileno(), target.fileno(), start, end)
        target.truncate(size)
        target.flush()
        os.fsync(target.fileno())
        os.chmod(tmp, stat.S_IMODE(os.fstat(source.fileno()).st_mode))


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the parts of FD that hold data; all of it without SEEK_DATA."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # only a hole is left
                return
            if error.errno in (errno.EINVAL, errno.EOPNOTSUPP) and offset == 0:
                yield 0, size
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size)
        offset = end


def _copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    # Data extents may still hold zero blocks (preallocated or written zeros).
    offset = start
    while offset < end:
        block = os.pread(src_fd, min(ZERO_BLOCK, end - offset), offset)
        if not block:
            raise ImageError(f"file shrank while being copied (at offset {offset})")
        if block.count(0) != len(block):
            view = memoryview(block)
            while view:
                written = os.pwrite(dst_fd, view, offset + len(block) - len(view))
                view = view[written:]
        offset += len(block)


def check_overlay(path: Path) -> None:
    """ImageError unless PATH is an intact qcow2 image (leaked clusters are fine)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            header = file.read(104)
    except OSError as error:
        raise ImageError(f"cannot read overlay {path}: {error.strerror}") from None
    if header[:4] != QCOW2_MAGIC:
        raise ImageError(f"overlay {path} is not a qcow2 image (corrupt or overwritten)")
    if len(header) < 72:
        raise ImageError(f"overlay {path} is truncated ({size} bytes, shorter than its header)")
    try:
        result = qemu_img.run_qemu_img(
            ["check", "-f", "qcow2", "-U", "--output=json", qemu_img.filename(path)],
            ok_returncodes=(0, 2, 3),
        )
    except ImageError as error:
        raise ImageError(f"overlay {path} is unreadable: {error}") from None
    report = _json_report(result.stdout)
    corruptions = int(report.get("corruptions", 0)) + int(report.get("check-errors", 0))
    end = int(report.get("image-end-offset", 0))
    if end > size:
        raise ImageError(
            f"overlay {path} is truncated: {size} bytes, but its metadata reaches {end}")
    if corruptions or result.returncode == 2:
        raise ImageError(f"overlay {path} is corrupt ({corruptions} errors found by "
                         "qemu-img check)")


def _json_report(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
