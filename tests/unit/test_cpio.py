from __future__ import annotations

import io
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from vmrun.errors import VmrunError
from vmrun.guest.cpio import CpioWriter

CPIO = shutil.which("cpio") or "/usr/bin/cpio"
needs_cpio = pytest.mark.skipif(not Path(CPIO).exists(), reason="cpio not installed")


def parse_newc(archive: bytes) -> list[tuple[str, dict[str, int], bytes]]:
    """Our own reading of the format, to check the fields cpio(1) does not show."""
    names = (
        "ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor "
        "namesize check"
    ).split()
    out: list[tuple[str, dict[str, int], bytes]] = []
    pos = 0
    while True:
        assert archive[pos : pos + 6] == b"070701"
        fields = {
            n: int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i, n in enumerate(names)
        }
        name_start = pos + 110
        name = archive[name_start : name_start + fields["namesize"] - 1].decode()
        assert archive[name_start + fields["namesize"] - 1] == 0
        data_start = name_start + fields["namesize"]
        data_start += -data_start % 4
        data = archive[data_start : data_start + fields["filesize"]]
        pos = data_start + fields["filesize"]
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert not archive[pos:].strip(b"\0")
            return out
        out.append((name, fields, data))


def sample() -> bytes:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.directory("etc")
    w.file("etc/hostname", b"vm\n")
    w.file("/init", b"#!/bin/sh\necho hi\n", mode=0o755)
    w.file("lib/modules/6.1.0/kernel/x.ko", b"\x7fELF" + bytes(range(256)))
    w.file("empty", b"")
    w.directory("secret", mode=0o700)
    w.symlink("bin/sh", "busybox")
    w.symlink("sbin", "bin")
    w.file("./odd//name", b"abc", mode=0o600)
    w.finish()
    return buf.getvalue()


def test_fields_are_deterministic() -> None:
    archive = sample()
    assert archive == sample()
    assert len(archive) % 512 == 0
    entries = parse_newc(archive)
    names = [name for name, _, _ in entries]
    assert names == [
        "etc", "etc/hostname", "init", "lib", "lib/modules", "lib/modules/6.1.0",
        "lib/modules/6.1.0/kernel", "lib/modules/6.1.0/kernel/x.ko", "empty", "secret",
        "bin", "bin/sh", "sbin", "odd", "odd/name",
    ]
    assert [f["ino"] for _, f, _ in entries] == list(range(1, len(entries) + 1))
    for _, fields, _ in entries:
        assert fields["mtime"] == fields["uid"] == fields["gid"] == 0
        assert fields["nlink"] == (2 if stat.S_ISDIR(fields["mode"]) else 1)
    by_name = {name: (fields, data) for name, fields, data in entries}
    assert by_name["init"][0]["mode"] == stat.S_IFREG | 0o755
    assert by_name["lib"][0]["mode"] == stat.S_IFDIR | 0o755
    assert by_name["bin/sh"] == (by_name["bin/sh"][0], b"busybox")
    assert by_name["bin/sh"][0]["mode"] == stat.S_IFLNK | 0o777


@needs_cpio
def test_cpio_lists_and_extracts(tmp_path: Path) -> None:
    archive = sample()
    listing = subprocess.run(
        [CPIO, "-t", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode().split()
    assert listing == [name for name, _, _ in parse_newc(archive)]

    subprocess.run(
        [CPIO, "-idm", "--quiet"], input=archive, cwd=tmp_path, capture_output=True, check=True
    )
    assert (tmp_path / "etc/hostname").read_bytes() == b"vm\n"
    assert (tmp_path / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "lib/modules/6.1.0/kernel/x.ko").read_bytes() == b"\x7fELF" + bytes(
        range(256)
    )
    assert (tmp_path / "empty").read_bytes() == b""
    assert (tmp_path / "odd/name").read_bytes() == b"abc"
    assert os.readlink(tmp_path / "bin/sh") == "busybox"
    assert os.readlink(tmp_path / "sbin") == "bin"
    assert stat.S_IMODE((tmp_path / "init").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "etc/hostname").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "odd/name").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o700
    assert (tmp_path / "init").stat().st_mtime == 0


@needs_cpio
def test_char_device_listing() -> None:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.char_device("dev/console", 5, 1)
    w.char_device("dev/null", 1, 3, mode=0o666)
    w.finish()
    entries = parse_newc(buf.getvalue())
    console = entries[1][1]
    assert console["mode"] == stat.S_IFCHR | 0o600
    assert (console["rdevmajor"], console["rdevminor"]) == (5, 1)
    # Listing, not extraction: creating device nodes needs root.
    verbose = subprocess.run(
        [CPIO, "-tv", "--quiet"], input=buf.getvalue(), capture_output=True, check=True
    ).stdout.decode().splitlines()
    assert verbose[1].startswith("crw-------")
    assert re.search(r" 5, +1 ", verbose[1])
    assert verbose[2].startswith("crw-rw-rw-")


@pytest.mark.parametrize("bad", ["..", "../etc", "a/../b", "a/..", "/", "", ".", "a\0b"])
def test_refuses_bad_names(bad: str) -> None:
    w = CpioWriter(io.BytesIO())
    with pytest.raises(VmrunError):
        w.file(bad, b"x")


def test_refuses_duplicates_and_writes_after_finish() -> None:
    w = CpioWriter(io.BytesIO())
    w.file("a", b"1")
    with pytest.raises(VmrunError, match="twice"):
        w.file("/a", b"2")
    w.directory("d")
    w.directory("d")  # same mode again: a no-op
    with pytest.raises(VmrunError):
        w.directory("d", mode=0o700)
    w.finish()
    with pytest.raises(VmrunError, match="finished"):
        w.file("b", b"")


def test_empty_archive_is_just_a_trailer() -> None:
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.finish()
    assert len(buf.getvalue()) == 512
    assert parse_newc(buf.getvalue()) == []
