"""`vmrun disk` given hostile images: no command reads a host file through a reference.

A guest can write any qcow2 header into a raw disk it was given, including one whose
backing file names a host file; a VMDK descriptor can name host files as extents. Each
test here failed before the chain check: the command exited 0 and its output held the
host file's bytes (or, for commit, wrote into it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmrun.cli import main
from vmrun.errors import ImageError, UnsafeImage, UsageError
from vmrun.images import disk, qemu_img

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MiB = 1 << 20
MARK = b"HOST-SECRET-7f3a9c"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    host = tmp_path / "host"
    host.mkdir()
    path = host / "secret"
    path.write_bytes((MARK * 64).ljust(MiB, b"\0"))
    return path


def hostile_qcow2(path: Path, backing: str, fmt: str = "raw") -> Path:
    """What a guest can write: a qcow2 header naming BACKING, 1 MiB, nothing allocated."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt,
                    str(path), "1M"], check=True)
    return path


@pytest.fixture
def evil(tmp_path: Path, secret: Path) -> Path:
    guest = tmp_path / "guest"
    guest.mkdir()
    # The guest's raw disk now starts with a qcow2 header: vmrun's own guess says qcow2.
    return hostile_qcow2(guest / "disk.img", str(secret))


def leaked(root: Path, secret: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p != secret
            and MARK in p.read_bytes()]


def unchanged(secret: Path) -> bool:
    return secret.read_bytes() == (MARK * 64).ljust(MiB, b"\0")


