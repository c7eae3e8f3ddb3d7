from __future__ import annotations

import gzip
import importlib
import lzma
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from vmrun.errors import VmrunError
from vmrun.guest.cpio import read_newc
from vmrun.guest.modules import (
    Module,
    closure,
    modinfo,
    parse_modules_dep,
    read_module_bytes,
    scan_modules,
)

GCC = shutil.which("gcc")


def compile_module(tmp_path: Path, name: str, depends: str) -> bytes:
    """A real relocatable ELF object with a .modinfo section, as modpost leaves one."""
    if GCC is None:
        pytest.skip("gcc not installed")
    info = f"license=GPL\\0name={name}\\0depends={depends}\\0vermagic=6.1.0 SMP"
    source = tmp_path / f"{name}.c"
    source.write_text(
        "int init_module(void) { return 0; }\n"
        "static const char modinfo[] __attribute__((section(\".modinfo\"), used)) = "
        f'"{info}";\n'
    )
    obj = tmp_path / f"{name}.o"
    subprocess.run([GCC, "-c", "-o", str(obj), str(source)], check=True)
    return obj.read_bytes()


def handmade_elf(modinfo_data: bytes, *, is64: bool, little: bool) -> bytes:
    """A minimal ELF: null section, .modinfo, .shstrtab; no program headers."""
    end = "<" if little else ">"
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    ehsize = 0x40 if is64 else 0x34
    sh_fmt = end + ("IIQQQQIIQQ" if is64 else "IIIIIIIIII")
    shentsize = struct.calcsize(sh_fmt)
    modinfo_off = ehsize
    strtab_off = modinfo_off + len(modinfo_data)
    shoff = strtab_off + len(shstrtab)
    shoff += -shoff % 8
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1 if little else 2, 1]) + bytes(9)
    if is64:
        header = ident + struct.pack(
            end + "HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, ehsize, 0, 0, shentsize, 3, 2
        )
    else:
        header = ident + struct.pack(
            end + "HHIIIIIHHHHHH", 1, 8, 1, 0, 0, shoff, 0, ehsize, 0, 0, shentsize, 3, 2
        )
    assert len(header) == ehsize
    sections = [
        struct.pack(sh_fmt, *([0] * 10)),
        struct.pack(sh_fmt, 1, 1, 2, 0, modinfo_off, len(modinfo_data), 0, 0, 1, 0),
        struct.pack(sh_fmt, 10, 3, 0, 0, strtab_off, len(shstrtab), 0, 0, 1, 0),
    ]
    body = header + modinfo_data + shstrtab
    return body + bytes(shoff - len(body)) + b"".join(sections)


@pytest.mark.parametrize("is64", [False, True])
@pytest.mark.parametrize("little", [False, True])
def test_modinfo_of_handmade_elf(is64: bool, little: bool) -> None:
    elf = handmade_elf(b"alias=foo\0alias=bar\0name=blk\0depends=\0\0\0", is64=is64, little=little)
    info = modinfo(elf)
    assert info == {"alias": ["foo", "bar"], "name": ["blk"], "depends": [""]}


def test_modinfo_of_compiled_object(tmp_path: Path) -> None:
    info = modinfo(compile_module(tmp_path, "a", "b,c"))
    assert info["name"] == ["a"]
    assert info["depends"] == ["b,c"]
    assert info["vermagic"] == ["6.1.0 SMP"]


def test_modinfo_errors() -> None:
    with pytest.raises(VmrunError, match="not an ELF"):
        modinfo(b"hello world" * 10)
    no_modinfo = handmade_elf(b"x=1", is64=True, little=True).replace(b".modinfo", b".notinfo")
    with pytest.raises(VmrunError, match="no .modinfo"):
        modinfo(no_modinfo)
    with pytest.raises(VmrunError):
        modinfo(handmade_elf(b"x=1", is64=True, little=True)[:80])


def test_read_module_bytes_decompresses(tmp_path: Path) -> None:
    elf = handmade_elf(b"name=x\0depends=\0", is64=True, little=True)
    (tmp_path / "x.ko").write_bytes(elf)
    (tmp_path / "x.ko.xz").write_bytes(lzma.compress(elf, format=lzma.FORMAT_XZ))
    (tmp_path / "x.ko.gz").write_bytes(gzip.compress(elf))
    for suffix in ("ko", "ko.xz", "ko.gz"):
        assert read_module_bytes(tmp_path / f"x.{suffix}") == elf
    (tmp_path / "bad.ko.xz").write_bytes(b"not xz at all")
    with pytest.raises(VmrunError, match="decompress"):
        read_module_bytes(tmp_path / "bad.ko.xz")


