from __future__ import annotations

import functools
import io
import json
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmrun.errors import ImageError, UnsafeImage
from vmrun.images.formats import (
    ImageFormat,
    ImageInfo,
    check_foreign_image,
    detect_format,
    inspect_image,
    parse_qcow2_header,
)

QEMU_IMG = shutil.which("qemu-img") or "/usr/bin/qemu-img"
GENISOIMAGE = shutil.which("genisoimage") or shutil.which("xorriso")
needs_qemu_img = pytest.mark.skipif(not Path(QEMU_IMG).exists(), reason="qemu-img missing")

GiB = 1 << 30


def qemu_img(*args: str | Path, cwd: Path | None = None) -> None:
    subprocess.run([QEMU_IMG, *map(str, args)], check=True, capture_output=True, cwd=cwd)


def qemu_info(path: Path, fmt: str) -> dict[str, Any]:
    out = subprocess.run(
        [QEMU_IMG, "info", "--output=json", "-U", "-f", fmt, str(path)],
        check=True, capture_output=True, text=True,
    ).stdout
    info: dict[str, Any] = json.loads(out)
    return info


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory of real images made by qemu-img, shared by the module's tests."""
    if not Path(QEMU_IMG).exists():
        pytest.skip("qemu-img missing")
    d = tmp_path_factory.mktemp("images")
    qemu_img("create", "-q", "-f", "qcow2", d / "v3.qcow2", "1G")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", d / "v2.qcow2", "3G")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", d / "small.qcow2", "100M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "v3.qcow2", "-F", "qcow2",
             d / "overlay.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "v2.qcow2", "-F", "qcow2",
             "-o", "compat=0.10", d / "overlay-v2.qcow2")
    # qemu-img creates a relative data file name in its working directory.
    qemu_img("create", "-q", "-f", "qcow2", "-o", "data_file=ext.data", "datafile.qcow2",
             "64M", cwd=d)
    qemu_img("create", "-q", "-f", "qcow2", d / "snaps.qcow2", "2G")
    qemu_img("snapshot", "-c", "first", d / "snaps.qcow2")
    qemu_img("resize", "-q", d / "snaps.qcow2", "4G")
    qemu_img("snapshot", "-c", "second snapshot", d / "snaps.qcow2")
    qemu_img("snapshot", "-c", "3rd", d / "snaps.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", d / "snaps-v2.qcow2", "1G")
    qemu_img("snapshot", "-c", "old", d / "snaps-v2.qcow2")
    qemu_img("create", "-q", "-f", "raw", d / "disk.raw", "5M")
    qemu_img("create", "-q", "-f", "vmdk", d / "disk.vmdk", "2G")
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=streamOptimized",
             d / "stream.vmdk", "1G")
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat",
             d / "flat.vmdk", "16M")
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse",
             d / "split.vmdk", "3G")
    qemu_img("create", "-q", "-f", "vdi", d / "disk.vdi", "1G")
    qemu_img("create", "-q", "-f", "vhdx", d / "disk.vhdx", "3G")
    return d


# --- real images against qemu-img info ------------------------------------------------------

QCOW2_CASES = [
    "v3.qcow2", "v2.qcow2", "small.qcow2", "overlay.qcow2", "overlay-v2.qcow2",
    "datafile.qcow2", "snaps.qcow2", "snaps-v2.qcow2",
]


@needs_qemu_img
@pytest.mark.parametrize("name", QCOW2_CASES)
def test_qcow2_matches_qemu_img(images: Path, name: str) -> None:
    path = images / name
    expected = qemu_info(path, "qcow2")
    info = inspect_image(path)
    assert detect_format(path) is ImageFormat.QCOW2
    assert info.format is ImageFormat.QCOW2
    assert info.virtual_size == expected["virtual-size"]
    assert info.file_size == path.stat().st_size
    q = info.qcow2
    assert q is not None
    assert q.cluster_size == expected["cluster-size"]
    assert q.backing_file == expected.get("backing-filename")
    assert q.backing_format == expected.get("backing-filename-format")
    specific = expected["format-specific"]["data"]
    assert {2: "0.10", 3: "1.1"}[q.version] == specific["compat"]
    assert q.data_file == specific.get("data-file")
    snapshots = expected.get("snapshots", [])
    assert q.nb_snapshots == len(snapshots) == len(q.snapshots)
    for ours, theirs in zip(q.snapshots, snapshots, strict=True):
        assert (ours.id, ours.name) == (theirs["id"], theirs["name"])
        assert ours.date_sec == theirs["date-sec"]
        assert ours.vm_state_size == theirs["vm-state-size"]
    json.dumps(info.to_json())


