"""Flattening image layers into one tar stream, from tar headers, never touching the host tree.

Pass one reads each layer's headers (hashing the uncompressed stream against its
diff_id) and applies them to an in-memory tree with the OCI whiteout rules; a file's
bytes stay in its layer, remembered as (layer, member ordinal). Pass two streams the
layers again and writes ONE tar of the result: directories (parents first), then the
entries without data, then each surviving file's bytes in layer order, then hardlinks.
No name from a layer ever becomes a host path.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from vmrun.errors import ImageError, UnsafeImage

MAX_MEMBERS = 1_000_000  # entries in all layers together
MAX_UNCOMPRESSED = 64 << 30  # bytes of uncompressed layer data in one image
MAX_PATH = 4096
MAX_NAME = 255
MAX_LINK = 4095
MAX_XATTR_BYTES = 64 << 10  # per entry
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_XATTR = "SCHILY.xattr."
_COPY = 1 << 20
_BLOCK = tarfile.BLOCKSIZE
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_KINDS = {tarfile.SYMTYPE: "symlink", tarfile.CHRTYPE: "chr", tarfile.BLKTYPE: "blk",
          tarfile.FIFOTYPE: "fifo"}
_TAR_TYPE = {"file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE, "chr": tarfile.CHRTYPE,
             "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}


@dataclass(frozen=True)
class Layer:
    """One layer blob as stored: its compression ('', 'gzip', 'zstd') and its diff_id."""

    path: Path
    compression: str
    diff_id: str  # "sha256:HEX" of the uncompressed tar
    label: str  # how messages name it, e.g. "layer 2 (sha256:1a2b3c4d5e6f)"


@dataclass
class Attrs:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)


@dataclass(eq=False)
class Inode:
    """A non-directory; hardlinked paths share one Inode object."""

    kind: str  # file, symlink, chr, blk, fifo
    attrs: Attrs
    size: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    source: tuple[int, int] | None = None  # (layer index, member ordinal) holding the bytes


@dataclass(eq=False)
class Dir:
    attrs: Attrs
    children: dict[str, Dir | Inode] = field(default_factory=dict)


@dataclass(frozen=True)
class _Member:
    ordinal: int
    path: tuple[str, ...]
    kind: str  # dir, hardlink, whiteout, opaque, or an Inode kind
    attrs: Attrs
    size: int = 0
    link: str = ""
    link_path: tuple[str, ...] = ()
    devmajor: int = 0
    devminor: int = 0


@dataclass
class Tree:
    """The merged result of all layers so far."""

    root: Dir = field(default_factory=lambda: Dir(Attrs()))
    members: int = 0
    uncompressed: int = 0


class _HashingReader:
    """Reads through FILE, hashing and counting, within a byte LIMIT."""

    def __init__(self, file: IO[bytes], limit: int, label: str) -> None:
        self.file, self.limit, self.label = file, limit, label
        self.hash = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.hash.update(data)
        self.count += len(data)
        if self.count > self.limit:
            raise UnsafeImage(f"{self.label}: more than {MAX_UNCOMPRESSED} bytes of "
                              "uncompressed layer data")
        return data


@contextlib.contextmanager
def open_layer(layer: Layer) -> Iterator[IO[bytes]]:
    """LAYER's uncompressed tar stream."""
    with open(layer.path, "rb") as raw:
        if layer.compression == "gzip":
            with gzip.GzipFile(fileobj=raw) as unzipped:
                yield cast(IO[bytes], unzipped)
        elif layer.compression == "zstd":
            try:
                import zstandard
            except ImportError:
                raise ImageError(f"{layer.label} is zstd-compressed; install the zstandard "
                                 "package (pip install vmrun[zst])") from None
            # zstd:chunked and parallel writers make several frames: read them all.
            with zstandard.ZstdDecompressor().stream_reader(
                    raw, read_across_frames=True) as unzstd:
                yield unzstd
        else:
            yield raw