def test_zstd_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elf = handmade_elf(b"name=x\0depends=\0", is64=True, little=True)
    path = tmp_path / "x.ko.zst"
    try:
        zstandard = importlib.import_module("zstandard")
    except ImportError:
        path.write_bytes(b"\x28\xb5\x2f\xfd")
    else:
        path.write_bytes(zstandard.ZstdCompressor().compress(elf))
        assert read_module_bytes(path) == elf
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(VmrunError, match="zstandard"):
        read_module_bytes(path)


def make_tree(tmp_path: Path, deps: dict[str, str]) -> Path:
    root = tmp_path / "lib/modules/1.0"
    for i, (name, depends) in enumerate(sorted(deps.items())):
        elf = handmade_elf(
            f"name={name}\0depends={depends}\0".encode(), is64=bool(i % 2), little=True
        )
        where = root / "kernel" / f"d{i % 3}"
        where.mkdir(parents=True, exist_ok=True)
        # File names may spell the module with '-' where modinfo says '_'.
        filename = name.replace("_", "-")
        if i % 2:
            (where / f"{filename}.ko.xz").write_bytes(lzma.compress(elf))
        else:
            (where / f"{filename}.ko").write_bytes(elf)
    (root / "modules.order").write_text("")
    return root


def test_scan_and_closure(tmp_path: Path) -> None:
    root = make_tree(
        tmp_path,
        {
            "virtio_ring": "",
            "virtio": "virtio_ring",
            "virtio_console": "virtio,virtio_ring",
            "9pnet": "",
            "9pnet_virtio": "virtio,9pnet,virtio_ring",
            "fuse": "",
            "virtiofs": "fuse,virtio,virtio_ring",
        },
    )
    mods = scan_modules(root)
    assert set(mods) == {
        "virtio_ring", "virtio", "virtio_console", "9pnet", "9pnet_virtio", "fuse", "virtiofs"
    }
    assert mods["virtio_console"].depends == ("virtio", "virtio_ring")
    assert mods["virtio_console"].path.name.startswith("virtio-console.ko")
    assert any(m.path.name.endswith(".ko.xz") for m in mods.values())
    order = [m.name for m in closure(["virtio-console", "virtiofs", "9pnet_virtio"], mods)]
    assert order == [
        "virtio_ring", "virtio", "virtio_console", "fuse", "virtiofs", "9pnet", "9pnet_virtio"
    ]
    assert order == [m.name for m in closure(["virtio_console", "virtiofs", "9pnet_virtio"], mods)]


def test_scan_prefers_modules_dep(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"a": "", "b": "a"})
    (root / "modules.dep").write_text("kernel/d0/a.ko:\nkernel/d1/b.ko.xz: kernel/d0/a.ko\n")
    (root / "kernel/d1/b.ko.xz").write_bytes(b"unreadable, so modules.dep must be used")
    mods = scan_modules(root)
    assert mods["b"].depends == ("a",)


def test_scan_reports_broken_module(tmp_path: Path) -> None:
    root = make_tree(tmp_path, {"a": ""})
    (root / "kernel/d0/broken.ko").write_bytes(b"junk")
    with pytest.raises(VmrunError, match="broken.ko"):
        scan_modules(root)
    with pytest.raises(VmrunError, match="not found"):
        scan_modules(tmp_path / "nowhere")


def available(deps: Mapping[str, tuple[str, ...]]) -> dict[str, Module]:
    return {n: Module(name=n, path=Path(f"/m/{n}.ko"), depends=d) for n, d in deps.items()}


def test_closure_missing() -> None:
    mods = available({"a": ("b",), "b": ()})
    with pytest.raises(VmrunError, match="ext4"):
        closure(["a", "ext4"], mods)
    assert [m.name for m in closure(["ext4", "a"], mods, missing_ok=True)] == ["b", "a"]
    with pytest.raises(VmrunError, match=r"gone \(needed by c\)"):
        closure(["c"], available({"c": ("gone",)}))


def test_closure_cycles_and_duplicates() -> None:
    mods = available({"a": ("b",), "b": ("c",), "c": ("a",), "d": ("d",)})
    assert [m.name for m in closure(["a", "d", "a", "b"], mods)] == ["c", "b", "a", "d"]


def test_closure_deep_chain() -> None:
    deps: dict[str, tuple[str, ...]] = {f"m{i}": (f"m{i + 1}",) for i in range(5000)}
    deps["m5000"] = ()
    order = closure(["m0"], available(deps))
    assert order[0].name == "m5000" and order[-1].name == "m0"
    assert len(order) == 5001


def test_parse_modules_dep() -> None:
    text = (
        "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/fscache/fscache.ko.xz "
        "kernel/fs/netfs/netfs.ko.xz\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "\n"
        "kernel/drivers/char/virtio-console.ko: kernel/drivers/virtio/virtio_ring.ko\n"
    )
    assert parse_modules_dep(text) == {
        "9p": ("9pnet", "fscache", "netfs"),
        "virtio_ring": (),
        "virtio_console": ("virtio_ring",),
    }
    with pytest.raises(VmrunError, match="line 1"):
        parse_modules_dep("no colon here\n")


