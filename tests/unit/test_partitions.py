from __future__ import annotations

import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from vmrun.cli import main
from vmrun.images.partitions import ROOT_TYPES, gpt_type_guids, image_arch

ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")


def gpt_disk(path: Path, types: list[uuid.UUID], size: int = 4 << 20) -> None:
    """A disk with a GPT listing partitions of TYPES (what the parser reads, no more)."""
    header = b"EFI PART" + struct.pack("<IIIIQQQQ16sQII", 0x10000, 92, 0, 0, 1, 0, 34, 0,
                                         bytes(16), 2, 128, 128)
    entries = b"".join(t.bytes_le + uuid.uuid4().bytes_le + struct.pack("<QQQ", 2048, 4095, 0)
                       + bytes(72) for t in types)
    with open(path, "wb") as f:
        f.write(bytes(446) + bytes(64) + b"\x55\xaa")  # protective MBR (partition elided)
        f.write(header.ljust(512, b"\0"))
        f.write(entries)
        f.truncate(size)


def by_arch(arch: str) -> uuid.UUID:
    return next(t for t, a in ROOT_TYPES.items() if a == arch)


@pytest.mark.parametrize("arch", ["x86_64", "aarch64", "armv7", "i386", "s390x", "ppc64le",
                                  "riscv64"])
def test_root_partition_type_names_the_arch(tmp_path: Path, arch: str) -> None:
    image = tmp_path / "disk.raw"
    gpt_disk(image, [ESP, by_arch(arch)])
    assert gpt_type_guids(image.read_bytes()[:32768]) == [ESP, by_arch(arch)]
    assert image_arch(image, "raw") == arch


def test_qcow2_is_read_through_qemu_img(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    gpt_disk(raw, [by_arch("s390x")])
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(image)],
                   check=True)
    assert image_arch(image, "qcow2") == "s390x"


def test_no_gpt_or_no_root_type_tells_nothing(tmp_path: Path) -> None:
    plain = tmp_path / "plain.raw"
    plain.write_bytes(bytes(1 << 20))
    assert image_arch(plain, "raw") is None
    generic = tmp_path / "generic.raw"
    gpt_disk(generic, [uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")])
    assert image_arch(generic, "raw") is None


def test_a_mismatch_with_arch_is_refused_before_anything_boots(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "arm.raw"
    gpt_disk(image, [by_arch("aarch64")])
    assert main(["--arch", "x86_64", "--image", str(image), "--", "true"]) == 125
    err = capsys.readouterr().err
    assert "is for aarch64" in err and "--arch aarch64" in err
