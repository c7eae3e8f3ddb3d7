"""Disk operations end to end with the real qemu-img on small images (no VM)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from vmrun.cli.disk import cmd_disk
from vmrun.errors import ImageError, UsageError
from vmrun.images import disk, qemu_img

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MiB = 1 << 20
SIZE = 4 * MiB


def pattern(seed: int, size: int = SIZE) -> bytes:
    """Data that differs per seed and per 64 KiB block, and compresses poorly."""
    return b"".join(
        (seed * 1000003 + i).to_bytes(8, "little") * 8192 for i in range(size // (64 * 1024))
    )


def write_raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def qcow2_from(tmp: Path, name: str, data: bytes) -> Path:
    raw = write_raw(tmp / f"{name}.raw", data)
    out = tmp / f"{name}.qcow2"
    disk.convert(raw, out, src_format="raw", dst_format="qcow2")
    raw.unlink()
    return out


def content(path: Path, fmt: str) -> bytes:
    out = path.with_name(path.name + f".{time.monotonic_ns()}.out.raw")
    disk.convert(path, out, src_format=fmt, dst_format="raw")
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def qemu_io_write(path: Path, offset: int, length: int, byte: int, fmt: str = "qcow2") -> None:
    """Write into an image the way a guest would (qemu-io ships with qemu-img)."""
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", f"write -P {byte} {offset} {length}", str(path)],
        check=True, capture_output=True,
    )


def patched(data: bytes, offset: int, length: int, byte: int) -> bytes:
    return data[:offset] + bytes([byte]) * length + data[offset + length:]


def image_info(path: Path, fmt: str = "qcow2") -> dict[str, Any]:
    result: dict[str, Any] = qemu_img.info(path, fmt)
    return result


# Sizes and formats


@pytest.mark.parametrize(("text", "expected"), [
    ("10G", 10 << 30), ("512M", 512 << 20), ("1T", 1 << 40), ("4096", 4096), (4096, 4096),
    ("64k", 64 << 10), ("2GiB", 2 << 30),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert disk.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "ten", "10X", "-1G", "0", "1.5G", "G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        disk.parse_size(text)


def test_unknown_format_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown disk format"):
        disk.create(tmp_path / "x", "1M", "qed")


@pytest.mark.parametrize("fmt", [f.value for f in disk.Format])
def test_create(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"new.{fmt}"
    disk.create(path, "4M", fmt)
    assert image_info(path, fmt)["virtual-size"] == SIZE
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    with pytest.raises(UsageError, match="already exists"):
        disk.create(path, "4M", fmt)


# Overlays and chains


def test_overlay_names_backing_format(tmp_path: Path) -> None:
    base = write_raw(tmp_path / "base.img", pattern(1))
    top = tmp_path / "top.qcow2"
    disk.overlay(base, top, base_format="raw")
    data = image_info(top)
    assert data["backing-filename-format"] == "raw"
    assert data["backing-filename"] == str(base.resolve())
    assert content(top, "qcow2") == pattern(1)
    with pytest.raises(UsageError, match="already exists"):
        disk.overlay(base, top, base_format="raw")
    with pytest.raises(ImageError, match="does not exist"):
        disk.overlay(tmp_path / "nope", tmp_path / "other.qcow2", base_format="raw")


def make_chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    base = write_raw(tmp_path / "base.raw", pattern(1))
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    disk.overlay(base, mid, base_format="raw")
    disk.overlay(mid, top, base_format="qcow2")
    return base, mid, top


def test_chain_lists_layers_top_down(tmp_path: Path) -> None:
    base, mid, top = make_chain(tmp_path)
    layers = disk.chain(top)
    assert [(layer.path, layer.format) for layer in layers] == [
        (top, "qcow2"), (mid, "qcow2"), (base, "raw")]
    assert [layer.backing for layer in layers] == [str(mid), str(base), None]
    assert all(layer.virtual_size == SIZE for layer in layers)
    assert layers[2].actual_size > 0


def test_chain_resolves_relative_backing_against_overlay_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    write_raw(sub / "base.raw", pattern(1))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                    "top.qcow2"], cwd=sub, check=True)
    monkeypatch.chdir(tmp_path)
    layers = disk.chain(Path("sub/top.qcow2"))
    assert layers[1].path == Path("sub/base.raw")
    assert layers[0].backing == "base.raw"


def test_missing_backing_file_names_both_paths(tmp_path: Path) -> None:
    _, mid, top = make_chain(tmp_path)
    mid.unlink()
    with pytest.raises(ImageError) as caught:
        disk.chain(top)
    assert str(mid) in str(caught.value) and str(top) in str(caught.value)
    with pytest.raises(ImageError, match="mid.qcow2.*top.qcow2"):
        disk.commit(top)


def test_protocol_backing_name_refused(tmp_path: Path) -> None:
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "nbd:localhost:10809",
                    "-F", "raw", str(top), "4M"], check=True)
    with pytest.raises(ImageError, match="protocol"):
        disk.chain(top)


def test_backing_without_recorded_format_refused_for_writes(tmp_path: Path) -> None:
    base = qcow2_from(tmp_path, "base", pattern(1))
    top = tmp_path / "top.qcow2"
    disk.overlay(base, top, base_format="qcow2")
    # What an old qemu-img leaves (7.2 refuses to write one): a backing name without its
    # format. Renaming the backing-format header extension makes qemu skip it as unknown.
    header = bytearray(top.read_bytes()[:4096])
    at = header.index(bytes.fromhex("e2792aca"))
    header[at:at + 4] = bytes.fromhex("0badf00d")
    with open(top, "r+b") as file:
        file.write(header)
    assert "backing-filename-format" not in image_info(top)
    assert [layer.format for layer in disk.chain(top)] == ["qcow2", "qcow2"]  # listing works
    with pytest.raises(ImageError, match="does not record the format"):
        disk.commit(top)


# Commit, rebase, flatten


def test_commit_moves_data_down(tmp_path: Path) -> None:
    base = qcow2_from(tmp_path, "base", pattern(1))
    top = tmp_path / "top.qcow2"
    disk.overlay(base, top, base_format="qcow2")
    qemu_io_write(top, MiB, 64 * 1024, 0x42)
    assert content(base, "qcow2") == pattern(1)
    seen: list[float] = []
    disk.commit(top, progress=seen.append)
    assert content(base, "qcow2") == patched(pattern(1), MiB, 64 * 1024, 0x42)
    assert seen and seen[-1] == 100.0
    with pytest.raises(UsageError, match="no backing file"):
        disk.commit(base)


def test_rebase_safe_keeps_content(tmp_path: Path) -> None:
    old = qcow2_from(tmp_path, "old", pattern(1))
    new = qcow2_from(tmp_path, "new", pattern(2))
    top = tmp_path / "top.qcow2"
    disk.overlay(old, top, base_format="qcow2")
    qemu_io_write(top, 0, 64 * 1024, 0x42)
    expected = patched(pattern(1), 0, 64 * 1024, 0x42)
    disk.rebase(top, new, base_format="qcow2")
    assert image_info(top)["backing-filename"] == str(new)
    assert content(top, "qcow2") == expected


def test_rebase_unsafe_only_renames(tmp_path: Path) -> None:
    old = qcow2_from(tmp_path, "old", pattern(1))
    new = qcow2_from(tmp_path, "new", pattern(2))
    top = tmp_path / "top.qcow2"
    disk.overlay(old, top, base_format="qcow2")
    qemu_io_write(top, 0, 64 * 1024, 0x42)
    disk.rebase(top, new, base_format="qcow2", unsafe=True)
    data = image_info(top)
    assert (data["backing-filename"], data["backing-filename-format"]) == (str(new), "qcow2")
    assert content(top, "qcow2") == patched(pattern(2), 0, 64 * 1024, 0x42)


def test_rebase_standalone(tmp_path: Path) -> None:
    base = qcow2_from(tmp_path, "base", pattern(1))
    top = tmp_path / "top.qcow2"
    disk.overlay(base, top, base_format="qcow2")
    qemu_io_write(top, 0, 64 * 1024, 0x42)
    disk.rebase(top, None, base_format=None)
    assert "backing-filename" not in image_info(top)
    base.unlink()
    assert content(top, "qcow2") == patched(pattern(1), 0, 64 * 1024, 0x42)
    with pytest.raises(UsageError):
        disk.rebase(top, None, base_format=None, unsafe=True)


def test_flatten_gives_standalone_image(tmp_path: Path) -> None:
    base, mid, top = make_chain(tmp_path)
    qemu_io_write(mid, 0, 64 * 1024, 0x11)
    qemu_io_write(top, 2 * MiB, 64 * 1024, 0x22)
    expected = patched(patched(pattern(1), 0, 64 * 1024, 0x11), 2 * MiB, 64 * 1024, 0x22)
    flat = tmp_path / "flat.qcow2"
    with pytest.raises(ImageError, match="format was guessed"):
        disk.flatten(top, flat)  # the header decided: no backing file is read
    assert not flat.exists()
    disk.flatten(top, flat, follow_backing=True)
    assert "backing-filename" not in image_info(flat)
    base.unlink()
    mid.unlink()
    assert content(flat, "qcow2") == expected


# Snapshots


def test_snapshot_roundtrip(tmp_path: Path) -> None:
    img = qcow2_from(tmp_path, "img", pattern(1))
    assert disk.snapshot_list(img) == []
    disk.snapshot_create(img, "clean")
    qemu_io_write(img, 0, 64 * 1024, 0x42)
    assert content(img, "qcow2") != pattern(1)
    [snap] = disk.snapshot_list(img)
    assert (snap.id, snap.name) == ("1", "clean")
    assert abs(snap.date.timestamp() - time.time()) < 600
    assert snap.vm_state_size == 0
    disk.snapshot_apply(img, "clean")
    assert content(img, "qcow2") == pattern(1)
    with pytest.raises(UsageError, match="already has"):
        disk.snapshot_create(img, "clean")
    with pytest.raises(UsageError, match="bad snapshot name"):
        disk.snapshot_create(img, "2")
    with pytest.raises(ImageError, match="no snapshot named"):
        disk.snapshot_apply(img, "other")
    disk.snapshot_delete(img, "clean")
    assert disk.snapshot_list(img) == []


def test_cli_snapshot_list_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = qcow2_from(tmp_path, "img", pattern(1))
    assert cmd_disk(["snapshot", "list", str(img), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    disk.snapshot_create(img, "clean")
    disk.snapshot_create(img, "later")
    assert cmd_disk(["snapshot", "list", str(img), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(s["id"], s["name"], s["vm_state_size"]) for s in listed] == [
        ("1", "clean", 0), ("2", "later", 0)]
    when = datetime.fromisoformat(listed[0]["date"])
    assert when.tzinfo is not None and abs(when.timestamp() - time.time()) < 600
    assert cmd_disk(["snapshot", "list", str(img)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["ID", "NAME"] and table[2].split()[:2] == ["2", "later"]
    with pytest.raises(UsageError, match="--json goes with snapshot list"):
        cmd_disk(["snapshot", "delete", str(img), "clean", "--json"])


def test_snapshot_on_raw_file_fails_without_probing(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "disk.raw", pattern(1))
    with pytest.raises(ImageError, match="qcow2"):
        disk.snapshot_create(raw, "s")


def test_snapshot_path_with_comma(tmp_path: Path) -> None:
    img = qcow2_from(tmp_path, "a,b", pattern(1))
    disk.snapshot_create(img, "s")
    assert [s.name for s in disk.snapshot_list(img)] == ["s"]


# Convert, compress, compact, resize


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vdi", "vhdx", "raw"])
def test_convert_roundtrip(tmp_path: Path, fmt: str) -> None:
    raw = write_raw(tmp_path / "src.raw", pattern(3))
    mid = tmp_path / f"mid.{fmt}"
    back = tmp_path / "back.raw"
    seen: list[float] = []
    disk.convert(raw, mid, src_format="raw", dst_format=fmt, progress=seen.append)
    assert image_info(mid, fmt)["format"] == fmt
    disk.convert(mid, back, src_format=fmt, dst_format="raw")
    assert back.read_bytes() == pattern(3)
    assert seen[-1] == 100.0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src.raw", mid.name, "back.raw"])


def test_convert_refuses_existing_destination_and_leaves_nothing_on_failure(
    tmp_path: Path,
) -> None:
    raw = write_raw(tmp_path / "src.raw", pattern(3))
    with pytest.raises(UsageError, match="already exists"):
        disk.convert(raw, raw, src_format="raw", dst_format="qcow2")
    garbage = write_raw(tmp_path / "garbage.qcow2", b"QFI\xfb" + b"\xff" * 100)
    with pytest.raises(ImageError):
        disk.convert(garbage, tmp_path / "out.raw", src_format="qcow2", dst_format="raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.qcow2", "src.raw"]


def test_compression_makes_compressible_image_smaller(tmp_path: Path) -> None:
    raw = write_raw(tmp_path / "text.raw", (b"vmrun compresses well. " * SIZE)[:SIZE])
    plain, packed = tmp_path / "plain.qcow2", tmp_path / "packed.qcow2"
    disk.convert(raw, plain, src_format="raw", dst_format="qcow2")
    disk.convert(raw, packed, src_format="raw", dst_format="qcow2", compress=True)
    assert packed.stat().st_size * 4 < plain.stat().st_size
    assert content(packed, "qcow2") == raw.read_bytes()
    with pytest.raises(UsageError, match="qcow2"):
        disk.convert(raw, tmp_path / "x.vmdk", src_format="raw", dst_format="vmdk", compress=True)


def test_compact_drops_zeroed_clusters(tmp_path: Path) -> None:
    img = qcow2_from(tmp_path, "img", pattern(4))
    os.chmod(img, 0o640)
    qemu_io_write(img, 0, 3 * MiB, 0)  # zeros written as data, still allocated
    before = image_info(img)["actual-size"]
    disk.compact(img)
    after = image_info(img)["actual-size"]
    assert after < before - 2 * MiB
    assert content(img, "qcow2") == patched(pattern(4), 0, 3 * MiB, 0)
    assert img.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.qcow2"]


def test_compact_keeps_backing_file(tmp_path: Path) -> None:
    base = qcow2_from(tmp_path, "base", pattern(1))
    top = tmp_path / "top.qcow2"
    disk.overlay(base, top, base_format="qcow2")
    qemu_io_write(top, 0, MiB, 0x42)
    qemu_io_write(top, MiB, MiB, 0)  # zeros over base data must stay zeros
    expected = patched(patched(pattern(1), 0, MiB, 0x42), MiB, MiB, 0)
    out = tmp_path / "out" / "compact.qcow2"
    out.parent.mkdir()
    disk.compact(top, out)
    data = image_info(out)
    assert (data["backing-filename"], data["backing-filename-format"]) == (str(base), "qcow2")
    assert content(out, "qcow2") == expected
    assert data["actual-size"] < 2 * MiB


def test_compact_refuses_image_with_snapshots(tmp_path: Path) -> None:
    img = qcow2_from(tmp_path, "img", pattern(4))
    disk.snapshot_create(img, "keep")
    with pytest.raises(UsageError, match="snapshots"):
        disk.compact(img)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_resize(tmp_path: Path, fmt: str) -> None:
    img = tmp_path / f"img.{fmt}"
    disk.create(img, "4M", fmt)
    disk.resize(img, "8M", fmt=fmt)
    assert image_info(img, fmt)["virtual-size"] == 8 * MiB
    with pytest.raises(UsageError, match="would shrink") as caught:
        disk.resize(img, "2M", fmt=fmt)
    assert "--shrink" in (caught.value.hint or "")
    assert image_info(img, fmt)["virtual-size"] == 8 * MiB
    disk.resize(img, "2M", fmt=fmt, shrink=True)
    assert image_info(img, fmt)["virtual-size"] == 2 * MiB


# Sparse copy


def test_sparse_copy_keeps_holes(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    with open(src, "wb") as file:
        file.truncate(8 * MiB)
        file.seek(MiB)
        file.write(b"\x01" * 64 * 1024)
        file.seek(6 * MiB)
        file.write(b"\0" * MiB)  # allocated zeros: become a hole in the copy
        file.write(b"\x02" * 4096)
    dst = tmp_path / "dst.raw"
    disk.sparse_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == 8 * MiB
    assert dst.stat().st_blocks * 512 <= 256 * 1024
    assert dst.stat().st_blocks < src.stat().st_blocks
    with pytest.raises(UsageError, match="already exists"):
        disk.sparse_copy(src, dst)


def test_sparse_copy_without_seek_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_raw(tmp_path / "src.raw", b"\0" * (2 * MiB) + b"\x03" * 4096 + b"\0" * 4096)
    real_lseek = os.lseek

    def no_seek_data(fd: int, pos: int, how: int) -> int:
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(22, "Invalid argument")
        return real_lseek(fd, pos, how)

    monkeypatch.setattr(os, "lseek", no_seek_data)
    dst = tmp_path / "dst.raw"
    disk.sparse_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_blocks * 512 <= 128 * 1024


# check_overlay


def written_overlay(tmp_path: Path) -> Path:
    base = qcow2_from(tmp_path, "base", pattern(1))
    top = tmp_path / "top.qcow2"
    disk.overlay(base, top, base_format="qcow2")
    qemu_io_write(top, 0, 3 * MiB, 0x42)
    return top


def test_check_overlay_accepts_intact_overlay(tmp_path: Path) -> None:
    disk.check_overlay(written_overlay(tmp_path))


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_check_overlay_detects_truncation(tmp_path: Path, keep: float) -> None:
    top = written_overlay(tmp_path)
    os.truncate(top, int(top.stat().st_size * keep))
    with pytest.raises(ImageError, match="truncated|corrupt"):
        disk.check_overlay(top)


@pytest.mark.parametrize("data", [b"", b"QFI\xfb\0\0\0\3", os.urandom(4096),
                                  b"QFI\xfb" + os.urandom(4092)])
def test_check_overlay_detects_garbage(tmp_path: Path, data: bytes) -> None:
    bad = write_raw(tmp_path / "bad.qcow2", data)
    with pytest.raises(ImageError, match="overlay .*bad.qcow2"):
        disk.check_overlay(bad)


# run_qemu_img itself


def fake_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    fake = tmp_path / "qemu-img"
    fake.write_text("#!/bin/sh\n" + script)
    fake.chmod(0o755)
    monkeypatch.setattr(qemu_img, "qemu_img_path", lambda: str(fake))


def limits(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines()[1:]:
        if line.startswith("Max "):
            rows[line[:26].strip()] = line[26:].split()[0]
    return rows


def test_untrusted_call_runs_with_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_qemu_img(tmp_path, monkeypatch, 'cat /proc/self/limits; echo "arenas=$MALLOC_ARENA_MAX"')
    result = qemu_img.run_qemu_img(["--version"])
    bounded = limits(result.stdout.split("arenas=")[0])
    assert bounded["Max address space"] == str(1 << 30)
    assert bounded["Max cpu time"] == "30"
    assert bounded["Max core file size"] == "0"
    assert "arenas=2" in result.stdout
    trusted = limits(qemu_img.run_qemu_img(["--version"], untrusted=False).stdout)
    assert trusted["Max core file size"] == "0"
    assert trusted["Max address space"] == "unlimited"


def test_real_qemu_img_works_within_limits(tmp_path: Path) -> None:
    big = write_raw(tmp_path / "big.raw", pattern(5, 32 * MiB))
    out = tmp_path / "out.vhdx"
    # Data-moving conversion, bounded: the MALLOC_ARENA_MAX setting keeps it under 1 GiB.
    for _ in range(3):
        qemu_img.run_qemu_img(["convert", "-f", "raw", "-O", "vhdx", str(big), str(out)])
        out.unlink()


def test_failure_names_subcommand_and_last_stderr_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_qemu_img(tmp_path, monkeypatch,
                  'echo "noise" >&2; echo "qemu-img: Could not open x: boom" >&2; exit 1')
    with pytest.raises(ImageError) as caught:
        qemu_img.run_qemu_img(["info", "-f", "qcow2", "x"])
    assert str(caught.value) == "qemu-img info failed (exit 1): Could not open x: boom"


def test_cpu_limit_kill_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_qemu_img(tmp_path, monkeypatch, "kill -XCPU $$")
    with pytest.raises(ImageError, match="info exceeded its CPU limit"):
        qemu_img.run_qemu_img(["info"])


def test_timeout_kills_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_qemu_img(tmp_path, monkeypatch, "exec sleep 30")
    start = time.monotonic()
    with pytest.raises(ImageError, match="timed out"):
        qemu_img.run_qemu_img(["check"], timeout=0.5)
    assert time.monotonic() - start < 5


def test_progress_is_parsed_and_p_follows_subcommand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_qemu_img(tmp_path, monkeypatch,
                  'echo "$*" >&2; printf "    (0.00/100%%)\\r"; sleep 0.1; '
                  'printf "    (42.50/100%%)\\r    (100.00/100%%)\\r\\n"')
    seen: list[float] = []
    result = qemu_img.run_qemu_img(["convert", "-f", "raw", "a", "b"], progress=seen.append)
    assert seen == [0.0, 42.5, 100.0]
    assert result.stderr.strip() == "convert -p -f raw a b"


def test_missing_qemu_img_has_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ImageError) as caught:
        qemu_img.qemu_img_path()
    assert caught.value.hint == "apt-get install qemu-utils"


def test_every_call_names_its_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    real = qemu_img.run_qemu_img

    def record(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(list(args))
        return real(args, **kwargs)

    monkeypatch.setattr(qemu_img, "run_qemu_img", record)
    raw = write_raw(tmp_path / "a.raw", pattern(1))
    disk.create(tmp_path / "new.qcow2", "1M")
    base = tmp_path / "base.qcow2"
    disk.convert(raw, base, src_format="raw", dst_format="qcow2", compress=True)
    other = tmp_path / "other.qcow2"
    disk.flatten(base, other)
    top = tmp_path / "top.qcow2"
    disk.overlay(base, top, base_format="qcow2")
    disk.chain(top)
    disk.rebase(top, other, base_format="qcow2")
    disk.rebase(top, base, base_format="qcow2", unsafe=True)
    disk.commit(top)
    disk.compact(top)
    disk.rebase(top, None, base_format=None)
    disk.resize(top, "8M")
    disk.check_overlay(top)
    disk.snapshot_create(top, "s")
    disk.snapshot_list(top)
    disk.snapshot_apply(top, "s")
    disk.snapshot_delete(top, "s")
    subcommands = {args[0] for args in calls}
    assert subcommands == {"create", "convert", "info", "rebase", "commit", "resize", "check",
                           "snapshot"}
    for args in calls:
        if args[0] == "snapshot":
            spec = json.loads(args[-1].removeprefix("json:"))
            assert (spec["driver"], spec["backing"]) == ("qcow2", None), args
            continue
        assert "-f" in args, args
        if args[0] == "convert":
            assert "-O" in args, args
        if args[0] in ("info", "check"):
            assert "-U" in args, args
        if "-b" in args and args[args.index("-b") + 1] or "-B" in args:
            assert "-F" in args, args


# The command line


def test_cli_disk_operations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write_raw(tmp_path / "base.img", pattern(1))
    top = tmp_path / "top.qcow2"
    assert cmd_disk(["overlay", str(base), str(top)]) == 0
    assert image_info(top)["backing-filename-format"] == "raw"  # detected from the header
    top2 = tmp_path / "top2.qcow2"
    with pytest.raises(ImageError, match="format was guessed"):
        cmd_disk(["overlay", str(top), str(top2)])  # top has a backing file
    assert cmd_disk(["overlay", str(top), str(top2), "--follow-backing"]) == 0
    assert image_info(top2)["backing-filename-format"] == "qcow2"
    capsys.readouterr()
    assert cmd_disk(["chain", str(top2), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(x["path"], x["format"]) for x in listed] == [
        (str(top2), "qcow2"), (str(top), "qcow2"), (str(base), "raw")]
    assert cmd_disk(["chain", str(top2)]) == 0
    assert "top2.qcow2" in capsys.readouterr().out
    assert cmd_disk(["snapshot", "create", str(top2), "one"]) == 0
    assert cmd_disk(["snapshot", "list", str(top2)]) == 0
    assert "one" in capsys.readouterr().out
    out = tmp_path / "out.vdi"
    assert cmd_disk(["convert", str(top2), str(out), "--to", "vdi", "--follow-backing"]) == 0
    assert content(out, "vdi") == pattern(1)
    assert cmd_disk(["resize", str(top2), "8M", "--format", "qcow2"]) == 0
    assert image_info(top2)["virtual-size"] == 8 * MiB
    assert cmd_disk(["create", str(tmp_path / "c.raw"), "1M", "--format", "raw"]) == 0
    assert (tmp_path / "c.raw").stat().st_size == MiB


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["create", "x.qcow2", "lots"], ["rebase", "x.qcow2"],
    ["snapshot", "create", "x.qcow2"], ["convert", "a", "b"],
])
def test_cli_usage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError):
        cmd_disk(argv)


def test_cli_shows_progress_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    raw = write_raw(tmp_path / "src.raw", pattern(1))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cmd_disk(["convert", str(raw), str(tmp_path / "out.qcow2"), "--to", "qcow2"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("\rvmrun: convert:") and err.endswith("\n")
    assert "vmrun: convert: 100%" in err


def test_an_external_data_file_is_refused_before_qemu_img_reads_it(tmp_path: Path) -> None:
    from vmrun.errors import UnsafeImage

    secret = tmp_path / "secret"
    secret.write_bytes(b"host secret".ljust(1 << 20, b"\0"))
    image = tmp_path / "ext.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={secret},data_file_raw=on", str(image), "1M"],
                   check=True, cwd=tmp_path)
    with pytest.raises(UnsafeImage, match="another file"):
        disk.convert(image, tmp_path / "out.raw", src_format="qcow2", dst_format="raw")
    assert not (tmp_path / "out.raw").exists()
