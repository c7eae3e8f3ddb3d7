"""A Debian cloud-style disk image built from Debian packages, for tests and benchmarks.

Cloud-image sites are unreachable where vmrun is developed, so the tests make their own
image the way the distributions do, without loop devices or mounts: mmdebstrap installs
systemd, cloud-init, openssh-server, a kernel and sudo into a directory; `mke2fs -d` turns it
into the root filesystem; the disk gets a GPT with a BIOS boot partition, an EFI system
partition and the root partition (the Discoverable Partitions Specification's x86_64 root
type, as Debian's images have), and GRUB for both BIOS and UEFI, installed by writing its
images into place. The result is cached by the hash of this recipe.

The arm64 variant boots from UEFI only (no BIOS boot partition), with GRUB's arm64-efi
image at EFI/BOOT/BOOTAA64.EFI made from the modules of grub-efi-arm64-bin inside the new
root, and the DPS aarch64 root type. mmdebstrap runs its maintainer scripts through
qemu-user, which scripts/setup --dev registers with binfmt_misc on an x86_64 host.

    python -m tests.cloudimage               # build (or find) it and print its path
    python -m tests.cloudimage --arch arm64  # the same for arm64
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from vmrun import cache as cachelib
from vmrun.qemu.arch import host_arch, lookup_arch

SUITE = "bookworm"
PACKAGES = (
    "systemd-sysv", "udev", "cloud-init", "openssh-server", "sudo", "iproute2",
    "systemd-resolved", "linux-image-cloud-amd64", "initramfs-tools", "e2fsprogs", "locales",
    "cloud-guest-utils",
)
SECTOR = 512
MIB = 1 << 20
ROOT_SIZE = 1536 * MIB
ESP_SIZE = 32 * MIB
BIOS_BOOT_SIZE = 1 * MIB
GRUB_I386 = Path("/usr/lib/grub/i386-pc")
GRUB_EFI = Path("/usr/lib/grub/x86_64-efi")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
ROOT_AARCH64_TYPE = "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"
KERNEL_ARGS = "ro console=tty0 console=ttyS0,115200 net.ifnames=0"

# Run on the host with the root directory as $1, after the packages are installed.
CUSTOMIZE = r"""
set -e
root=$1
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
printf 'UUID=%s / ext4 rw,discard,errors=remount-ro 0 1\n' "$ROOT_UUID" > "$root/etc/fstab"
echo localhost > "$root/etc/hostname"
chroot "$root" systemctl enable systemd-networkd.service
# The locale cloud-init sets by default, generated now as Debian's images ship it.
sed -i 's/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/' "$root/etc/locale.gen"
chroot "$root" locale-gen >/dev/null
echo LANG=en_US.UTF-8 > "$root/etc/default/locale"
ln -sf /run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
mkdir -p "$root/boot/grub"
cat > "$root/boot/grub/grub.cfg" <<EOF
set timeout=0
insmod part_gpt
insmod ext2
search --no-floppy --fs-uuid --set=root $ROOT_UUID
linux /vmlinuz root=UUID=$ROOT_UUID $KERNEL_ARGS
initrd /initrd.img
boot
EOF
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log
"""


@dataclass(frozen=True)
class Variant:
    """What differs between the amd64 and the arm64 image."""

    arch: str  # Debian's name
    packages: tuple[str, ...]
    kernel_args: str
    root_type: str  # the GPT type of the root partition
    efi_target: str  # grub-mkimage -O
    efi_name: str  # the removable-media path's file name, under EFI/BOOT
    efi_modules: tuple[str, ...]  # beside GRUB_MODULES
    bios: bool  # a BIOS boot partition with GRUB's i386-pc core image
    grub_efi: Path | None  # the host's GRUB EFI modules; None: the new root's own


VARIANTS = {
    "amd64": Variant(
        arch="amd64", packages=PACKAGES, kernel_args=KERNEL_ARGS, root_type=ROOT_X86_64_TYPE,
        efi_target="x86_64-efi", efi_name="BOOTX64.EFI", efi_modules=("all_video", "efi_gop"),
        bios=True, grub_efi=GRUB_EFI,
    ),
    "arm64": Variant(
        # The host has no arm64 GRUB of its own: grub-mkimage (any host's) takes the
        # modules from the package installed in the new root.
        arch="arm64",
        packages=(*(p.replace("-amd64", "-arm64") for p in PACKAGES), "grub-efi-arm64-bin"),
        kernel_args="ro console=ttyAMA0 net.ifnames=0", root_type=ROOT_AARCH64_TYPE,
        efi_target="arm64-efi", efi_name="BOOTAA64.EFI", efi_modules=(), bios=False,
        grub_efi=None,
    ),
}

def recipe_key(arch: str = "amd64") -> str:
    variant = VARIANTS[arch]
    steps = (build, make_esp, make_bios_core, assemble, install_bios_boot, grub_embed_config,
             run, shlex_quote)
    return cachelib.key_of(SUITE, repr(variant), CUSTOMIZE, repr(GRUB_MODULES),
                          repr((SECTOR, MIB, ROOT_SIZE, ESP_SIZE, BIOS_BOOT_SIZE, ESP_TYPE,
                                BIOS_BOOT_TYPE)),
                          *(inspect.getsource(step) for step in steps))


def image_path(cache: Path | None = None, arch: str = "amd64") -> Path:
    root = (cache or cachelib.cache_dir()) / "testimages"
    name = "cloud" if arch == "amd64" else f"cloud-{arch}"
    return root / f"debian-{SUITE}-{name}-{recipe_key(arch)[:16]}.qcow2"


def ensure_cloud_image(cache: Path | None = None, *, mirror: str | None = None,
                       arch: str = "amd64") -> Path:
    """The test image's path, built first if the cache lacks it (a few minutes; arm64's
    maintainer scripts run under qemu-user, which takes longer)."""
    if arch not in VARIANTS:
        raise ValueError(f"no test image recipe for {arch!r} (known: {', '.join(VARIANTS)})")
    final = image_path(cache, arch)
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with cachelib.locked(final.with_suffix(".lock")):
        if final.exists():
            return final
        check_emulation(arch)
        with cachelib.staged(final) as temp:
            build(temp, mirror=mirror or os.environ.get("VMRUN_DEBIAN_MIRROR")
                  or "http://deb.debian.org/debian", variant=VARIANTS[arch])
    return final


class EmulationMissing(RuntimeError):
    """A foreign architecture's image cannot be built: no qemu-user registered for it."""