def test_real_debian_modules() -> None:
    trees = cached_module_dirs()
    if not trees:
        pytest.skip("no Debian kernel modules in the cache (the VM tests fetch a kernel)")
    mods = scan_modules(trees[0])
    names = [m.name for m in closure(["virtio_console", "9pnet_virtio", "9p", "virtiofs"], mods)]
    for needed in ("virtio", "virtio_ring", "9pnet", "netfs", "fscache", "fuse"):
        assert needed in names
    for module in closure(["virtio_console", "9pnet_virtio", "9p", "virtiofs"], mods):
        for dep in module.depends:
            assert names.index(dep) < names.index(module.name)


# --- the initramfs's module sets -------------------------------------------------------------

# Where Debian's kernel keeps the modules of the root filesystem sets, with their real
# dependencies (6.1, amd64), plus the boot set's.
DEBIAN_LAYOUT = {
    "drivers/virtio/virtio_mmio": "", "drivers/char/virtio_console": "",
    "drivers/block/virtio_blk": "",
    "crypto/crc32c_generic": "", "fs/jbd2/jbd2": "", "fs/mbcache": "", "lib/crc16": "",
    "fs/ext4/ext4": "jbd2,mbcache,crc16", "lib/libcrc32c": "", "fs/xfs/xfs": "libcrc32c",
}


def cpio_files(archive: bytes) -> dict[str, bytes]:
    """The members of a newc archive, by name."""
    return read_newc(archive)


def test_initrd_has_the_root_filesystem_sets(tmp_path: Path) -> None:
    from vmrun.guest import build
    from vmrun.qemu.arch import lookup_arch

    release = "6.1.0-test-amd64"
    modules = tmp_path / "kernel/root/lib/modules" / release
    for rel, depends in DEBIAN_LAYOUT.items():
        # What gets unpacked from the .deb at all: MODULE_DIRS must cover every one.
        assert build._wanted_member(f"lib/modules/{release}/kernel/{rel}.ko"), rel
        path = modules / "kernel" / f"{rel}.ko"
        path.parent.mkdir(parents=True, exist_ok=True)
        name = rel.rsplit("/", 1)[1]
        path.write_bytes(handmade_elf(f"name={name}\0depends={depends}\0".encode(),
                                      is64=True, little=True))
    busybox = tmp_path / "busybox/bin/busybox"
    busybox.parent.mkdir(parents=True)
    busybox.write_bytes(b"not really busybox")
    initrd = build._build_initrd(tmp_path / "kernel", tmp_path / "busybox",
                                 lookup_arch("x86_64"), tmp_path / "cache")
    files = cpio_files(initrd.read_bytes())

    def listed(set_name: str) -> list[str]:
        text = files[f"etc/vmrun/modules.{set_name}"].decode()
        return [line.rsplit("/", 1)[1].removesuffix(".ko") for line in text.split()]

    # crc32c before ext4 (a softdep), ext4's dependencies before it; xfs on its own.
    assert listed("fs") == ["crc32c_generic", "jbd2", "mbcache", "crc16", "ext4"]
    assert listed("xfs") == ["libcrc32c", "xfs"]
    for name in (*listed("fs"), *listed("xfs")):
        assert f"lib/modules/{release}/{name}.ko" in files


def cached_module_dirs() -> list[Path]:
    """lib/modules/RELEASE of the cached amd64 kernels (looked up when the test runs: the VM
    tests, which run first, fetch one)."""
    cache = Path(os.environ.get("VMRUN_CACHE_DIR", "/nonexistent")) / "kernels"
    return sorted(cache.glob("*/root/lib/modules/*-amd64"))


def cached_kernel_trees() -> list[Path]:
    cache = Path(os.environ.get("VMRUN_CACHE_DIR", "/nonexistent")) / "kernels"
    return sorted(p.parent.parent.parent for p in cache.glob("*/root/lib/modules/*/kernel/fs/ext4"))


def test_cached_debian_kernels_have_the_whole_root_filesystem_closure() -> None:
    from vmrun.guest.build import MODULE_SETS

    if not cached_kernel_trees():
        pytest.skip("no kernel with ext4 in the cache (the VM tests fetch one)")

    for tree in cached_kernel_trees():
        mods = scan_modules(tree)
        names = [m.name for m in closure([*MODULE_SETS["fs"], *MODULE_SETS["xfs"]], mods)]
        for needed in ("crc32c_generic", "jbd2", "mbcache", "crc16", "ext4", "libcrc32c", "xfs"):
            assert needed in names, tree