@contextlib.contextmanager
def _reading(layer: Layer) -> Iterator[None]:
    """Turn what a broken layer raises into one ImageError line naming the layer."""
    try:
        yield
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ImageError(f"{layer.label}: not a valid tar stream: {err}") from None
    except OSError as err:
        raise ImageError(f"{layer.label}: {err}") from None
    except Exception as err:
        if type(err).__name__ == "ZstdError":
            raise ImageError(f"{layer.label}: bad zstd data: {err}") from None
        raise


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (info := tar.next()) is not None:
        vars(tar)["members"].clear()  # a stream's TarFile keeps every header otherwise
        yield info


# -- pass one: headers into the tree --


def clean_path(name: str) -> tuple[str, ...]:
    """NAME's components inside the image root; ValueError if it escapes or is malformed."""
    if "\x00" in name:
        raise ValueError("NUL in path")
    if len(name) > MAX_PATH:
        raise ValueError(f"path longer than {MAX_PATH}")
    parts: list[str] = []
    for part in name.split("/"):  # a leading / is dropped, as docker does
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise ValueError("path escapes the image root")
            parts.pop()
        elif len(part.encode("utf-8", "surrogateescape")) > MAX_NAME:
            raise ValueError(f"a name longer than {MAX_NAME} bytes")
        else:
            parts.append(part)
    return tuple(parts)


def _attrs(info: tarfile.TarInfo) -> Attrs:
    xattrs = {k: v for k, v in info.pax_headers.items() if k.startswith(_XATTR)}
    if sum(len(k) + len(v) for k, v in xattrs.items()) > MAX_XATTR_BYTES:
        raise ValueError(f"extended attributes over {MAX_XATTR_BYTES} bytes")
    return Attrs(mode=info.mode & 0o7777, uid=max(info.uid, 0), gid=max(info.gid, 0),
                 mtime=max(int(info.mtime), 0), xattrs=xattrs)


def _member(ordinal: int, info: tarfile.TarInfo) -> _Member | None:
    """INFO as a tree operation; None for what is skipped; ValueError if it is unsafe."""
    path = clean_path(info.name)
    attrs = _attrs(info)
    base = path[-1] if path else ""
    if base.startswith(WHITEOUT):
        if base == OPAQUE:
            return _Member(ordinal, path[:-1], "opaque", attrs)
        if base.startswith(WHITEOUT + WHITEOUT):
            return None  # AUFS bookkeeping (.wh..wh.plnk and the like)
        return _Member(ordinal, (*path[:-1], base[len(WHITEOUT):]), "whiteout", attrs)
    if info.issparse():
        raise ValueError("sparse members are not supported")
    if info.type == tarfile.DIRTYPE:
        return _Member(ordinal, path, "dir", attrs)
    if not path:
        raise ValueError("the image root must be a directory")
    if info.type in _FILE_TYPES:
        return _Member(ordinal, path, "file", attrs, size=info.size)
    if info.type == tarfile.LNKTYPE:
        return _Member(ordinal, path, "hardlink", attrs, link_path=clean_path(info.linkname))
    if info.type in _KINDS:
        if "\x00" in info.linkname or len(info.linkname) > MAX_LINK:
            raise ValueError("a link target with NUL or too long")
        return _Member(ordinal, path, _KINDS[info.type], attrs, link=info.linkname,
                       devmajor=info.devmajor, devminor=info.devminor)
    raise ValueError(f"unsupported member type {info.type!r}")


