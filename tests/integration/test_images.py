"""Runs on disk images: a fresh overlay each run, the base never changes (real VMs)."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
from pathlib import Path

import pytest

from tests.integration.vmtools import run_cli, vmrun_argv, vmrun_env
from vmrun.cache import sha256_file
from vmrun.errors import ImageError
from vmrun.guest.build import Guest
from vmrun.images import store
from vmrun.rundir import runs_root

pytestmark = pytest.mark.vm

HEAD = b"vmrun-base-image"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> store.StoredImage:
    raw = tmp_path_factory.mktemp("base") / "base.raw"
    with open(raw, "wb") as f:
        f.write(HEAD)
        f.truncate(16 << 20)
    return store.import_image(raw, name="vmrun-test-base")


def leftover_runs() -> set[str]:
    root = runs_root()
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


@pytest.mark.usefixtures("private_runs")
def test_writes_go_to_the_overlay_and_the_base_is_unchanged(
    guest: Guest, base: store.StoredImage, tmp_path: Path
) -> None:
    before = leftover_runs()
    script = (
        "[ -b /dev/vda ] || exit 99; head -c 16 /dev/vda; echo; "
        "printf overwritten | dd of=/dev/vda conv=notrunc 2>/dev/null; sync; "
        "head -c 11 /dev/vda; echo"
    )
    done = run_cli("--image", "vmrun-test-base", "--share", "none", "--net", "none",
                   "--", "sh", "-c", script, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [HEAD, b"overwritten"]
    assert sha256_file(base.path) == base.digest
    assert leftover_runs() <= before
    # The next run starts clean: a fresh overlay on the untouched base.
    again = run_cli("--image", base.digest[:16], "--share", "none", "--net", "none",
                    "--", "head", "-c", "16", "/dev/vda", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout == HEAD


@pytest.mark.usefixtures("private_runs")
def test_parallel_runs_from_one_base(guest: Guest, base: store.StoredImage,
                                     tmp_path: Path) -> None:
    before = leftover_runs()
    procs = []
    for n in range(3):
        script = (f"[ -b /dev/vda ] || exit 99; "
                  f"printf run-{n} | dd of=/dev/vda conv=notrunc 2>/dev/null; "
                  f"head -c 5 /dev/vda; exit {n}")
        procs.append(subprocess.Popen(
            vmrun_argv("--image", "vmrun-test-base", "--share", "none", "--net", "none",
                       "--", "sh", "-c", script),
            cwd=tmp_path, env=vmrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for n, proc in enumerate(procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == n, err
        assert out == f"run-{n}".encode()
    assert sha256_file(base.path) == base.digest
    assert leftover_runs() <= before


def test_an_image_file_by_path(guest: Guest, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"by-path" + bytes(1 << 20))  # no disk signature: raw by our word
    done = run_cli("--image", str(image), "--image-format", "raw", "--share", "none",
                   "--net", "none", "--",
                   "sh", "-c", "[ -b /dev/vda ] || exit 99; "
                   "printf x | dd of=/dev/vda conv=notrunc 2>/dev/null; "
                   "head -c 7 /dev/vda", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"xy-path"
    assert image.read_bytes()[:7] == b"by-path"


def test_a_hostile_image_is_refused_before_qemu_sees_it(tmp_path: Path) -> None:
    # A qcow2 header whose backing file is a host file: QEMU must never open it.
    header = struct.pack(">4sIQIIQIIQQIIQ", b"QFI\xfb", 2, 72, len(b"/etc/passwd"), 16,
                         1 << 20, 0, 1, 1 << 16, 2 << 16, 1, 0, 0)
    image = tmp_path / "evil.qcow2"
    image.write_bytes(header + b"/etc/passwd" + bytes(4096))
    done = run_cli("--image", str(image), "--share", "none", "--", "true", cwd=tmp_path)
    assert done.returncode == 118, done.stderr
    assert b"backing" in done.stderr
    assert not os.path.exists(tmp_path / "disk.qcow2")


def test_an_alias_is_pulled_on_first_use(guest: Guest, tmp_path: Path) -> None:
    # A publisher's site stand-in: debian:13 resolves under VMRUN_IMAGE_MIRROR.
    import hashlib
    import http.server
    import threading
    from functools import partial

    site = tmp_path / "site" / "trixie" / "latest"
    site.mkdir(parents=True)
    image = site / "debian-13-genericcloud-amd64.qcow2"
    raw = tmp_path / "alias.raw"
    raw.write_bytes(b"from-the-alias" + bytes(1 << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
                   check=True)
    digest = hashlib.sha512(image.read_bytes()).hexdigest()
    (site / "SHA512SUMS").write_text(f"{digest}  {image.name}\n")
    # First use: forget what an earlier session of the suite stored under the alias.
    with contextlib.suppress(ImageError):
        store.remove("debian:13")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**vmrun_env(), "VMRUN_IMAGE_MIRROR": f"http://127.0.0.1:{server.server_port}"}
        done = subprocess.run(
            vmrun_argv("--image", "debian:13", "--share", "none", "--net", "none", "--",
                       "head", "-c", "14", "/dev/vda"),
            cwd=tmp_path, env=env, capture_output=True, timeout=300, check=False)
    finally:
        server.shutdown()
        thread.join()
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"from-the-alias"
    assert b"pulling debian:13" in done.stderr


def test_the_base_is_locked_against_writers_while_a_vm_runs(guest: Guest,
                                                            tmp_path: Path) -> None:
    image = tmp_path / "locked.raw"
    image.write_bytes(bytes(1 << 20))
    proc = subprocess.Popen(
        vmrun_argv("--image", str(image), "--share", "none", "--net", "none", "--",
                   "sh", "-c", "echo running; exec sleep 600"),
        cwd=tmp_path, env=vmrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"running\n"
        writer = subprocess.run(["qemu-img", "resize", "-f", "raw", str(image), "2M"],
                                capture_output=True, text=True, check=False)
        assert writer.returncode != 0
        assert "lock" in writer.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert image.stat().st_size == 1 << 20


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_host_disk_full_fails_fast(guest: Guest, tmp_path: Path) -> None:
    # The run directory (and so the overlay) on an 8 MiB filesystem; the guest writes 32.
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=True)
    try:
        image = tmp_path / "disk.raw"
        image.write_bytes(bytes(64 << 20))
        env = {**vmrun_env(), "VMRUN_RUNS_DIR": str(small)}
        done = subprocess.run(
            vmrun_argv("--image", str(image), "--share", "none", "--net", "none", "--",
                       "sh", "-c", "dd if=/dev/urandom of=/dev/vda bs=1M count=32 "
                       "oflag=direct 2>&1; sync; echo unreachable"),
            cwd=tmp_path, env=env, capture_output=True, timeout=300, check=False)
        assert done.returncode == 118, done.stderr
        assert b"host disk full" in done.stderr
        assert b"unreachable" not in done.stdout
        assert [p.name for p in small.iterdir()] == []  # nothing half-written is left
    finally:
        subprocess.run(["umount", str(small)], check=False)