@needs_qemu_img
def test_snapshot_sizes_follow_resize(images: Path) -> None:
    q = inspect_image(images / "snaps.qcow2").qcow2
    assert q is not None
    assert [s.virtual_size for s in q.snapshots] == [2 * GiB, 4 * GiB, 4 * GiB]
    old = inspect_image(images / "snaps-v2.qcow2").qcow2
    assert old is not None and old.version == 2
    assert [s.name for s in old.snapshots] == ["old"]


@needs_qemu_img
@pytest.mark.parametrize("name", ["v3.qcow2", "v2.qcow2", "small.qcow2", "snaps.qcow2",
                                  "snaps-v2.qcow2"])
def test_plain_qcow2_passes_the_check(images: Path, name: str) -> None:
    info = check_foreign_image(images / name)
    assert info.format is ImageFormat.QCOW2


@needs_qemu_img
@pytest.mark.parametrize(
    ("name", "fmt", "qemu_fmt"),
    [("disk.raw", ImageFormat.RAW, "raw"), ("disk.vmdk", ImageFormat.VMDK, "vmdk"),
     ("stream.vmdk", ImageFormat.VMDK, "vmdk"), ("disk.vdi", ImageFormat.VDI, "vdi"),
     ("disk.vhdx", ImageFormat.VHDX, "vhdx")],
)
def test_other_formats_match_qemu_img(
    images: Path, name: str, fmt: ImageFormat, qemu_fmt: str
) -> None:
    path = images / name
    expected = qemu_info(path, qemu_fmt)
    assert detect_format(path) is fmt
    info = check_foreign_image(path)
    assert info.format is fmt
    assert expected["format"] == qemu_fmt
    assert info.virtual_size == expected["virtual-size"]
    assert info.qcow2 is None


@needs_qemu_img
def test_vmdk_descriptors_are_sized_and_refused(images: Path) -> None:
    for name, size in (("flat.vmdk", 16 << 20), ("split.vmdk", 3 * GiB)):
        path = images / name
        assert detect_format(path) is ImageFormat.VMDK
        assert inspect_image(path).virtual_size == size == qemu_info(path, "vmdk")["virtual-size"]
        with pytest.raises(UnsafeImage, match="extents"):
            check_foreign_image(path)


@pytest.mark.skipif(GENISOIMAGE is None, reason="neither genisoimage nor xorriso installed")
def test_iso_is_detected_and_sized(tmp_path: Path) -> None:
    assert GENISOIMAGE is not None
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "hello.txt").write_bytes(b"hello\n" * 50000)
    iso = tmp_path / "x.iso"
    args = ["-quiet", "-o", str(iso), "-V", "TEST", str(tmp_path / "tree")]
    if Path(GENISOIMAGE).name == "xorriso":
        args = ["-as", "mkisofs", *args]
    subprocess.run([GENISOIMAGE, *args], check=True, capture_output=True)
    assert detect_format(iso) is ImageFormat.ISO
    info = check_foreign_image(iso)
    assert info.format is ImageFormat.ISO
    assert info.virtual_size == iso.stat().st_size
    assert info.virtual_size % 2048 == 0 and info.virtual_size > 300000


def test_to_json_round_trips(tmp_path: Path) -> None:
    raw = tmp_path / "x.raw"
    raw.write_bytes(b"\0" * 4096)
    info = inspect_image(raw)
    assert info == ImageInfo(raw, ImageFormat.RAW, 4096, 4096)
    assert json.loads(json.dumps(info.to_json())) == {
        "path": str(raw), "format": "raw", "virtual_size": 4096, "file_size": 4096,
    }