def read_layer(tree: Tree, index: int, layer: Layer) -> None:
    """Apply LAYER (the INDEX-th) to TREE, after checking its bytes against its diff_id."""
    members: list[_Member] = []
    with _reading(layer), open_layer(layer) as stream:
        reader = _HashingReader(stream, MAX_UNCOMPRESSED - tree.uncompressed, layer.label)
        with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
            for ordinal, info in enumerate(_members(tar)):
                tree.members += 1
                if tree.members > MAX_MEMBERS:
                    raise UnsafeImage(f"{layer.label}: more than {MAX_MEMBERS} entries in "
                                      "the image")
                try:
                    member = _member(ordinal, info)
                except ValueError as err:
                    raise UnsafeImage(f"{layer.label}: member {info.name!r}: {err}") from None
                if member is not None:
                    members.append(member)
        while reader.read(1 << 20):
            pass  # the tar's padding counts towards the diff_id too
    tree.uncompressed += reader.count
    if f"sha256:{reader.hash.hexdigest()}" != layer.diff_id:
        raise ImageError(f"{layer.label}: uncompressed content does not match its diff_id "
                         f"{layer.diff_id}")
    # Whiteouts hide what lower layers have, never this layer's own entries.
    for member in members:
        if member.kind in ("whiteout", "opaque"):
            _whiteout(tree.root, member)
    for member in members:
        if member.kind not in ("whiteout", "opaque"):
            _add(tree.root, index, member, layer)


def _lookup_dir(root: Dir, path: tuple[str, ...]) -> Dir | None:
    node: Dir | Inode = root
    for part in path:
        if not isinstance(node, Dir) or part not in node.children:
            return None
        node = node.children[part]
    return node if isinstance(node, Dir) else None


def _whiteout(root: Dir, member: _Member) -> None:
    if member.kind == "opaque":
        opaque = _lookup_dir(root, member.path)
        if opaque is not None:
            opaque.children.clear()
        return
    parent = _lookup_dir(root, member.path[:-1])
    if parent is not None and member.path:
        parent.children.pop(member.path[-1], None)


def _parent(root: Dir, path: tuple[str, ...]) -> Dir:
    """The directory PATH names, made where missing; a non-directory on the way is hidden."""
    node = root
    for part in path:
        child = node.children.get(part)
        if not isinstance(child, Dir):
            child = node.children[part] = Dir(Attrs())
        node = child
    return node


def _add(root: Dir, index: int, member: _Member, layer: Layer) -> None:
    if member.kind == "dir" and not member.path:
        root.attrs = member.attrs
        return
    parent = _parent(root, member.path[:-1])
    name = member.path[-1]
    existing = parent.children.get(name)
    if member.kind == "dir":
        if isinstance(existing, Dir):
            existing.attrs = member.attrs  # directories merge
        else:
            parent.children[name] = Dir(member.attrs)
    elif member.kind == "hardlink":
        target = _find(root, member.link_path)
        if not isinstance(target, Inode):
            what = "a directory" if isinstance(target, Dir) else "missing"
            raise UnsafeImage(f"{layer.label}: member {'/'.join(member.path)!r}: hardlink "
                              f"target {'/'.join(member.link_path)!r} is {what}")
        parent.children[name] = target
    else:
        parent.children[name] = Inode(
            member.kind, member.attrs, size=member.size, linkname=member.link,
            devmajor=member.devmajor, devminor=member.devminor,
            source=(index, member.ordinal) if member.kind == "file" and member.size else None)


def _find(root: Dir, path: tuple[str, ...]) -> Dir | Inode | None:
    node: Dir | Inode = root
    for part in path:
        if not isinstance(node, Dir) or part not in node.children:
            return None
        node = node.children[part]
    return node


def merge(layers: list[Layer]) -> Tree:
    """The tree that LAYERS give, lowest first."""
    tree = Tree()
    for index, layer in enumerate(layers):
        read_layer(tree, index, layer)
    return tree


# -- pass two: one tar of the result --


def _info(path: str, kind: str, attrs: Attrs) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.mode, info.uid, info.gid, info.mtime = attrs.mode, attrs.uid, attrs.gid, attrs.mtime
    info.uname = info.gname = ""
    info.pax_headers = dict(attrs.xattrs)
    info.type = tarfile.DIRTYPE if kind == "dir" else _TAR_TYPE[kind]
    return info


def _inode_info(path: str, inode: Inode) -> tarfile.TarInfo:
    info = _info(path, inode.kind, inode.attrs)
    info.size = inode.size if inode.kind == "file" else 0
    info.linkname = inode.linkname
    info.devmajor, info.devminor = inode.devmajor, inode.devminor
    return info


