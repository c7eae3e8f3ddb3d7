"""Kernel module dependency closure, read from each module's ELF ``.modinfo`` section.

Debian's kernel packages ship no ``modules.dep`` (depmod writes it at install time), so
the dependencies come from the ``depends=`` line modpost stores in every module.
"""

from __future__ import annotations

import gzip
import importlib
import lzma
import mmap
import os
import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from vmrun.errors import VmrunError

__all__ = [
    "Module",
    "closure",
    "modinfo",
    "normalise_name",
    "parse_modules_dep",
    "read_module_bytes",
    "scan_modules",
]

_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


@dataclass(frozen=True)
class Module:
    """One loadable module: its canonical name (``_`` not ``-``), file and direct dependencies."""

    name: str
    path: Path
    depends: tuple[str, ...]


def normalise_name(name: str) -> str:
    """The canonical spelling of a module name: the kernel treats ``-`` and ``_`` alike."""
    return name.strip().replace("-", "_")


def _module_stem(filename: str) -> str | None:
    for suffix in _SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)]
    return None


def read_module_bytes(path: Path) -> bytes:
    """The contents of a module file, decompressed if it ends in .xz, .gz or .zst."""
    data = path.read_bytes()
    name = path.name
    try:
        if name.endswith(".xz"):
            return lzma.decompress(data)
        if name.endswith(".gz"):
            return gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError, zlib.error) as e:
        raise VmrunError(f"cannot decompress kernel module {path}: {e}") from e
    if name.endswith(".zst"):
        return _zstd_decompress(data, path)
    return data


def _zstd_decompress(data: bytes, path: Path) -> bytes:
    try:
        zstandard = importlib.import_module("zstandard")
    except ImportError:
        raise VmrunError(
            f"kernel module {path} is zstd-compressed and the 'zstandard' package is missing",
            hint="pip install zstandard",
        ) from None
    try:
        # Module files carry no content size in their frame header, so stream it.
        reader = zstandard.ZstdDecompressor().stream_reader(data)
        out: bytes = reader.read()
        while chunk := reader.read():
            out += chunk
        return out
    except zstandard.ZstdError as e:
        raise VmrunError(f"cannot decompress kernel module {path}: {e}") from e