def test_unreadable_is_image_error_not_unsafe(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read") as caught:
        check_foreign_image(tmp_path / "missing.qcow2")
    assert not isinstance(caught.value, UnsafeImage)


# --- the hostile corpus ---------------------------------------------------------------------


def patched(src: Path, dst: Path, *edits: tuple[int, bytes]) -> Path:
    data = bytearray(src.read_bytes())
    for offset, value in edits:
        data[offset:offset + len(value)] = value
    dst.write_bytes(bytes(data))
    return dst


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def with_backing(name: str) -> list[tuple[int, bytes]]:
    raw = name.encode()
    return [(8, u64(1024)), (16, u32(len(raw))), (1024, raw)]


HOSTILE: dict[str, tuple[list[tuple[int, bytes]], str]] = {
    "backing-etc-passwd": (with_backing("/etc/passwd"), "backing file"),
    "backing-json": (with_backing('json:{"file.filename":"/etc/passwd"}'), "backing file"),
    "backing-nbd": (with_backing("nbd://127.0.0.1:10809/x"), "backing file"),
    "backing-dotdot": (with_backing("../x"), "backing file"),
    "data-file-bit": ([(72, u64(1 << 2))], "data file"),
    "unknown-bit-40": ([(72, u64(1 << 40))], "unknown incompatible"),
    "corrupt-bit": ([(72, u64(1 << 1))], "corrupt"),
    "exabyte": ([(24, u64(1 << 60))], "virtual size"),
    "cluster-bits-30": ([(20, u32(30))], "cluster_bits"),
    "huge-l1": ([(36, u32(1 << 31))], "L1 table"),
    "oversized-l1": ([(36, u32(100000))], "L1 table"),
    "undersized-l1": ([(24, u64(64 * GiB))], "L1 table"),
    "snapshots-100k": ([(60, u32(100_000)), (64, u64(0x10000))], "snapshots"),
    "encrypted": ([(32, u32(1))], "encrypted"),
    "aes-v2": ([(4, u32(2)), (32, u32(1))], "encrypted"),
    "header-length-past-cluster": ([(100, u32(0x20000))], "header_length"),
    "extension-past-cluster": ([(112, u32(0x12345678) + u32(0x20000))], "extension"),
    "version-4": ([(4, u32(4))], "version"),
    "compression-unknown": ([(72, u64(1 << 3)), (104, b"\x07")], "compression"),
    "refcount-table-huge": ([(56, u32(1 << 20))], "refcount table"),
    "unaligned-l1": ([(40, u64(0x30001))], "aligned"),
    "snapshot-extra-huge": (
        [(60, u32(1)), (64, u64(0x10000)), (0x10000 + 36, u32(1 << 20))], "extra data"),
}


@pytest.fixture(scope="module")
def base_v3(images: Path) -> Path:
    return images / "v3.qcow2"


@needs_qemu_img
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_qcow2_is_refused(base_v3: Path, tmp_path: Path, case: str) -> None:
    edits, keyword = HOSTILE[case]
    path = patched(base_v3, tmp_path / f"{case}.qcow2", *edits)
    with pytest.raises(UnsafeImage) as caught:
        check_foreign_image(path, allow_backing=True)
    assert keyword.lower() in str(caught.value).lower(), str(caught.value)


@needs_qemu_img
def test_backing_names_and_allow_backing(base_v3: Path, tmp_path: Path) -> None:
    plain = patched(base_v3, tmp_path / "plain.qcow2", *with_backing("base.qcow2"))
    with pytest.raises(UnsafeImage, match="backing file 'base.qcow2'"):
        check_foreign_image(plain)
    q = check_foreign_image(plain, allow_backing=True).qcow2
    assert q is not None and q.backing_file == "base.qcow2"
    reasons = {
        "/etc/passwd": "absolute", 'json:{"file.filename":"/etc/passwd"}': "json:",
        "nbd://127.0.0.1/x": "protocol", "http://example.com/x": "protocol",
        "file:base": "protocol", "nbd:unix:/tmp/s": "protocol", "../x": "'..'",
        "sub/../base": "'..'", "sub/base": "plain name", "": "plain name",
    }
    for name, reason in reasons.items():
        path = patched(base_v3, tmp_path / "b.qcow2", *with_backing(name))
        with pytest.raises(UnsafeImage, match="backing") as caught:
            check_foreign_image(path, allow_backing=True)
        assert reason in str(caught.value), (name, str(caught.value))


@needs_qemu_img
def test_real_overlays_and_data_file(images: Path) -> None:
    with pytest.raises(UnsafeImage, match="backing file 'v3.qcow2'"):
        check_foreign_image(images / "overlay.qcow2")
    info = check_foreign_image(images / "overlay.qcow2", allow_backing=True)
    assert info.qcow2 is not None and info.qcow2.backing_format == "qcow2"
    check_foreign_image(images / "overlay-v2.qcow2", allow_backing=True)
    with pytest.raises(UnsafeImage, match="external data file"):
        check_foreign_image(images / "datafile.qcow2", allow_backing=True)


@needs_qemu_img
def test_data_file_extension_without_the_bit(images: Path, tmp_path: Path) -> None:
    # Clear the bit but keep the extension: still refused.
    src = images / "datafile.qcow2"
    incompat = struct.unpack(">Q", src.read_bytes()[72:80])[0]
    path = patched(src, tmp_path / "d.qcow2", (72, u64(incompat & ~4)))
    with pytest.raises(UnsafeImage, match="data file"):
        check_foreign_image(path)


@needs_qemu_img
@pytest.mark.parametrize("length", [0, 1, 3, 4, 20, 50, 71, 72, 100, 103, 111, 300])
def test_truncated_qcow2_is_refused(base_v3: Path, tmp_path: Path, length: int) -> None:
    path = tmp_path / "t.qcow2"
    path.write_bytes(base_v3.read_bytes()[:length])
    with pytest.raises(ImageError, match="truncated"):
        check_foreign_image(path)
    if length >= 4:
        with pytest.raises(ImageError, match="truncated qcow2 header"):
            parse_qcow2_header(path.read_bytes())


@needs_qemu_img
def test_extension_past_end_of_file(base_v3: Path, tmp_path: Path) -> None:
    data = bytearray(base_v3.read_bytes()[:1024])
    data[112:120] = u32(0x12345678) + u32(2000)
    path = tmp_path / "e.qcow2"
    path.write_bytes(bytes(data))
    with pytest.raises(UnsafeImage, match="past the end of the file"):
        check_foreign_image(path)


@needs_qemu_img
def test_truncated_snapshot_table(images: Path, tmp_path: Path) -> None:
    src = images / "snaps.qcow2"
    offset = struct.unpack(">Q", src.read_bytes()[64:72])[0]
    path = tmp_path / "s.qcow2"
    path.write_bytes(src.read_bytes()[:offset + 60])
    with pytest.raises(UnsafeImage, match="snapshot table"):
        check_foreign_image(path)


def test_vmdk_descriptor_with_host_extent(tmp_path: Path) -> None:
    desc = tmp_path / "evil.vmdk"
    desc.write_text(
        '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n'
        'createType="monolithicFlat"\nRW 2048 FLAT "/etc/passwd" 0\n'
    )
    assert detect_format(desc) is ImageFormat.VMDK
    assert inspect_image(desc).virtual_size == 2048 * 512
    with pytest.raises(UnsafeImage, match="extents in other files.*/etc/passwd"):
        check_foreign_image(desc)


@needs_qemu_img
def test_vmdk_sparse_with_parent_or_zero_capacity(images: Path, tmp_path: Path) -> None:
    src = images / "disk.vmdk"
    data = src.read_bytes()
    desc_at = data.index(b"# Disk DescriptorFile")
    hint = b'parentFileNameHint="/etc/passwd"\n'
    path = patched(src, tmp_path / "p.vmdk", (desc_at + 22, hint))
    with pytest.raises(UnsafeImage, match="backing file '/etc/passwd'"):
        check_foreign_image(path, allow_backing=True)
    zero = patched(src, tmp_path / "z.vmdk", (12, b"\0" * 8))
    with pytest.raises(UnsafeImage, match="capacity"):
        check_foreign_image(zero)
    huge = patched(src, tmp_path / "h.vmdk", (12, struct.pack("<Q", 1 << 50)))
    with pytest.raises(UnsafeImage, match="virtual size"):
        check_foreign_image(huge)


@needs_qemu_img
def test_vdi_and_vhdx_size_sanity(images: Path, tmp_path: Path) -> None:
    vdi = patched(images / "disk.vdi", tmp_path / "x.vdi", (0x170, struct.pack("<Q", 1 << 60)))
    with pytest.raises(UnsafeImage, match="virtual size"):
        check_foreign_image(vdi)
    short = tmp_path / "short.vhdx"
    short.write_bytes((images / "disk.vhdx").read_bytes()[:0x30000])
    with pytest.raises(UnsafeImage, match="region table"):
        check_foreign_image(short)


# --- fuzzing --------------------------------------------------------------------------------

READ_LIMIT = 20 << 20


class CountingFile(io.RawIOBase):
    """A read-only file that adds up what is read from it."""

    def __init__(self, path: Path, counter: list[int]) -> None:
        self._f = open(path, "rb")  # closed by close() below
        self._counter = counter

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buffer: Any) -> int:
        n = self._f.readinto(buffer)
        self._counter[0] += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def counted(check: Callable[[Path], object], path: Path) -> int:
    """Run `check` on `path` and return how many bytes it read from the file."""
    counter = [0]
    real_open = Path.open

    def fake_open(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if self == path and mode == "rb":
            return io.BufferedReader(CountingFile(self, counter))
        return real_open(self, mode, *args, **kwargs)

    with mock.patch.object(Path, "open", fake_open):
        try:
            check(path)
        except ImageError:
            pass
    return counter[0]


@pytest.fixture(scope="module")
def fuzz_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vmrun-fuzz-") as d:
        yield Path(d)


FUZZ = settings(
    max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(st.binary(max_size=4096))
def test_parse_arbitrary_bytes(data: bytes) -> None:
    for blob in (data, b"QFI\xfb" + data):
        try:
            parse_qcow2_header(blob)
            parse_qcow2_header(blob, file_size=len(blob), snapshot_table=data)
        except ImageError:
            pass


@st.composite
def qcow2_headers(draw: st.DrawFn) -> bytes:
    """Headers with plausible and implausible fields, so parsing gets past the magic."""
    version = draw(st.sampled_from([2, 3, 3, 1, 4]))
    cluster_bits = draw(st.one_of(st.integers(9, 21), st.integers(0, 2**32 - 1)))
    cluster = 1 << min(max(cluster_bits, 9), 12)
    head = b"QFI\xfb" + struct.pack(
        ">IQIIQIIQQIIQ", version,
        draw(st.sampled_from([0, 0, 200, 512, cluster, 2**40])),
        draw(st.integers(0, 2000)), cluster_bits,
        draw(st.one_of(st.integers(0, 1 << 40), st.integers(0, 2**64 - 1))),
        draw(st.integers(0, 2)), draw(st.integers(0, 2**32 - 1)),
        draw(st.sampled_from([0, cluster, 3 * cluster, 2**63])),
        draw(st.sampled_from([cluster, 2 * cluster])), draw(st.integers(0, 4)),
        draw(st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1))),
        draw(st.sampled_from([0, cluster, 4 * cluster, 2**64 - cluster])),
    )
    head += struct.pack(
        ">QQQII", draw(st.integers(0, 2**64 - 1)), 0, 0, draw(st.integers(0, 8)),
        draw(st.sampled_from([104, 112, 112, 113, 4096, 2**31])),
    )
    return head + draw(st.binary(max_size=2 * cluster))