def check_emulation(arch: str) -> None:
    """mmdebstrap runs a foreign root's maintainer scripts through qemu-user, which the
    kernel finds by binfmt_misc; without it mmdebstrap fails only after the downloads."""
    machine = lookup_arch(arch).name
    if host_arch() == machine:
        return
    entry = BINFMT / f"qemu-{machine}"
    try:
        enabled = entry.read_text().startswith("enabled")
    except OSError:
        enabled = False
    if not enabled:
        raise EmulationMissing(f"building the {arch} test image here needs qemu-{machine} "
                               f"registered with binfmt_misc ({entry}): run scripts/setup --dev")


def run(argv: list[str], **kwargs: object) -> None:
    subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]


def build(out: Path, *, mirror: str, variant: Variant) -> None:
    missing = [tool for tool in ("mmdebstrap", "mke2fs", "sfdisk", "mkfs.vfat", "mcopy",
                                 "grub-mkimage", "qemu-img") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"building the test image needs {', '.join(missing)}: "
                           "run scripts/setup --dev")
    root_uuid = str(uuid.UUID(recipe_key(variant.arch)[:32]))
    with tempfile.TemporaryDirectory(prefix="vmrun-cloudimage-", dir=out.parent) as tmp:
        work = Path(tmp)
        rootfs = work / "rootfs"
        env = {**os.environ, "ROOT_UUID": root_uuid, "KERNEL_ARGS": variant.kernel_args}
        run(["mmdebstrap", "--quiet", "--variant=apt", f"--architectures={variant.arch}",
             "--include=" + ",".join(variant.packages),
             "--customize-hook", f"sh -c {shlex_quote(CUSTOMIZE)} hook \"$1\"",
             SUITE, str(rootfs), mirror], env=env)
        root_img = work / "root.img"
        run(["mke2fs", "-q", "-t", "ext4", "-d", str(rootfs), "-L", "root", "-U", root_uuid,
             str(root_img), f"{ROOT_SIZE // 1024}k"])
        esp_img = work / "esp.img"
        make_esp(esp_img, work, root_uuid, variant=variant,
                 grub_dir=variant.grub_efi or rootfs / "usr/lib/grub" / variant.efi_target)
        core_img = None
        if variant.bios:
            core_img = work / "core.img"
            make_bios_core(core_img, work, root_uuid)
        raw = work / "disk.raw"
        assemble(raw, core_img=core_img, esp_img=esp_img, root_img=root_img,
                 root_type=variant.root_type)
        run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)])


def shlex_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def grub_embed_config(root_uuid: str) -> str:
    # GRUB's own image only finds the root filesystem and reads the image's grub.cfg there.
    return (f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
            "set prefix=($root)/boot/grub\nconfigfile ($root)/boot/grub/grub.cfg\n")


GRUB_MODULES = ["part_gpt", "ext2", "search", "search_fs_uuid", "configfile", "normal",
                "linux", "echo", "test"]


