"""Flattening layers: whiteouts, opaque dirs, hardlinks, hostile members; the squashfs result."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests import ocitools as ot
from vmrun.errors import ImageError, UnsafeImage
from vmrun.oci import layers as ly
from vmrun.oci.rootfs import build_rootfs

needs_squashfs = pytest.mark.skipif(ot.TAR2SQFS is None or ot.SQFS2TAR is None,
                                    reason="needs squashfs-tools-ng")


def write_layers(tmp: Path, specs: list[tuple[list[ot.Entry], str]]) -> list[ly.Layer]:
    result = []
    for number, (entries, compression) in enumerate(specs, start=1):
        tar = ot.tar_of(entries)
        path = tmp / f"layer{number}"
        path.write_bytes(ot.compress(tar, compression))
        result.append(ly.Layer(path, compression, ot.digest_of(tar), f"layer {number}"))
    return result


def flatten(tmp: Path, specs: list[tuple[list[ot.Entry], str]]) -> dict[str, tuple[
        tarfile.TarInfo, bytes]]:
    """The flattened tar of SPECS, read back: name -> (header, data)."""
    layers = write_layers(tmp, specs)
    out = io.BytesIO()
    ly.write_tar(ly.merge(layers), layers, out)
    return ot.read_tar(out.getvalue())


def rich_layers() -> list[tuple[list[ot.Entry], str]]:
    base = [
        *ot.busybox_layer(),
        ot.directory("etc"), ot.file("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
        ot.file("etc/old.conf", "old"), ot.file("etc/removed-later", "x"),
        ot.directory("var/cache/pkg"), ot.file("var/cache/pkg/a", "a"),
        ot.directory("var/cache/pkg/sub"), ot.file("var/cache/pkg/sub/b", "b"),
        ot.directory("data"), ot.file("data/original", "first version"),
        ot.hardlink("data/link", "data/original"),
        ot.directory("keep"), ot.file("keep/target", "kept bytes"),
        ot.hardlink("keep/alias", "keep/target"),
        ot.directory("opt/thing", mode=0o700), ot.file("opt/thing/inside", "hidden soon"),
        ot.file("opt/plain", "will become a directory"),
        ot.file("home/user/file", "mine", uid=1000, gid=1000),
    ]
    middle = [
        ot.whiteout("etc/old.conf"),
        ot.opaque("var/cache/pkg"), ot.file("var/cache/pkg/c", "c"),
        ot.file("data/original", "second version"),
        ot.whiteout("keep/target"),
        ot.file("opt/thing", "a file hides the directory"),
        ot.file("opt/plain/child", "a directory hides the file"),
        ot.file("usr/bin/su", "setuid", mode=0o4755),
        ot.device("dev/null", "c", 1, 3), ot.device("dev/sda", "b", 8, 0, mode=0o660),
        ot.fifo("run/fifo"),
        ot.symlink("etc/evil", "/etc/shadow"), ot.symlink("up", "../../../../etc"),
        ot.file("bin/ping", "cap", mode=0o755,
                xattrs={"user.test": "value"}),
        ot.file(".wh.bin", "", mode=0o644),  # whites out nothing below it: bin is re-added
        ot.directory("bin"), ot.file("bin/extra", "x"),
    ]
    top = [
        ot.whiteout("etc/removed-later"),
        ot.hardlink("data/third", "data/original"),
        ot.file("var/cache/pkg/.wh.c", ""),  # same layer as nothing: hides c from middle
    ]
    return [(base, "gzip"), (middle, ""), (top, "zstd")]


def test_whiteouts_opaque_dirs_and_replacements(tmp_path: Path) -> None:
    tree = flatten(tmp_path, rich_layers())
    assert "etc/old.conf" not in tree and "etc/removed-later" not in tree
    assert "etc/passwd" in tree
    # Opaque: a and sub/ from below are gone; c came in the opaque layer, then was whited out.
    assert not [n for n in tree if n.startswith("var/cache/pkg/")]
    assert tree["var/cache/pkg"][0].isdir()
    # A file hides a directory (and everything in it), a directory hides a file.
    assert tree["opt/thing"][0].isreg() and tree["opt/thing"][1] == b"a file hides the directory"
    assert "opt/thing/inside" not in tree
    assert tree["opt/plain"][0].isdir()
    assert tree["opt/plain/child"][1] == b"a directory hides the file"
    # .wh.bin whited out the lower bin/ (busybox); bin/ came back with the same layer's entries.
    assert "bin/busybox" not in tree and "bin/extra" in tree and "bin/ping" in tree


def test_hardlinks_keep_their_bytes_when_the_target_goes(tmp_path: Path) -> None:
    tree = flatten(tmp_path, rich_layers())
    # data/link was linked to the first data/original, which a later layer replaced.
    assert tree["data/link"][1] == b"first version"
    assert tree["data/original"][1] == b"second version"
    third = tree["data/third"][0]
    assert third.islnk() and third.linkname == "data/original"
    # keep/target was whited out; the link keeps the bytes, as a file of its own now.
    assert "keep/target" not in tree and tree["keep/alias"][1] == b"kept bytes"


def test_modes_owners_devices_and_links_are_data(tmp_path: Path) -> None:
    tree = flatten(tmp_path, rich_layers())
    su = tree["usr/bin/su"][0]
    assert su.mode == 0o4755 and su.uid == 0
    null, sda = tree["dev/null"][0], tree["dev/sda"][0]
    assert null.ischr() and (null.devmajor, null.devminor) == (1, 3)
    assert sda.isblk() and (sda.devmajor, sda.devminor, sda.mode) == (8, 0, 0o660)
    assert tree["run/fifo"][0].isfifo()
    assert tree["etc/evil"][0].linkname == "/etc/shadow"
    assert tree["up"][0].linkname == "../../../../etc"
    assert (tree["home/user/file"][0].uid, tree["home/user/file"][0].gid) == (1000, 1000)
    assert tree["bin/ping"][0].pax_headers.get("SCHILY.xattr.user.test") == "value"
    assert tree["opt"][0].isdir() and tree["."][0].isdir()


def test_whiteouts_spare_the_same_layers_entries(tmp_path: Path) -> None:
    tree = flatten(tmp_path, [
        ([ot.file("a/x", "low"), ot.file("a/y", "low")], ""),
        ([ot.file("a/x", "new"), ot.whiteout("a/x"), ot.file("a/z", "new"), ot.opaque("a")], ""),
    ])
    assert tree["a/x"][1] == b"new" and tree["a/z"][1] == b"new" and "a/y" not in tree


def test_leading_slash_and_dot_segments_are_normalized(tmp_path: Path) -> None:
    tree = flatten(tmp_path, [([ot.file("/abs/file", "1"), ot.file("./rel/./x/../y", "2")], "")])
    assert tree["abs/file"][1] == b"1" and tree["rel/y"][1] == b"2"


@pytest.mark.parametrize(("entries", "why"), [
    ([ot.file("../escape", "x")], "escapes the image root"),
    ([ot.file("a/../../escape", "x")], "escapes the image root"),
    ([ot.file("ok", "x"), ot.hardlink("link", "../../etc/passwd")], "escapes the image root"),
    ([ot.hardlink("link", "missing")], "hardlink target 'missing' is missing"),
    ([ot.directory("d"), ot.hardlink("link", "d")], "is a directory"),
    ([ot.file("a" * 300, "x")], "longer than 255"),
])
def test_hostile_members_are_refused_naming_layer_and_member(
        tmp_path: Path, entries: list[ot.Entry], why: str) -> None:
    layers = write_layers(tmp_path, [([ot.file("fine", "x")], ""), (entries, "gzip")])
    with pytest.raises(UnsafeImage) as raised:
        ly.merge(layers)
    message = str(raised.value)
    assert message.startswith("layer 2: member ") and why in message and "\n" not in message


def test_nul_in_a_pax_path_is_refused(tmp_path: Path) -> None:
    entry = ot.file("innocent", "x")
    entry.info.pax_headers = {"path": "evil\x00name"}
    layers = write_layers(tmp_path, [([entry], "")])
    with pytest.raises(UnsafeImage, match="NUL in path"):
        ly.merge(layers)


def test_sparse_members_are_refused(tmp_path: Path) -> None:
    # A GNU sparse member claiming a terabyte.
    info = tarfile.TarInfo("huge")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 0
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[124:136] = b"%011o\0" % 0
    header[483:495] = b"%011o\0" % (1 << 40)  # realsize
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    tar = bytes(header) + bytes(1024)
    path = tmp_path / "sparse"
    path.write_bytes(tar)
    layer = ly.Layer(path, "", ot.digest_of(tar), "layer 1")
    with pytest.raises(UnsafeImage, match="layer 1: member 'huge': sparse"):
        ly.merge([layer])


def test_multi_frame_zstd_and_multi_member_gzip_layers(tmp_path: Path) -> None:
    import gzip

    import zstandard

    tar = ot.tar_of([ot.file(f"f{i}", str(i) * 1000) for i in range(50)])
    half = len(tar) // 2
    for compression, pack in (("zstd", zstandard.ZstdCompressor().compress),
                              ("gzip", gzip.compress)):
        path = tmp_path / compression
        path.write_bytes(pack(tar[:half]) + pack(tar[half:]))
        tree = ly.merge([ly.Layer(path, compression, ot.digest_of(tar), "layer 1")])
        assert len(tree.root.children) == 50


def test_diff_id_mismatch_is_refused(tmp_path: Path) -> None:
    (layer,) = write_layers(tmp_path, [([ot.file("a", "x")], "gzip")])
    wrong = ly.Layer(layer.path, "gzip", "sha256:" + "0" * 64, "layer 1")
    with pytest.raises(ImageError, match="layer 1: uncompressed content does not match"):
        ly.merge([wrong])


def test_limits_on_members_and_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layers = write_layers(tmp_path, [([ot.file(f"f{i}", "x") for i in range(20)], "")])
    monkeypatch.setattr(ly, "MAX_MEMBERS", 10)
    with pytest.raises(UnsafeImage, match="more than 10 entries"):
        ly.merge(layers)
    monkeypatch.setattr(ly, "MAX_MEMBERS", 1000)
    monkeypatch.setattr(ly, "MAX_UNCOMPRESSED", 4096)
    with pytest.raises(UnsafeImage, match="more than 4096 bytes"):
        ly.merge(layers)


def test_corrupt_compressed_layer_is_an_image_error(tmp_path: Path) -> None:
    (layer,) = write_layers(tmp_path, [([ot.file("a", "x" * 5000)], "gzip")])
    data = bytearray(layer.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="layer 1: "):
        ly.merge([layer])


@needs_squashfs
def test_squashfs_holds_the_flattened_tree(tmp_path: Path) -> None:
    layers = write_layers(tmp_path, rich_layers())
    image = tmp_path / "root.sqfs"
    entries = build_rootfs(layers, image, log=tmp_path / "tar2sqfs.log")
    listing = subprocess.run([str(ot.SQFS2TAR), "--no-skip", str(image)], check=True,
                             capture_output=True).stdout
    tree = ot.read_tar(listing)
    (tmp_path / "again").mkdir()
    expected = flatten(tmp_path / "again", rich_layers())
    assert set(tree) | {"."} == set(expected) and len(expected) == entries
    assert "etc/old.conf" not in tree and "var/cache/pkg/a" not in tree
    assert tree["usr/bin/su"][0].mode == 0o4755
    null = tree["dev/null"][0]
    assert null.ischr() and (null.devmajor, null.devminor) == (1, 3)
    assert tree["data/link"][1] == b"first version"
    assert tree["etc/evil"][0].linkname == "/etc/shadow"
    assert tree["home/user/file"][0].uid == 1000
    assert tree["keep/alias"][1] == b"kept bytes"
    assert tree["bin/ping"][0].pax_headers.get("SCHILY.xattr.user.test") == "value"