@FUZZ
@given(qcow2_headers())
def test_parse_structured_headers(data: bytes) -> None:
    try:
        parse_qcow2_header(data)
        parse_qcow2_header(data, file_size=len(data))
    except ImageError:
        pass


@needs_qemu_img
@FUZZ
@given(
    st.sampled_from(["v3.qcow2", "v2.qcow2", "snaps.qcow2", "overlay.qcow2", "disk.vmdk",
                     "disk.vdi", "disk.vhdx"]),
    st.lists(st.tuples(st.integers(0, 1023), st.binary(min_size=1, max_size=8)), max_size=6),
    st.sampled_from([None, 64, 512, 4096, 0x30000 + 64]),
)
def test_mutated_images_are_bounded(
    images: Path, fuzz_dir: Path, name: str, edits: list[tuple[int, bytes]],
    cut: int | None,
) -> None:
    data = bytearray((images / name).read_bytes())
    for offset, value in edits:
        data[offset:offset + len(value)] = value
    if cut is not None:
        del data[cut:]
    path = fuzz_dir / f"m-{name}"
    path.write_bytes(bytes(data))
    start = time.monotonic()
    for allow in (False, True):
        read = counted(functools.partial(check_foreign_image, allow_backing=allow), path)
        assert read <= READ_LIMIT
        counted(inspect_image, path)
    assert time.monotonic() - start < 2


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from([0, 0x40, 0x8001]))
def test_check_arbitrary_files(fuzz_dir: Path, data: bytes, at: int) -> None:
    # Plant magics so every format's reader sees garbage after its magic.
    blob = bytearray(data.ljust(at + 64, b"\0"))
    magic = {0: b"QFI\xfb", 0x40: struct.pack("<I", 0xBEDA107F), 0x8001: b"CD001"}[at]
    blob[at:at + len(magic)] = magic
    path = fuzz_dir / "arbitrary.img"
    for content in (data, bytes(blob), b"KDMV" + data, b"vhdxfile" + data):
        path.write_bytes(content)
        assert counted(check_foreign_image, path) <= READ_LIMIT


@needs_qemu_img
def test_huge_sparse_file_reads_little(base_v3: Path, tmp_path: Path) -> None:
    header = base_v3.read_bytes()
    plain, snaps = tmp_path / "sparse.qcow2", tmp_path / "sparse-snaps.qcow2"
    # The second claims 65536 snapshots in a table of zeros far out in a 1 TiB sparse file.
    for path, edits in ((plain, []), (snaps, [(60, u32(65536)), (64, u64(1 << 39))])):
        with path.open("wb") as f:
            f.write(header)
            for offset, value in edits:
                f.seek(offset)
                f.write(value)
            f.truncate(1 << 40)
    start = time.monotonic()
    assert counted(check_foreign_image, plain) < (1 << 20)
    with pytest.raises(UnsafeImage, match="snapshot"):
        check_foreign_image(snaps)
    assert counted(check_foreign_image, snaps) < READ_LIMIT
    assert time.monotonic() - start < 5