def make_esp(esp_img: Path, work: Path, root_uuid: str, *, variant: Variant,
             grub_dir: Path) -> None:
    embed = work / "embed-efi.cfg"
    embed.write_text(grub_embed_config(root_uuid))
    efi = work / variant.efi_name
    run(["grub-mkimage", "-O", variant.efi_target, "-d", str(grub_dir), "-o", str(efi),
         "-p", "/boot/grub", "-c", str(embed), *GRUB_MODULES, *variant.efi_modules])
    run(["mkfs.vfat", "-C", "-n", "EFI", str(esp_img), str(ESP_SIZE // 1024)],
        stdout=subprocess.DEVNULL)
    run(["mmd", "-i", str(esp_img), "::EFI", "::EFI/BOOT"])
    run(["mcopy", "-i", str(esp_img), str(efi), f"::EFI/BOOT/{variant.efi_name}"])


def make_bios_core(core_img: Path, work: Path, root_uuid: str) -> None:
    embed = work / "embed-bios.cfg"
    embed.write_text(grub_embed_config(root_uuid))
    run(["grub-mkimage", "-O", "i386-pc", "-d", str(GRUB_I386), "-o", str(core_img),
         "-p", "/boot/grub", "-c", str(embed), "biosdisk", *GRUB_MODULES])
    if core_img.stat().st_size > BIOS_BOOT_SIZE:
        raise RuntimeError("GRUB's core image does not fit the BIOS boot partition")


def assemble(raw: Path, *, core_img: Path | None, esp_img: Path, root_img: Path,
             root_type: str) -> None:
    """The GPT disk: a BIOS boot partition holding CORE_IMG (unless None), the ESP, root."""
    start = MIB  # first partition at 1 MiB, like every modern partitioner
    bios_size = BIOS_BOOT_SIZE if core_img is not None else 0
    bios_lba = start // SECTOR
    esp_lba = bios_lba + bios_size // SECTOR
    root_lba = esp_lba + ESP_SIZE // SECTOR
    total = start + bios_size + ESP_SIZE + ROOT_SIZE + MIB  # room for the backup GPT
    with open(raw, "wb") as f:
        f.truncate(total)
    table = "label: gpt\n"
    if core_img is not None:
        table += f"start={bios_lba}, size={bios_size // SECTOR}, type={BIOS_BOOT_TYPE}, name=bios\n"
    table += (
        f"start={esp_lba}, size={ESP_SIZE // SECTOR}, type={ESP_TYPE}, name=esp\n"
        f"start={root_lba}, size={ROOT_SIZE // SECTOR}, type={root_type}, name=root\n"
    )
    run(["sfdisk", "--quiet", str(raw)], input=table.encode())
    with open(raw, "r+b") as disk:
        for lba, image in ((esp_lba, esp_img), (root_lba, root_img)):
            disk.seek(lba * SECTOR)
            with open(image, "rb") as src:
                shutil.copyfileobj(src, disk, 1 << 20)
        if core_img is not None:
            install_bios_boot(disk, core_img.read_bytes(), core_lba=bios_lba)


def install_bios_boot(disk: object, core: bytes, *, core_lba: int) -> None:
    """What grub-bios-setup does for a GPT disk: boot.img's code in the MBR, pointing at
    core.img in the BIOS boot partition, whose first sector lists where the rest lies."""
    assert hasattr(disk, "seek") and hasattr(disk, "read") and hasattr(disk, "write")
    boot = (GRUB_I386 / "boot.img").read_bytes()
    disk.seek(0)
    mbr = bytearray(disk.read(SECTOR))
    mbr[:440] = boot[:440]  # the disk signature and the protective partition entry stay
    struct.pack_into("<Q", mbr, 0x5C, core_lba)  # GRUB_BOOT_MACHINE_KERNEL_SECTOR
    mbr[0x64] = 0xFF  # GRUB_BOOT_MACHINE_BOOT_DRIVE: the drive the BIOS booted from
    struct.pack_into("<H", mbr, 0x66, 0x9090)  # no floppy probing
    disk.seek(0)
    disk.write(bytes(mbr))
    core_bytes = bytearray(core)
    sectors = (len(core_bytes) + SECTOR - 1) // SECTOR
    # diskboot.img's block list: the sectors after the first, loaded at segment 0x820.
    struct.pack_into("<QHH", core_bytes, SECTOR - 12, core_lba + 1, sectors - 1, 0x820)
    disk.seek(core_lba * SECTOR)
    disk.write(bytes(core_bytes))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cloudimage", description=__doc__)
    parser.add_argument("--cache", type=Path, help="cache directory (default vmrun's)")
    parser.add_argument("--arch", choices=sorted(VARIANTS), default="amd64",
                        help="Debian architecture of the image (default amd64)")
    args = parser.parse_args()
    print(ensure_cloud_image(args.cache, arch=args.arch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