# Every disk command, on the command line, with the format left to vmrun's guess.
COMMANDS = {
    "convert": ["convert", "{evil}", "{out}", "--to", "raw"],
    "flatten": ["flatten", "{evil}", "{out}"],
    "overlay": ["overlay", "{evil}", "{out}"],
    "commit": ["commit", "{evil}"],
    "rebase --standalone": ["rebase", "{evil}", "--standalone"],
    "rebase onto it": ["rebase", "{plain}", "--base", "{evil}"],
    "compact": ["compact", "{evil}", "--output", "{out}"],
    "compact in place": ["compact", "{evil}"],
    "resize": ["resize", "{evil}", "2M"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_a_guessed_format_never_reads_the_backing_file(
    tmp_path: Path, secret: Path, evil: Path, name: str, capsys: pytest.CaptureFixture[str],
) -> None:
    plain = tmp_path / "plain.qcow2"
    disk.create(plain, "1M")
    out = tmp_path / "out.img"
    argv = [a.format(evil=evil, out=out, plain=plain) for a in COMMANDS[name]]
    before = evil.read_bytes()
    assert main(["disk", *argv]) == 118
    err = capsys.readouterr().err
    assert "format was guessed" in err and "--follow-backing" in err
    assert len(err.strip().splitlines()) <= 2  # one line and a hint, no traceback
    assert not out.exists()
    assert leaked(tmp_path, secret) == []
    assert unchanged(secret)
    assert evil.read_bytes() == before


@pytest.mark.parametrize("name", ["convert", "flatten"])
def test_library_calls_without_a_format_refuse_too(
    tmp_path: Path, secret: Path, evil: Path, name: str,
) -> None:
    out = tmp_path / "out.raw"
    with pytest.raises(UnsafeImage, match="guessed"):
        if name == "convert":
            disk.convert(evil, out, src_format=None, dst_format="raw")
        else:
            disk.flatten(evil, out, dst_format="raw")
    assert not out.exists() and leaked(tmp_path, secret) == []


def test_snapshots_never_open_the_backing_file(
    tmp_path: Path, secret: Path, evil: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    # Snapshots need no chain: qemu-img opens the image with its backing disabled.
    secret.chmod(0)  # were it opened, qemu-img would fail (as non-root) ...
    fifo = tmp_path / "guest" / "fifo"
    os.mkfifo(fifo)
    other = hostile_qcow2(tmp_path / "guest" / "other.img", str(fifo))  # ... or hang
    try:
        for image in (evil, other):
            assert main(["disk", "snapshot", "create", str(image), "s1"]) == 0
            assert main(["disk", "snapshot", "list", str(image)]) == 0
            assert "s1" in capsys.readouterr().out
            assert main(["disk", "snapshot", "delete", str(image), "s1"]) == 0
    finally:
        secret.chmod(0o600)
    assert unchanged(secret)


def test_following_needs_words_and_each_layer_is_checked(
    tmp_path: Path, secret: Path, evil: Path,
) -> None:
    out = tmp_path / "out.raw"
    # The user's explicit word: an absolute path is then followed, layer by layer.
    disk.convert(evil, out, src_format="qcow2", dst_format="raw")
    assert out.read_bytes() == secret.read_bytes()
    out.unlink()
    assert main(["disk", "convert", str(evil), str(out), "--to", "raw",
                 "--follow-backing"]) == 0
    out.unlink()
    # Even then: never a json: or protocol name, a device, a FIFO, or a wrong format.
    guest = tmp_path / "guest"
    os.mkfifo(guest / "fifo")
    cases = {
        "json": (hostile_qcow2(guest / "j.img", 'json:{"driver":"raw","file":{"driver":'
                                               f'"file","filename":"{secret}"}}}}'),
                 "json:|protocol"),
        "nbd": (hostile_qcow2(guest / "n.img", "nbd:127.0.0.1:10809"), "protocol"),
        "file": (hostile_qcow2(guest / "f.img", f"file:{secret}"), "protocol"),
        "device": (hostile_qcow2(guest / "d.img", "/dev/zero"), "not a regular file"),
        "fifo": (hostile_qcow2(guest / "p.img", "fifo"), "not a regular file"),
        "mismatch": (hostile_qcow2(guest / "m.img", str(secret), "qcow2"), "header says raw"),
    }
    for name, (image, reason) in cases.items():
        with pytest.raises(ImageError, match=reason):
            disk.convert(image, out, src_format="qcow2", dst_format="raw")
        assert not out.exists(), name
        with pytest.raises(ImageError, match=reason):
            disk.chain(image)  # listing refuses them too
    assert unchanged(secret)


def test_a_layer_with_an_external_data_file_is_refused_anywhere_in_the_chain(
    tmp_path: Path, secret: Path,
) -> None:
    mid = tmp_path / "mid.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={secret},data_file_raw=on", str(mid), "1M"], check=True)
    top = hostile_qcow2(tmp_path / "top.qcow2", str(mid), "qcow2")
    with pytest.raises(UnsafeImage, match="another file"):
        disk.convert(top, tmp_path / "out.raw", src_format="qcow2", dst_format="raw")
    assert leaked(tmp_path, secret) == []


# VMDK descriptors


def descriptor(path: Path, extent: str, kind: str = "FLAT") -> Path:
    path.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    'createType="monolithicFlat"\n\n'
                    f'RW 2048 {kind} "{extent}" 0\n\nddb.virtualHWVersion = "4"\n')
    return path


def test_vmdk_extents_only_beside_the_descriptor(
    tmp_path: Path, secret: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    guest = tmp_path / "guest"
    guest.mkdir()
    os.symlink(secret, guest / "link")
    hostile = {
        "absolute": descriptor(guest / "a.vmdk", str(secret)),
        "dotdot": descriptor(guest / "b.vmdk", "../host/secret"),
        "subdir": descriptor(guest / "c.vmdk", "sub/secret"),
        "symlink": descriptor(guest / "d.vmdk", "link"),
        "protocol": descriptor(guest / "e.vmdk", "nbd:127.0.0.1:10809"),
    }
    out = tmp_path / "out.raw"
    for name, path in hostile.items():
        for guessed in (False, True):
            argv = ["disk", "convert", str(path), str(out), "--to", "raw"]
            code = main(argv + ([] if guessed else ["--from", "vmdk"]))
            if guessed:
                # Guessed, a descriptor is a raw file: its text is copied, nothing else.
                assert code == 0, name
                assert out.read_bytes().startswith(b"# Disk DescriptorFile")
                out.unlink()
            else:
                assert code == 118, name
                assert not out.exists()
    assert "extent" in capsys.readouterr().err
    assert leaked(tmp_path, secret) == []


def test_a_real_flat_vmdk_still_converts(tmp_path: Path) -> None:
    src = tmp_path / "flat.vmdk"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat",
                    str(src), "4M"], check=True)
    (tmp_path / "flat-flat.vmdk").write_bytes(b"flat data".ljust(4 * MiB, b"\0"))
    out = tmp_path / "out.raw"
    disk.convert(src, out, src_format="vmdk", dst_format="raw")
    assert out.read_bytes().startswith(b"flat data")


