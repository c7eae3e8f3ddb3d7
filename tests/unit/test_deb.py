from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmrun.debian.deb import extract_deb, parse_stanzas, read_control
from vmrun.errors import FetchError

CONTROL = b"Package: hello\nVersion: 1.0-1\nArchitecture: amd64\nDescription: greets\n more\n"


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str = "file"  # file, dir, symlink, hardlink, chr, fifo
    data: bytes = b""
    mode: int = 0o644
    target: str = ""


def ar_archive(members: list[tuple[str, bytes]], *, bsd: bool = False) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, data in members:
        if bsd:
            field, payload = f"#1/{len(name)}", name.encode() + data
        else:
            field, payload = name + "/", data
        header = f"{field:<16}{0:<12}{0:<6}{0:<6}{0o100644:<8o}{len(payload):<10}".encode() + b"`\n"
        assert len(header) == 60
        out += header + payload
        if len(payload) % 2:
            out += b"\n"
    return bytes(out)


def compress(data: bytes, suffix: str) -> bytes:
    if suffix == "xz":
        return lzma.compress(data)
    if suffix == "gz":
        return gzip.compress(data)
    if suffix == "bz2":
        return bz2.compress(data)
    if suffix == "zst":
        zstandard = pytest.importorskip("zstandard")
        compressed: bytes = zstandard.ZstdCompressor().compress(data)
        return compressed
    return data


def tar_bytes(entries: list[Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.mode = entry.mode
            info.mtime = 1_700_000_000
            content = None
            if entry.kind == "file":
                info.size = len(entry.data)
                content = io.BytesIO(entry.data)
            elif entry.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif entry.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, entry.target
            elif entry.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, entry.target
            elif entry.kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            elif entry.kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info, content)
    return buffer.getvalue()


def build_deb(
    path: Path,
    entries: list[Entry],
    *,
    suffix: str = "xz",
    control: bytes = CONTROL,
    version: bytes = b"2.0\n",
    bsd: bool = False,
) -> Path:
    control_tar = tar_bytes([Entry("./", "dir", mode=0o755), Entry("./control", data=control)])
    data_name = "data.tar" + (f".{suffix}" if suffix else "")
    members = [
        ("debian-binary", version),
        ("control.tar.xz", lzma.compress(control_tar)),
        (data_name, compress(tar_bytes(entries), suffix)),
    ]
    path.write_bytes(ar_archive(members, bsd=bsd))
    return path


BASIC = [
    Entry("./", "dir", mode=0o755),
    Entry("./usr/", "dir", mode=0o755),
    Entry("./usr/bin/", "dir", mode=0o755),
    Entry("./usr/bin/hello", data=b"#!/bin/sh\necho hi\n", mode=0o755),
    Entry("./usr/bin/hi", "symlink", target="hello"),
    Entry("./usr/bin/hello2", "hardlink", target="./usr/bin/hello"),
    Entry("./usr/share/doc/hello/copyright", data=b"odd length!"),
    Entry("./usr/lib", "symlink", target="/absolute/elsewhere"),
]


@pytest.mark.parametrize("suffix", ["xz", "gz", "bz2", "", "zst"])
def test_extract_every_compression(tmp_path: Path, suffix: str) -> None:
    deb = build_deb(tmp_path / "hello.deb", BASIC, suffix=suffix)
    dest = tmp_path / "root"
    paths = extract_deb(deb, dest)
    assert paths == [
        "usr",
        "usr/bin",
        "usr/bin/hello",
        "usr/bin/hi",
        "usr/bin/hello2",
        "usr/share/doc/hello/copyright",
        "usr/lib",
    ]
    hello = dest / "usr/bin/hello"
    assert hello.read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(hello.stat().st_mode) == 0o755
    assert os.readlink(dest / "usr/bin/hi") == "hello"
    assert os.readlink(dest / "usr/lib") == "/absolute/elsewhere"
    assert (dest / "usr/bin/hello2").stat().st_ino == hello.stat().st_ino
    assert (dest / "usr/share/doc/hello/copyright").read_bytes() == b"odd length!"
    assert hello.stat().st_mtime == 1_700_000_000


def test_select_filters_by_normalized_path(tmp_path: Path) -> None:
    deb = build_deb(tmp_path / "hello.deb", BASIC)
    seen: list[str] = []

    def select(path: str) -> bool:
        seen.append(path)
        return path.startswith("usr/share/")

    paths = extract_deb(deb, tmp_path / "root", select=select)
    assert paths == ["usr/share/doc/hello/copyright"]
    assert "usr/bin/hello" in seen and all(not p.startswith(".") for p in seen)
    assert not (tmp_path / "root/usr/bin").exists()


def test_read_control(tmp_path: Path) -> None:
    deb = build_deb(tmp_path / "hello.deb", BASIC, bsd=True)
    fields = read_control(deb)
    assert fields["Package"] == "hello"
    assert fields["Version"] == "1.0-1"
    assert fields["Description"] == "greets\nmore"


def test_bsd_ar_names(tmp_path: Path) -> None:
    deb = build_deb(tmp_path / "hello.deb", BASIC, bsd=True)
    assert "usr/bin/hello" in extract_deb(deb, tmp_path / "root")


def test_zst_without_zstandard_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deb = build_deb(tmp_path / "hello.deb", BASIC, suffix="zst")
    # None in sys.modules makes the import fail as if the module were not installed.
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(FetchError, match="zstandard") as caught:
        extract_deb(deb, tmp_path / "root")
    assert caught.value.hint is not None and "pip install zstandard" in caught.value.hint


@pytest.mark.parametrize("name", ["../escape", "./usr/../../escape", "/etc/escape"])
def test_escaping_paths_are_refused(tmp_path: Path, name: str) -> None:
    deb = build_deb(tmp_path / "evil.deb", [Entry(name, data=b"pwned")])
    dest = tmp_path / "deep" / "root"
    with pytest.raises(FetchError, match="refusing"):
        extract_deb(deb, dest)
    assert not (tmp_path / "deep" / "escape").exists()
    assert not (tmp_path / "escape").exists()


def test_write_through_symlink_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    entries = [
        Entry("./lib", "symlink", target=str(outside)),
        Entry("./lib/passwd", data=b"pwned"),
    ]
    deb = build_deb(tmp_path / "evil.deb", entries)
    with pytest.raises(FetchError, match="symlink"):
        extract_deb(deb, tmp_path / "root")
    assert list(outside.iterdir()) == []


def test_existing_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"original")
    dest = tmp_path / "root"
    dest.mkdir()
    (dest / "file").symlink_to(victim)
    deb = build_deb(tmp_path / "hello.deb", [Entry("./file", data=b"new")])
    extract_deb(deb, dest)
    assert victim.read_bytes() == b"original"
    assert not (dest / "file").is_symlink()
    assert (dest / "file").read_bytes() == b"new"