def _section(elf: bytes | mmap.mmap, wanted: bytes) -> bytes | None:
    """The contents of the named ELF section, or None if there is none."""
    if len(elf) < 0x34 or elf[:4] != b"\x7fELF":
        raise VmrunError("not an ELF file")
    ei_class, ei_data = elf[4], elf[5]
    if ei_class not in (1, 2) or ei_data not in (1, 2):
        raise VmrunError(f"unsupported ELF class/encoding {ei_class}/{ei_data}")
    end = "<" if ei_data == 1 else ">"
    is64 = ei_class == 2
    try:
        if is64:
            shoff, = struct.unpack_from(end + "Q", elf, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", elf, 0x3A)
            sh_fmt = end + "IIQQQQIIQQ"
        else:
            shoff, = struct.unpack_from(end + "I", elf, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", elf, 0x2E)
            sh_fmt = end + "IIIIIIIIII"
        if shoff == 0:
            return None
        if shentsize < struct.calcsize(sh_fmt):
            raise VmrunError(f"ELF section header size {shentsize} too small")

        def header(i: int) -> tuple[int, ...]:
            return struct.unpack_from(sh_fmt, elf, shoff + i * shentsize)

        # Extended numbering: the real counts live in section 0 when they overflow 16 bits.
        if shnum == 0:
            shnum = header(0)[5]
        if shstrndx == 0xFFFF:
            shstrndx = header(0)[6]
        if shnum > (len(elf) - shoff) // shentsize:
            raise VmrunError("ELF section headers run past the end of the file")
        strtab = header(shstrndx)
        str_off, str_size = strtab[4], strtab[5]
        names = elf[str_off : str_off + str_size]
        for i in range(shnum):
            sh = header(i)
            sh_name, sh_type, sh_offset, sh_size = sh[0], sh[1], sh[4], sh[5]
            stop = names.find(b"\0", sh_name)
            if names[sh_name : stop if stop >= 0 else None] != wanted:
                continue
            if sh_type == 8:  # SHT_NOBITS: no bytes in the file
                return b""
            if sh_offset + sh_size > len(elf):
                raise VmrunError("ELF section runs past the end of the file")
            return elf[sh_offset : sh_offset + sh_size]
    except struct.error as e:
        raise VmrunError(f"truncated ELF file: {e}") from e
    return None


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of a module's ``.modinfo`` section, grouped by key.

    Keys that repeat (``alias``, ``parm``) keep every value in file order.
    """
    return _modinfo(ko)


def _modinfo_of_file(path: Path) -> dict[str, list[str]]:
    if path.suffix != ".ko":
        return _modinfo(read_module_bytes(path))
    # An uncompressed module is mapped, not read: only the pages holding the headers and
    # .modinfo are touched, which makes scanning a whole kernel several times faster.
    with path.open("rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise VmrunError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _modinfo(mapped)


def _modinfo(ko: bytes | mmap.mmap) -> dict[str, list[str]]:
    section = _section(ko, b".modinfo")
    if section is None:
        raise VmrunError("ELF file has no .modinfo section; not a kernel module")
    info: dict[str, list[str]] = {}
    for raw in section.split(b"\0"):
        if not raw:
            continue
        key, sep, value = raw.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


def _depends(info: Mapping[str, list[str]]) -> tuple[str, ...]:
    out: list[str] = []
    for line in info.get("depends", []):
        out.extend(normalise_name(d) for d in line.split(",") if d.strip())
    return tuple(dict.fromkeys(out))


def parse_modules_dep(text: str) -> dict[str, tuple[str, ...]]:
    """Parse depmod's ``modules.dep``: module name -> direct and indirect dependencies.

    Each line is ``path: dep-path dep-path ...``; names come from the file names.
    """
    deps: dict[str, tuple[str, ...]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        path, sep, rest = line.partition(":")
        if not sep:
            raise VmrunError(f"modules.dep line {lineno} has no ':': {line!r}")
        names = [_dep_name(p) for p in rest.split()]
        deps[_dep_name(path.strip())] = tuple(dict.fromkeys(names))
    return deps


def _dep_name(path: str) -> str:
    filename = path.rsplit("/", 1)[-1]
    return normalise_name(_module_stem(filename) or filename)


def scan_modules(modules_root: Path) -> dict[str, Module]:
    """Every module under ``modules_root`` (``lib/modules/<release>``), keyed by name.

    Uses ``modules.dep`` when the directory has one, else reads each module's
    ``.modinfo`` (decompressing it), which is slower.
    """
    if not modules_root.is_dir():
        raise VmrunError(f"kernel modules directory not found: {modules_root}")
    dep_file = modules_root / "modules.dep"
    from_dep = parse_modules_dep(dep_file.read_text()) if dep_file.is_file() else None
    found: dict[str, Module] = {}
    for dirpath, dirnames, filenames in os.walk(modules_root):
        dirnames.sort()
        for filename in sorted(filenames):
            stem = _module_stem(filename)
            if stem is None:
                continue
            path = Path(dirpath, filename)
            if from_dep is not None and normalise_name(stem) in from_dep:
                name = normalise_name(stem)
                depends = from_dep[name]
            else:
                try:
                    info = _modinfo_of_file(path)
                except VmrunError as e:
                    raise VmrunError(f"cannot read kernel module {path}: {e}") from e
                name = normalise_name(info.get("name", [stem])[0] or stem)
                depends = _depends(info)
            # Keep the first one found (sorted walk), so the result does not depend on
            # directory order when a module appears twice (e.g. kernel/ and updates/).
            found.setdefault(name, Module(name=name, path=path, depends=depends))
    return found


def closure(
    wanted: Iterable[str], available: Mapping[str, Module], *, missing_ok: bool = False
) -> list[Module]:
    """``wanted`` and everything they depend on, each once, dependencies first.

    The order is deterministic: a depth-first walk in the order of ``wanted`` and of each
    module's ``depends``. A name not in ``available`` (usually built into the kernel) is
    skipped when ``missing_ok``, else it is an error. Dependency cycles do not loop.
    """
    order: list[Module] = []
    done: set[str] = set()
    missing: list[str] = []

    def visit(name: str) -> None:
        if name in done:
            return
        done.add(name)  # marked before descending, so a cycle stops here
        module = available.get(name)
        if module is None:
            missing.append(name)
            return
        # Explicit stack instead of recursion: dependency chains are short, but a
        # hostile or broken tree should not hit the recursion limit.
        stack: list[tuple[Module, int]] = [(module, 0)]
        while stack:
            current, index = stack.pop()
            if index < len(current.depends):
                stack.append((current, index + 1))
                dep = current.depends[index]
                if dep in done:
                    continue
                done.add(dep)
                dep_module = available.get(dep)
                if dep_module is None:
                    missing.append(f"{dep} (needed by {current.name})")
                    continue
                stack.append((dep_module, 0))
            else:
                order.append(current)

    for name in wanted:
        visit(normalise_name(name))
    if missing and not missing_ok:
        raise VmrunError(
            "kernel module(s) not found: " + ", ".join(missing),
            hint="they may be built into the kernel; pass missing_ok to skip them",
        )
    return order