# Legitimate chains keep working


def test_vmruns_own_overlays_and_store_layers_follow(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"base data".ljust(MiB, b"\0"))
    mid, top = tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    disk.overlay(base, mid, base_format="raw")
    disk.overlay(mid, top, base_format="qcow2")
    # A layer named by a plain name beside it, as the store's baked layers are.
    store_dir = tmp_path / "blobs"
    store_dir.mkdir()
    shutil.copy(base, store_dir / "aaaa")
    layer = hostile_qcow2(store_dir / "bbbb", "aaaa", "raw")
    for image in (top, layer):
        out = tmp_path / f"{image.name}.out"
        disk.convert(image, out, src_format="qcow2", dst_format="raw")
        assert out.read_bytes() == base.read_bytes()
    assert [x.format for x in disk.chain_for_reading(top, "qcow2")] == ["qcow2", "qcow2", "raw"]


# qemu-img runs bounded on every call: the limits of the real child processes


def test_every_qemu_img_child_has_its_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "calls.log"
    wrapper = tmp_path / "qemu-img"
    real = qemu_img.qemu_img_path()
    wrapper.write_text(f'#!/bin/sh\n{{ echo "ARGS $*"; cat /proc/$$/limits; }} >> {log}\n'
                       f'exec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    base = tmp_path / "base.raw"
    base.write_bytes(b"x" * MiB)
    top, flat, other = (tmp_path / n for n in ("top.qcow2", "flat.qcow2", "other.qcow2"))
    for argv in (["create", str(other), "1M"], ["overlay", str(base), str(top)],
                 ["chain", str(top)], ["convert", str(top), str(flat), "--to", "qcow2",
                                       "--from", "qcow2"],
                 ["compact", str(top), "--format", "qcow2"], ["resize", str(flat), "2M"],
                 ["commit", str(top), "--follow-backing"],
                 ["rebase", str(top), "--base", str(other), "--follow-backing"],
                 ["snapshot", "create", str(flat), "s"], ["snapshot", "list", str(flat)]):
        assert main(["disk", *argv]) == 0, (argv, capsys.readouterr().err)
    calls = log.read_text().split("ARGS ")[1:]
    assert {c.split()[0] for c in calls} >= {"create", "convert", "info", "resize", "commit",
                                            "rebase", "snapshot", "check"}
    for call in calls:
        rows = {line[:26].strip(): line[26:].split()[0] for line in call.splitlines()[1:]
                if line.startswith("Max ")}
        assert rows["Max address space"] == str(qemu_img.ADDRESS_SPACE_LIMIT), call
        assert rows["Max cpu time"] != "unlimited", call
        assert rows["Max core file size"] == "0", call
        first = call.splitlines()[0].split()
        assert "-f" in first or any(a.startswith("json:") for a in first), call
        if "-b" in first and first[first.index("-b") + 1:][:1] != ["-F"]:
            assert "-F" in first, call


# Fuzzing the chain walk


FUZZ = settings(max_examples=150, deadline=5000,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=600), st.sampled_from([0, 8, 16, 72, 104, 200]),
       st.sampled_from(["qcow2", "raw", "vmdk", "vdi", "vhdx", None]), st.booleans())