def test_devices_fifos_skipped_and_setuid_dropped(tmp_path: Path) -> None:
    entries = [
        Entry("./dev/null", "chr", mode=0o666),
        Entry("./fifo", "fifo", mode=0o644),
        Entry("./su", data=b"x", mode=0o4755),
        Entry("./sg", data=b"x", mode=0o2755),
        Entry("./tmp/", "dir", mode=0o1777),
    ]
    deb = build_deb(tmp_path / "evil.deb", entries)
    dest = tmp_path / "root"
    assert extract_deb(deb, dest) == ["su", "sg", "tmp"]
    assert not (dest / "dev").exists() and not (dest / "fifo").exists()
    assert stat.S_IMODE((dest / "su").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "sg").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o1777


def test_read_only_directory_still_gets_its_files(tmp_path: Path) -> None:
    entries = [Entry("./ro/", "dir", mode=0o555), Entry("./ro/file", data=b"x")]
    dest = tmp_path / "root"
    extract_deb(build_deb(tmp_path / "ro.deb", entries), dest)
    assert (dest / "ro/file").read_bytes() == b"x"
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o555
    (dest / "ro").chmod(0o755)


def test_not_a_deb(tmp_path: Path) -> None:
    junk = tmp_path / "junk.deb"
    junk.write_bytes(b"PK\x03\x04 not an ar archive")
    with pytest.raises(FetchError, match="not a .deb"):
        extract_deb(junk, tmp_path / "root")


def test_wrong_format_version(tmp_path: Path) -> None:
    deb = build_deb(tmp_path / "new.deb", BASIC, version=b"3.0\n")
    with pytest.raises(FetchError, match="format version"):
        read_control(deb)


def test_truncated_deb(tmp_path: Path) -> None:
    deb = build_deb(tmp_path / "hello.deb", BASIC)
    deb.write_bytes(deb.read_bytes()[:-40])
    with pytest.raises(FetchError):
        extract_deb(deb, tmp_path / "root")


def test_corrupt_data_tar(tmp_path: Path) -> None:
    data = bytearray(build_deb(tmp_path / "hello.deb", BASIC, suffix="gz").read_bytes())
    # Early in the deflate stream: corruption after the tar end marker is never read.
    start = data.index(b"data.tar.gz/") + 60 + 20
    data[start : start + 8] = b"\xff" * 8
    (tmp_path / "bad.deb").write_bytes(bytes(data))
    with pytest.raises(FetchError, match="corrupt"):
        extract_deb(tmp_path / "bad.deb", tmp_path / "root")


def test_parse_stanzas() -> None:
    text = "A: 1\nB:\n x\n y\n\n\nA: 2\n"
    assert parse_stanzas(text, source="t") == [{"A": "1", "B": "\nx\ny"}, {"A": "2"}]
    with pytest.raises(FetchError, match="line 1"):
        parse_stanzas(" orphan\n", source="t")


def _tree(root: Path) -> dict[str, tuple[str, str | bytes, int]]:
    tree: dict[str, tuple[str, str | bytes, int]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            tree[rel] = ("symlink", os.readlink(path), 0)
        elif stat.S_ISDIR(info.st_mode):
            tree[rel] = ("dir", b"", stat.S_IMODE(info.st_mode))
        else:
            tree[rel] = ("file", path.read_bytes(), stat.S_IMODE(info.st_mode))
    return tree


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")
@pytest.mark.parametrize("compression", ["xz", "gzip", "zstd", "none"])
def test_matches_dpkg_deb(tmp_path: Path, compression: str) -> None:
    if compression == "zstd":
        pytest.importorskip("zstandard")
    tree = tmp_path / "tree"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_bytes(CONTROL)
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/tool").write_bytes(b"\x7fELF pretend")
    (tree / "usr/bin/tool").chmod(0o755)
    (tree / "usr/bin/alias").symlink_to("tool")
    (tree / "etc/tool").mkdir(parents=True)
    (tree / "etc/tool/conf").write_text("x = 1\n")
    (tree / "etc/tool/conf").chmod(0o600)
    (tree / "var/empty").mkdir(parents=True)
    (tree / "var/empty").chmod(0o700)
    deb = tmp_path / "tool.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", f"-Z{compression}", "--build", str(tree), str(deb)],
        check=True,
        capture_output=True,
    )
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    extract_deb(deb, ours)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(theirs)], check=True, capture_output=True)
    assert _tree(ours) == _tree(theirs)
    assert "usr/bin/alias" in _tree(ours)
    assert read_control(deb)["Package"] == "hello"
