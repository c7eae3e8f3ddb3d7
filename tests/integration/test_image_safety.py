"""RELIABILITY cases 1, 4 and 5 around real VMs: no format probing, bases never change,
broken overlays refused (the no-VM halves are in tests/unit/test_disk_hostile.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.vmtools import run_cli
from vmrun.guest.build import Guest

pytestmark = pytest.mark.vm

MARK = b"HOST-SECRET-5d41c"


def hostile_header(secret: Path, tmp: Path) -> bytes:
    """The bytes a guest writes: a qcow2 header whose raw backing file is SECRET."""
    made = tmp / "header.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(secret), "-F",
                    "raw", str(made), "1M"], check=True)
    return made.read_bytes()[:4096]


def test_a_guest_written_qcow2_header_never_exposes_a_host_file(
    guest: Guest, tmp_path: Path,
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes((MARK * 100).ljust(1 << 20, b"\0"))
    header = hostile_header(secret, tmp_path)
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(4 << 20))
    # Run 1: the guest writes the header into its raw disk, then reads its disk back.
    # QEMU reads the overlay as qcow2 and the base as raw (named, never probed), so the
    # guest sees its own header bytes, never the secret.
    write = ("dd of=/dev/vda bs=4096 count=1 conv=notrunc 2>/dev/null; sync; "
             "echo 3 > /proc/sys/vm/drop_caches; head -c 4 /dev/vda | od -An -c; "
             f"grep -c {MARK.decode()} /dev/vda; true")
    done = run_cli("--image", str(image), "--image-format", "raw", "--share", "none",
                   "--net", "none", "--", "sh", "-c", write, cwd=tmp_path, input=header)
    assert done.returncode == 0, done.stderr
    assert b"Q   F   I" in done.stdout, done.stdout  # the header is on the guest's disk
    assert done.stdout.split()[-1] == b"0", done.stdout  # and the secret is not
    assert image.read_bytes() == bytes(4 << 20)  # the base never changed
    # The header lands in the base file (the user copied the guest's disk out): the next
    # run refuses it at the header check rather than letting QEMU follow it ...
    image.write_bytes(header.ljust(4 << 20, b"\0"))
    again = run_cli("--image", str(image), "--share", "none", "--net", "none", "--",
                    "grep", "-c", MARK.decode(), "/dev/vda", cwd=tmp_path)
    assert again.returncode == 118, again.stderr
    assert b"backing" in again.stderr and MARK not in again.stdout
    # ... and with the user's word that it is raw: refused as well, or only bytes.
    raw = run_cli("--image", str(image), "--image-format", "raw", "--share", "none",
                  "--net", "none", "--", "sh", "-c",
                  f"head -c 4 /dev/vda | od -An -c; grep -c {MARK.decode()} /dev/vda; true",
                  cwd=tmp_path)
    assert raw.returncode in (0, 118), raw.stderr
    assert MARK not in raw.stdout
    if raw.returncode == 0:
        assert b"Q   F   I" in raw.stdout and raw.stdout.split()[-1] == b"0", raw.stdout