def _walk(node: Dir, prefix: str) -> Iterator[tuple[str, Dir | Inode]]:
    for name in sorted(node.children):
        child = node.children[name]
        path = f"{prefix}{name}"
        yield path, child
        if isinstance(child, Dir):
            yield from _walk(child, f"{path}/")


class _TarWriter:
    """A tar writer without tarfile's stream buffering: headers, then bytes, then padding."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.entries = 0

    def add(self, info: tarfile.TarInfo, data: IO[bytes] | None = None) -> None:
        self.out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        self.entries += 1
        if data is None or not info.size:
            return
        left = info.size
        while left:
            chunk = data.read(min(left, _COPY))
            if not chunk:
                raise EOFError("a member ended early")
            self.out.write(chunk)
            left -= len(chunk)
        self.out.write(bytes(-info.size % _BLOCK))

    def close(self) -> None:
        self.out.write(bytes(2 * _BLOCK))
        self.out.flush()


def write_tar(tree: Tree, layers: list[Layer], out: IO[bytes]) -> int:
    """Write TREE as one tar to OUT, file bytes read again from LAYERS; returns the entries."""
    primary: dict[int, str] = {}
    links: list[tuple[str, str]] = []
    wanted: dict[int, dict[int, tuple[str, Inode]]] = {}
    tar = _TarWriter(out)
    tar.add(_info(".", "dir", tree.root.attrs))
    entries = list(_walk(tree.root, ""))
    for path, node in entries:
        if isinstance(node, Dir):
            tar.add(_info(path, "dir", node.attrs))
    for path, node in entries:
        if isinstance(node, Dir):
            continue
        if id(node) in primary:
            links.append((path, primary[id(node)]))
        elif node.source is not None:
            primary[id(node)] = path
            wanted.setdefault(node.source[0], {})[node.source[1]] = (path, node)
        else:
            primary[id(node)] = path
            tar.add(_inode_info(path, node))
    for index in sorted(wanted):
        _copy_files(tar, layers[index], wanted[index])
    for path, target in links:
        info = _inode_info(path, Inode("file", Attrs()))
        info.type, info.linkname = tarfile.LNKTYPE, target
        tar.add(info)
    tar.close()
    return tar.entries


def _copy_files(tar: _TarWriter, layer: Layer, wanted: dict[int, tuple[str, Inode]]) -> None:
    left = dict(wanted)
    with _reading(layer), open_layer(layer) as stream:
        source: Any = tarfile.open(fileobj=stream, mode="r|")
        with source:
            for ordinal, member in enumerate(_members(source)):
                hit = left.pop(ordinal, None)
                if hit is None:
                    continue
                path, inode = hit
                if member.size != inode.size or member.type not in _FILE_TYPES:
                    raise ImageError(f"{layer.label}: member {member.name!r} changed between "
                                     "reads")
                tar.add(_inode_info(path, inode), source.extractfile(member))
                if not left:
                    return
    if left:
        raise ImageError(f"{layer.label}: {len(left)} members vanished between reads")


@contextlib.contextmanager
def open_member(layer: Layer, ordinal: int, size: int) -> Iterator[IO[bytes]]:
    """The bytes of LAYER's ORDINAL-th member, a regular file of SIZE bytes, streamed
    from the layer (never written to the host as a file of its own name)."""
    with _reading(layer), open_layer(layer) as stream:
        source: Any = tarfile.open(fileobj=stream, mode="r|")
        with source:
            for number, member in enumerate(_members(source)):
                if number != ordinal:
                    continue
                data = source.extractfile(member)
                if member.size != size or member.type not in _FILE_TYPES or data is None:
                    raise ImageError(f"{layer.label}: member {member.name!r} changed between "
                                     "reads")
                yield data
                return
    raise ImageError(f"{layer.label}: member {ordinal} vanished between reads")