def test_chain_walk_on_arbitrary_headers(
    tmp_path_factory: pytest.TempPathFactory, data: bytes, at: int, fmt: str | None,
    follow: bool,
) -> None:
    d = tmp_path_factory.mktemp("fuzz")
    good = d / "good.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F",
                    "raw", "-u", str(good), "1M"], check=True)
    blob = bytearray(good.read_bytes()[:4096])
    blob[at:at + len(data)] = data
    path = d / "x.img"
    path.write_bytes(bytes(blob))
    try:
        layers = disk.chain_for_reading(path, fmt, follow_backing=follow)
    except ImageError:
        return
    # Whatever got through names only regular files, each read in the format recorded.
    for layer in layers:
        assert layer.path.is_file()
        assert layer.backing is None or not layer.backing.startswith("json:")
    if fmt is None and not follow:
        assert len(layers) == 1
    assert json.dumps([str(x.path) for x in layers])


# RELIABILITY cases 1, 4 and 5 without a VM


def test_case1_a_raw_base_is_read_as_raw_through_its_overlay(tmp_path: Path,
                                                             secret: Path) -> None:
    from vmrun.images import attach, formats

    base = tmp_path / "base.raw"
    header = hostile_qcow2(tmp_path / "h.qcow2", str(secret)).read_bytes()
    base.write_bytes(header.ljust(2 * MiB, b"\0"))  # what a guest left in its raw disk
    rundir = tmp_path / "run"
    rundir.mkdir()
    attached = attach.attach(attach.Base(path=base, format="raw", digest=None), rundir)
    q = formats.inspect_image(attached.overlay).qcow2
    assert q is not None and (q.backing_file, q.backing_format) == (str(base), "raw")
    layers = disk.chain_for_reading(attached.overlay, "qcow2")
    assert [x.format for x in layers] == ["qcow2", "raw"]  # the chain ends at the raw base
    out = tmp_path / "seen.raw"
    disk.convert(attached.overlay, out, src_format="qcow2", dst_format="raw")
    assert out.read_bytes() == base.read_bytes() and MARK not in out.read_bytes()


def test_case4_a_stored_base_is_read_only_and_a_changed_one_refused(tmp_path: Path) -> None:
    from vmrun.images import store

    raw = tmp_path / "base.raw"
    raw.write_bytes(b"base".ljust(MiB, b"\0"))
    stored = store.import_image(raw, name="case4", cache=tmp_path / "cache")
    assert stored.path.stat().st_mode & 0o222 == 0
    store.check_unchanged(stored.digest, stored.path)
    stored.path.chmod(0o644)
    with open(stored.path, "r+b") as f:
        f.write(b"evil")
    with pytest.raises(ImageError, match="base image changed"):
        store.check_unchanged(stored.digest, stored.path)


def test_case5_a_corrupt_overlay_is_refused_and_nothing_kept(tmp_path: Path) -> None:
    from vmrun.images import attach, store

    cache = tmp_path / "cache"
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"base".ljust(4 * MiB, b"\1"))
    under = store.import_image(raw, name="case5", cache=cache)
    rundir = tmp_path / "run"
    rundir.mkdir()
    base = attach.Base(path=under.path, format="raw", digest=under.digest)
    overlay = attach.attach(base, rundir).overlay
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 3M", str(overlay)],
                   check=True, capture_output=True)
    with pytest.raises(UsageError, match="already exists"):
        attach.attach(base, rundir)  # an overlay is never reused
    os.truncate(overlay, overlay.stat().st_size // 4)
    names_before = {x.name for x in store.list_images(cache)}
    with pytest.raises(ImageError, match="overlay .* (truncated|corrupt)"):
        store.add_layer(overlay, name="baked", under=under, bake_key="k", source="test",
                        cache=cache)
    assert {x.name for x in store.list_images(cache)} == names_before
    assert list((cache / "tmp").glob("layer-*")) == []
    # `disk commit` checks the overlay before writing anything into the base.
    plain = tmp_path / "base2.raw"
    plain.write_bytes(b"\1" * (4 * MiB))
    top = tmp_path / "top.qcow2"
    disk.overlay(plain, top, base_format="raw")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 3M", str(top)],
                   check=True, capture_output=True)
    os.truncate(top, top.stat().st_size // 4)
    with pytest.raises(ImageError, match="overlay .* (truncated|corrupt)"):
        disk.commit(top)
    assert plain.read_bytes() == b"\1" * (4 * MiB)
