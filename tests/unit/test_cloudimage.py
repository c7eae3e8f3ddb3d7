"""The test cloud image's recipe (tests/cloudimage.py), without building one: its keys, and
the disk layout each variant gets, as vmrun reads it back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests import cloudimage
from vmrun.images.partitions import find_root_partition, gpt_partitions, head_arch, read_head
from vmrun.qemu.firmware import Firmware, bootable_by

needs_sfdisk = pytest.mark.skipif(shutil.which("sfdisk") is None, reason="needs sfdisk")


def test_each_variant_has_its_own_key_and_path(tmp_path: Path) -> None:
    amd64, arm64 = cloudimage.recipe_key("amd64"), cloudimage.recipe_key("arm64")
    assert amd64 != arm64
    assert cloudimage.recipe_key() == amd64
    assert cloudimage.image_path(tmp_path) == cloudimage.image_path(tmp_path, "amd64")
    assert cloudimage.image_path(tmp_path).name == f"debian-bookworm-cloud-{amd64[:16]}.qcow2"
    assert cloudimage.image_path(tmp_path, "arm64").name == (
        f"debian-bookworm-cloud-arm64-{arm64[:16]}.qcow2")


def test_arm64_recipe() -> None:
    arm64 = cloudimage.VARIANTS["arm64"]
    assert "linux-image-cloud-arm64" in arm64.packages
    assert "grub-efi-arm64-bin" in arm64.packages
    assert not any(package.endswith("-amd64") for package in arm64.packages)
    assert "console=ttyAMA0" in arm64.kernel_args and "ttyS0" not in arm64.kernel_args
    assert (arm64.efi_target, arm64.efi_name, arm64.bios) == ("arm64-efi", "BOOTAA64.EFI",
                                                              False)


def test_unknown_arch_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no test image recipe for 'ppc64el'"):
        cloudimage.ensure_cloud_image(tmp_path, arch="ppc64el")


def assembled(tmp_path: Path, arch: str) -> bytes:
    variant = cloudimage.VARIANTS[arch]
    esp, root = tmp_path / "esp.img", tmp_path / "root.img"
    esp.write_bytes(b"ESP!")
    root.write_bytes(b"ROOT")
    core = None
    if variant.bios:
        core = tmp_path / "core.img"
        core.write_bytes(bytes(4 * cloudimage.SECTOR))
    raw = tmp_path / "disk.raw"  # sparse: 1.5 GiB long, a few blocks on disk
    cloudimage.assemble(raw, core_img=core, esp_img=esp, root_img=root,
                        root_type=variant.root_type)
    return read_head(raw, "raw")


@needs_sfdisk
def test_arm64_disk_boots_from_uefi_only_with_an_aarch64_root(tmp_path: Path) -> None:
    head = assembled(tmp_path, "arm64")
    assert bootable_by(head) == {Firmware.UEFI}
    assert head_arch(head) == "aarch64"
    partitions = gpt_partitions(head)
    assert partitions is not None and len(partitions) == 2
    esp, root = partitions
    assert (esp.first, root.first) == (2048, 2048 + cloudimage.ESP_SIZE // cloudimage.SECTOR)
    assert find_root_partition(head, "aarch64") == root.number == 2


@needs_sfdisk
@pytest.mark.skipif(not (cloudimage.GRUB_I386 / "boot.img").exists(), reason="needs grub-pc-bin")
def test_amd64_disk_keeps_bios_boot_esp_and_x86_64_root(tmp_path: Path) -> None:
    head = assembled(tmp_path, "amd64")
    assert bootable_by(head) == {Firmware.BIOS, Firmware.UEFI}
    assert head_arch(head) == "x86_64"
    partitions = gpt_partitions(head)
    assert partitions is not None
    assert [p.first for p in partitions] == [2048, 4096, 4096 + 65536]
    assert find_root_partition(head, "x86_64") == 3
