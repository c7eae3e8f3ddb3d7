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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from vmrun.errors import ImageError, UnsafeImage, UsageError
from vmrun.images import formats, qemu_img
from vmrun.progress import Percent

Progress = Percent

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


def overlay(
    base: Path, new: Path, *, base_format: str | None, follow_backing: bool = False,
) -> None:
    """A new qcow2 overlay NEW on BASE (recorded by absolute path and with its format).

    BASE_FORMAT None means BASE's header decides; BASE's own backing chain (qemu-img
    opens it) is then followed only with FOLLOW_BACKING, see `chain_for_reading`.
    """
    layers = chain_for_reading(base, base_format, follow_backing=follow_backing)
    with _output(new) as tmp:
        qemu_img.run_qemu_img([
            "create", "-q", "-f", "qcow2", "-b", qemu_img.filename(base), "-F",
            layers[0].format, qemu_img.filename(tmp),
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
        raise UnsafeImage(f"{layer} names its backing file with a protocol ({name[:60]!r}); "
                          "refused")
    backing = Path(name)
    # qemu resolves a relative backing name against the overlay's directory.
    return backing if backing.is_absolute() else layer.parent / backing


def _check_kind(path: Path, *, top: bool) -> None:
    """A layer must be a regular file; the file the user named may be a block device."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ImageError(f"{path} does not exist") from None
    except OSError as error:
        raise ImageError(f"cannot read {path}: {error.strerror}") from None
    if stat.S_ISREG(mode) or (top and stat.S_ISBLK(mode)):
        return
    what = "a backing file" if not top else "an image"
    raise ImageError(f"{path} is not a regular file, refused as {what}")


def chain(path: Path, fmt: str | None = None) -> list[Layer]:
    """The backing chain of PATH, top layer first, for listing.

    Listing is what `chain` is asked for, so it walks backing references whatever the
    format source, but it only reads headers (bounded, in Python, never qemu-img), and
    every layer passes the header check: no `json:` or protocol name, no external data
    file, only regular files. Each backing file is checked to exist, so that a missing
    one is named together with the overlay that needs it. FMT defaults to what PATH's
    header says (qcow2 or raw).
    """
    return _walk(path, fmt, follow=True, strict=False)


def chain_for_reading(path: Path, fmt: str | None, *, follow_backing: bool = False) -> list[Layer]:
    """PATH's chain, checked layer by layer before qemu-img opens any of it.

    The rule for every command that reads image data: FMT None means PATH's header
    decides (qcow2 or raw), and a guessed format never makes vmrun read another file:
    following a backing file (or a VMDK descriptor's extents) needs the caller's word,
    a format given in FMT or FOLLOW_BACKING. Followed, a backing file may be named by any
    path, absolute too (vmrun's own overlays name their base so), but never by a `json:`
    or protocol name; VMDK extents only as plain names beside the descriptor. Each layer
    must be a regular file, pass the header check, match the format its overlay records
    (which qcow2 layers must record, so qemu-img never probes), and the chain must end
    within MAX_CHAIN_DEPTH layers without a loop.
    """
    return _walk(path, fmt, follow=fmt is not None or follow_backing, strict=True)


def _walk(path: Path, fmt: str | None, *, follow: bool, strict: bool) -> list[Layer]:
    _check_kind(path, top=True)
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
        layer, recorded = _read_layer(current, current_fmt, st.st_size,
                                      st.st_blocks * 512, follow=follow)
        layers.append(layer)
        if layer.backing is None:
            return layers
        if not follow:
            raise UnsafeImage(
                f"{current} has the backing file {layer.backing!r}, and its format was "
                "guessed: refusing to read another file",
                hint="if you trust it, name its format (--format/--from) or pass "
                "--follow-backing",
            )
        next_path = _backing_path(current, layer.backing)
        if not next_path.exists():
            raise ImageError(
                f"backing file {next_path} of {current} is missing",
                hint="restore it, or point the overlay elsewhere with vmrun disk rebase",
            )
        _check_kind(next_path, top=False)
        if recorded:
            current_fmt = _recorded_format(current, recorded)
        elif strict:
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


def _recorded_format(layer: Path, recorded: str) -> Format:
    try:
        return Format(recorded)
    except ValueError:
        raise UnsafeImage(f"{layer} records an unknown backing format {recorded!r}; "
                          "refused") from None


def _read_layer(path: Path, fmt: str, size: int, actual: int, *,
                follow: bool) -> tuple[Layer, str | None]:
    """One layer from its header (checked), and its backing file's recorded format."""
    if fmt == Format.RAW:
        # Opened as raw, a file names nothing else, whatever its bytes say.
        return Layer(path, fmt, size, actual, None), None
    refs = formats.References.FOLLOW if follow else formats.References.IGNORE
    info = _check_header(path, refs)
    if info.format.value != fmt:
        raise UnsafeImage(f"{path} is read as {fmt}, but its header says "
                          f"{info.format.value}: refused")
    header = info.qcow2
    if header is None:
        return Layer(path, fmt, info.virtual_size, actual, None), None
    return (Layer(path, fmt, header.virtual_size, actual, header.backing_file),
            header.backing_format)


def _check_header(path: Path, refs: formats.References) -> formats.ImageInfo:
    """The header check of `--image`, with what PATH may name besides itself."""
    try:
        header = formats.inspect_image(path).qcow2
    except ImageError:
        header = None  # broken: the check below says why
    if header is not None and (header.data_file is not None
                               or header.incompatible_features & 0b100):
        raise UnsafeImage(f"{path} keeps its data in another file "
                          f"({header.data_file or 'external data file bit'}): refused")
    return formats.check_foreign_image(path, references=refs)


def _work(layers: list[Layer]) -> int:
    """Bytes of image data a call over LAYERS may move: its limits grow with it."""
    return max(layer.virtual_size for layer in layers)


def commit(overlay: Path, fmt: str | None = "qcow2", *, follow_backing: bool = False,
           progress: Progress | None = None) -> None:
    """Write OVERLAY's changes into its backing file (and empty OVERLAY).

    FMT None means the header decides; then the backing file is written only with
    FOLLOW_BACKING (see `chain_for_reading`). OVERLAY is checked to be intact first.
    """
    layers = chain_for_reading(overlay, fmt, follow_backing=follow_backing)
    if layers[0].format != Format.QCOW2:
        raise UsageError(f"{overlay} is {layers[0].format}; only a qcow2 overlay commits")
    if len(layers) < 2:
        raise UsageError(f"{overlay} has no backing file to commit into")
    check_overlay(overlay)
    qemu_img.run_qemu_img(["commit", "-f", "qcow2", qemu_img.filename(overlay)],
                          progress=progress, work_bytes=_work(layers))


def rebase(
    overlay: Path,
    new_base: Path | None,
    *,
    base_format: str | None,
    unsafe: bool = False,
    fmt: str | None = "qcow2",
    follow_backing: bool = False,
    progress: Progress | None = None,
) -> None:
    """Give qcow2 OVERLAY the backing file NEW_BASE, or none (standalone) when None.

    Safe mode keeps OVERLAY's content, copying what differs; UNSAFE only rewrites the
    backing file name (for a base that was moved or renamed). Both chains are checked
    with `chain_for_reading` (FMT and BASE_FORMAT None: the headers decide, and then only
    FOLLOW_BACKING follows a backing file).
    """
    if new_base is None and unsafe:
        raise UsageError("--unsafe with --standalone would lose the base's data")
    backing_args = ["-b", ""]
    work = 0
    if new_base is not None:
        base_layers = chain_for_reading(new_base, base_format, follow_backing=follow_backing)
        backing_args = ["-b", qemu_img.filename(new_base), "-F", base_layers[0].format]
        work = _work(base_layers)
    if unsafe:
        # Only the header is rewritten; the old chain is never opened.
        _check_kind(overlay, top=True)
        top = _check_header(overlay, formats.References.IGNORE)
    else:
        # Safe mode reads the old chain: name a missing file before qemu-img trips on it.
        layers = chain_for_reading(overlay, fmt, follow_backing=follow_backing)
        top = formats.inspect_image(overlay)
        work = max(work, _work(layers))
    if top.format != formats.ImageFormat.QCOW2:
        raise UsageError(f"{overlay} is {top.format.value}; only a qcow2 image rebases")
    qemu_img.run_qemu_img(
        ["rebase", "-f", "qcow2", *(["-u"] if unsafe else []), *backing_args,
         qemu_img.filename(overlay)],
        progress=None if unsafe else progress, work_bytes=work,
    )


def convert(
    src: Path,
    dst: Path,
    *,
    src_format: str | None,
    dst_format: str,
    compress: bool = False,
    follow_backing: bool = False,
    progress: Progress | None = None,
) -> None:
    """Copy SRC (with its whole backing chain) into a new standalone image DST.

    SRC_FORMAT None means SRC's header decides, and then a backing file is read only with
    FOLLOW_BACKING (see `chain_for_reading`).
    """
    dst_format = check_format(dst_format)
    if compress and dst_format != Format.QCOW2:
        raise UsageError(f"compression needs qcow2 output, not {dst_format}")
    layers = chain_for_reading(src, src_format, follow_backing=follow_backing)
    with _output(dst) as tmp:
        qemu_img.run_qemu_img(
            ["convert", "-f", layers[0].format, "-O", dst_format,
             *(["-c"] if compress else []), qemu_img.filename(src), qemu_img.filename(tmp)],
            progress=progress, work_bytes=_work(layers),
        )


def flatten(
    src: Path,
    dst: Path,
    *,
    dst_format: str = "qcow2",
    src_format: str | None = None,
    follow_backing: bool = False,
    progress: Progress | None = None,
) -> None:
    """The whole chain of SRC as one standalone image DST (see `convert`)."""
    convert(src, dst, src_format=src_format, dst_format=dst_format,
            follow_backing=follow_backing, progress=progress)


def compact(
    src: Path,
    dst: Path | None = None,
    *,
    fmt: str | None = "qcow2",
    follow_backing: bool = False,
    progress: Progress | None = None,
) -> None:
    """Rewrite SRC without unused or zeroed clusters, in place or into DST.

    An image with a backing file keeps it (read only as `chain_for_reading` allows);
    internal snapshots would be lost, so an image with any is refused.
    """
    layers = chain_for_reading(src, fmt, follow_backing=follow_backing)
    fmt = layers[0].format
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
                              progress=progress, work_bytes=_work(layers))
        os.chmod(tmp, stat.S_IMODE(src.stat().st_mode))


def resize(path: Path, size: str, *, fmt: str | None = "qcow2", shrink: bool = False,
           follow_backing: bool = False) -> None:
    """Set PATH's virtual size; making it smaller needs SHRINK (data past the end is lost).

    qemu-img opens the backing chain of an overlay it resizes, so that chain is checked
    and followed as `chain_for_reading` allows (FMT None: the header decides).
    """
    nbytes = parse_size(size)
    layers = chain_for_reading(path, fmt, follow_backing=follow_backing)
    fmt = layers[0].format
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


def _check_name(name: str) -> None:
    if not name or name.isdigit() or name.startswith("-"):
        # qemu-img matches a snapshot by ID or by name: "2" could pick another one.
        raise UsageError(f"bad snapshot name {name!r}",
                         hint="use a name that is not all digits and does not start with -")


def _snapshot_target(path: Path) -> str:
    """PATH, header-checked, as qemu-img opens it for snapshots: qcow2, no backing file.

    Snapshots never need the backing chain, so it is never opened, whatever it names.
    """
    _check_kind(path, top=True)
    info = _check_header(path, formats.References.IGNORE)
    if info.format != formats.ImageFormat.QCOW2:
        raise ImageError(f"{path} is {info.format.value}, not qcow2: it has no snapshots")
    return qemu_img.alone(path, "qcow2")


def snapshot_list(path: Path) -> list[Snapshot]:
    """The internal snapshots of qcow2 image PATH."""
    _snapshot_target(path)
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
    qemu_img.run_qemu_img(["snapshot", "-q", "-c", name, _snapshot_target(path)])


def snapshot_apply(path: Path, name: str) -> None:
    """Revert PATH to its internal snapshot NAME."""
    _named(path, name)
    qemu_img.run_qemu_img(["snapshot", "-q", "-a", name, _snapshot_target(path)])


def snapshot_delete(path: Path, name: str) -> None:
    """Delete PATH's internal snapshot NAME."""
    _named(path, name)
    qemu_img.run_qemu_img(["snapshot", "-q", "-d", name, _snapshot_target(path)])


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
    """ImageError unless PATH is an intact qcow2 image (leaked clusters are fine).

    For an overlay vmrun did not just create, before it is consumed (`commit`, a baked
    layer before it is stored). Its backing file is never opened.
    """
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
        # The backing file is not opened: the check reads the overlay alone.
        result = qemu_img.run_qemu_img(
            ["check", "-f", "qcow2", "-U", "--output=json", qemu_img.alone(path, "qcow2")],
            ok_returncodes=(0, 2, 3),
        )
    except ImageError as error:
        raise ImageError(f"overlay {path} is unreadable: {error}") from None
    report = _json_report(result.stdout)
    corruptions = int(report.get("corruptions", 0)) + int(report.get("check-errors", 0))
    end = int(report.get("image-end-offset", 0))
    cluster = 1 << min(max(int.from_bytes(header[20:24], "big"), 9), 21)
    # qemu may leave the file ending inside its last cluster (the rest reads as zeros).
    if end > -(-size // cluster) * cluster:
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
