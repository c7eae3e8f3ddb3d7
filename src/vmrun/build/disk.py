"""`vmrun image build`: a bootable GPT disk of Debian packages, made without loop devices or mounts.

mmdebstrap installs systemd, cloud-init, sshd, the distribution's kernel and GRUB's
modules into a directory; a hook then customises it (fstab, GRUB's configuration, no SSH
host keys or machine id), copies GRUB's modules out and makes the ext4 root with
`mke2fs -d`, inside mmdebstrap's namespace, so no root privileges are needed where
mmdebstrap can use one. The disk gets a GPT: a BIOS boot partition with GRUB's core image
(x86), an EFI system partition with GRUB at the removable-media path (where the
architecture has UEFI), and the root partition with the Discoverable Partitions
Specification's type for the architecture, so `--boot fast` finds it. ppc64le and s390x
images have no boot loader yet: they run with `--boot fast` only.
"""

from __future__ import annotations

import shlex
import shutil
import struct
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vmrun import cache as cachelib
from vmrun.build.debootstrap import Bootstrap, check_host, finish, remove_work, run
from vmrun.debian import archive
from vmrun.errors import ImageError, UsageError
from vmrun.images.partitions import BIOS_BOOT, DPS_ROOT, ESP
from vmrun.qemu.arch import Arch

Notice = Callable[[str], None]

RECIPE = "disk-1"
SECTOR = 512
MIB = 1 << 20
ESP_SIZE = 32 * MIB
BIOS_BOOT_SIZE = 1 * MIB
DEFAULT_SIZE = 2048 * MIB
MIN_SIZE = 512 * MIB
MAX_SIZE = 2 << 40
FIRMWARES = ("bios", "uefi")
# What makes the image a cloud image: cloud-init and sshd (so --boot full and image bake
# work as on one), systemd as init, and what cloud-init needs to grow the root.
BASE_PACKAGES = (
    "systemd-sysv", "udev", "cloud-init", "openssh-server", "sudo", "iproute2",
    "systemd-resolved", "initramfs-tools", "e2fsprogs", "locales", "cloud-guest-utils",
)
GRUB_MODULES = ("part_gpt", "ext2", "search", "search_fs_uuid", "configfile", "normal",
                "linux", "echo", "test")
TOOLS = ("mke2fs", "sfdisk", "mkfs.vfat", "mmd", "mcopy", "grub-mkimage", "qemu-img")
TOOL_PACKAGES = "mmdebstrap e2fsprogs fdisk dosfstools mtools grub-common qemu-utils"


@dataclass(frozen=True)
class Layout:
    """How one architecture's disk boots."""

    kernel: str  # the kernel package
    console: str  # the kernel's console arguments
    efi_target: str | None  # GRUB's platform for the ESP; None: no UEFI boot
    efi_name: str  # the removable-media file name under EFI/BOOT
    efi_modules: tuple[str, ...] = ()
    bios: bool = False  # a BIOS boot partition with GRUB's i386-pc core image
    grub_packages: tuple[str, ...] = ()

    def firmwares(self) -> tuple[str, ...]:
        return tuple(f for f in FIRMWARES
                     if (f == "bios" and self.bios) or (f == "uefi" and self.efi_target))


LAYOUTS = {
    "x86_64": Layout("linux-image-cloud-amd64", "console=tty0 console=ttyS0,115200",
                     "x86_64-efi", "BOOTX64.EFI", ("all_video", "efi_gop"), bios=True,
                     grub_packages=("grub-pc-bin", "grub-efi-amd64-bin")),
    "i386": Layout("linux-image-686", "console=tty0 console=ttyS0,115200", "i386-efi",
                   "BOOTIA32.EFI", ("all_video", "efi_gop"), bios=True,
                   grub_packages=("grub-pc-bin", "grub-efi-ia32-bin")),
    "aarch64": Layout("linux-image-cloud-arm64", "console=ttyAMA0", "arm64-efi",
                      "BOOTAA64.EFI", grub_packages=("grub-efi-arm64-bin",)),
    "armv7": Layout("linux-image-armmp-lpae", "console=ttyAMA0", "arm-efi", "BOOTARM.EFI",
                    grub_packages=("grub-efi-arm-bin",)),
    "riscv64": Layout("linux-image-riscv64", "console=ttyS0", "riscv64-efi",
                      "BOOTRISCV64.EFI", grub_packages=("grub-efi-riscv64-bin",)),
    "ppc64le": Layout("linux-image-powerpc64le", "console=hvc0", None, ""),
    "s390x": Layout("linux-image-s390x", "console=ttysclp0", None, ""),
}

# Run by mmdebstrap with the root directory as $1, after the packages are installed:
# $2 the root filesystem's UUID, $3 the kernel's arguments, $4 the work directory.
CUSTOMIZE = r"""
set -e
root=$1 uuid=$2 args=$3 work=$4
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
printf 'UUID=%s / ext4 rw,discard,errors=remount-ro 0 1\n' "$uuid" > "$root/etc/fstab"
echo localhost > "$root/etc/hostname"
chroot "$root" systemctl enable systemd-networkd.service
sed -i 's/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/' "$root/etc/locale.gen"
chroot "$root" locale-gen >/dev/null
echo LANG=en_US.UTF-8 > "$root/etc/default/locale"
ln -sf /run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
mkdir -p "$root/boot/grub"
cat > "$root/boot/grub/grub.cfg" <<EOF
set timeout=0
insmod part_gpt
insmod ext2
search --no-floppy --fs-uuid --set=root $uuid
linux /vmlinuz root=UUID=$uuid $args
initrd /initrd.img
boot
EOF
for platform in "$root"/usr/lib/grub/*; do
    if [ -d "$platform" ]; then cp -a "$platform" "$work/grub-${platform##*/}"; fi
done
"""
# The last hook, after apt's lists are gone: $2 the UUID, $3 the image, $4 its size in KiB,
# $5 a scratch directory. mke2fs -d would copy what is mounted on the root while the hooks
# run (proc, sys, dev/pts) too: it reads a copy made of hard links that stays on the
# root's own file system instead (mmdebstrap's TMPDIR is the work directory, so the links
# can be made).
MAKE_ROOT = r"""
set -e
cp -ax --link "$1" "$5"
mke2fs -q -t ext4 -d "$5" -L root -U "$2" "$3" "$4k"
rm -rf "$5"
"""


@dataclass(frozen=True)
class DiskRecipe:
    """Every input of a built disk but the archive's state."""

    bootstrap: Bootstrap
    arch: str  # vmrun's name
    size: int  # bytes of the root partition
    firmware: tuple[str, ...]

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.arch]

    def recipe_key(self) -> str:
        """The key of every input but the archive's state."""
        return cachelib.key_of(RECIPE, repr(self), repr(self.layout), CUSTOMIZE, MAKE_ROOT,
                               repr(GRUB_MODULES))

    def key(self, state: archive.ArchiveState) -> str:
        return cachelib.key_of(self.recipe_key(), state.packages_sha256)

    def root_uuid(self, state: archive.ArchiveState) -> str:
        return str(uuid.UUID(self.key(state)[:32]))


def recipe(arch: Arch, *, suite: str, mirror: str, packages: Sequence[str] = (),
           size: int = DEFAULT_SIZE, firmware: Sequence[str] | None = None) -> DiskRecipe:
    """The recipe of ARCH's disk with PACKAGES beside the base set; UsageError for a
    size out of range or a firmware ARCH's disks cannot have."""
    layout = LAYOUTS.get(arch.name)
    if layout is None:
        raise UsageError(f"vmrun image build does not know {arch.name}",
                         hint=f"architectures: {', '.join(LAYOUTS)}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UsageError(f"--size must be from {MIN_SIZE // MIB}M to {MAX_SIZE >> 40}T")
    chosen = tuple(firmware) if firmware is not None else layout.firmwares()
    for name in chosen:
        if name not in layout.firmwares():
            raise UsageError(f"{arch.name} images cannot boot with {name}",
                             hint=f"{arch.name}: {', '.join(layout.firmwares()) or 'none'} "
                             "(an image without boot loader runs with --boot fast)")
    wanted = sorted({*BASE_PACKAGES, layout.kernel, *layout.grub_packages, *packages})
    bootstrap = Bootstrap(suite=suite, mirror=mirror.rstrip("/"), arch=arch.debian_arch,
                          packages=tuple(wanted), variant="apt", slim=False)
    return DiskRecipe(bootstrap=bootstrap, arch=arch.name, size=size,
                      firmware=tuple(f for f in FIRMWARES if f in chosen))


def build_disk(disk: DiskRecipe, state: archive.ArchiveState, out: Path) -> None:
    """Write DISK's qcow2 to OUT (a few minutes; longer for a foreign architecture)."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise ImageError(f"vmrun image build needs {', '.join(missing)}",
                         hint=f"apt install {TOOL_PACKAGES}")
    check_host(disk.bootstrap.arch)
    root_uuid = disk.root_uuid(state)
    layout = disk.layout
    work = Path(tempfile.mkdtemp(prefix="vmrun-build-", dir=out.parent))
    try:
        root_img = work / "root.img"
        args = f"ro {layout.console} net.ifnames=0"
        bootstrap = Bootstrap(
            suite=disk.bootstrap.suite, mirror=disk.bootstrap.mirror, arch=disk.bootstrap.arch,
            packages=disk.bootstrap.packages, variant=disk.bootstrap.variant, slim=False,
            customize=(hook(CUSTOMIZE, root_uuid, args, str(work)),),
            finish=(hook(MAKE_ROOT, root_uuid, str(root_img), str(disk.size // 1024),
                         str(work / "tree")),))
        log = work / "mmdebstrap.log"
        finish(bootstrap, run(bootstrap, "/dev/null", stdout=subprocess.DEVNULL, log=log,
                              tmpdir=work), log)
        esp_img = None
        if layout.efi_target is not None and "uefi" in disk.firmware:
            esp_img = work / "esp.img"
            make_esp(esp_img, work, root_uuid, layout=layout)
        core_img = None
        if layout.bios and "bios" in disk.firmware:
            core_img = work / "core.img"
            make_bios_core(core_img, work, root_uuid)
        raw = work / "disk.raw"
        assemble(raw, arch=disk.arch, core_img=core_img, esp_img=esp_img, root_img=root_img,
                 boot_img=work / "grub-i386-pc" / "boot.img")
        _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)])
    finally:
        remove_work(work)


def hook(script: str, *args: str) -> str:
    """A customize hook running SCRIPT with the root directory and ARGS as its arguments."""
    return f'sh -c {shlex.quote(script)} hook "$1" ' + " ".join(shlex.quote(a) for a in args)


def _run(argv: list[str], *, stdin: bytes | None = None) -> None:
    done = subprocess.run(argv, input=stdin, capture_output=True, check=False)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        raise ImageError(f"{argv[0]} failed (exit {done.returncode}): "
                         f"{last[-1] if last else 'no message'}")


def grub_embed_config(root_uuid: str) -> str:
    """GRUB's built-in configuration: find the root filesystem, read its grub.cfg."""
    return (f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
            "set prefix=($root)/boot/grub\nconfigfile ($root)/boot/grub/grub.cfg\n")


def make_esp(esp_img: Path, work: Path, root_uuid: str, *, layout: Layout) -> None:
    assert layout.efi_target is not None
    modules = work / f"grub-{layout.efi_target}"
    if not modules.is_dir():
        raise ImageError(f"the root has no GRUB modules for {layout.efi_target}")
    embed = work / "embed-efi.cfg"
    embed.write_text(grub_embed_config(root_uuid))
    efi = work / layout.efi_name
    _run(["grub-mkimage", "-O", layout.efi_target, "-d", str(modules), "-o", str(efi),
          "-p", "/boot/grub", "-c", str(embed), *GRUB_MODULES, *layout.efi_modules])
    _run(["mkfs.vfat", "-C", "-n", "EFI", str(esp_img), str(ESP_SIZE // 1024)])
    _run(["mmd", "-i", str(esp_img), "::EFI", "::EFI/BOOT"])
    _run(["mcopy", "-i", str(esp_img), str(efi), f"::EFI/BOOT/{layout.efi_name}"])


def make_bios_core(core_img: Path, work: Path, root_uuid: str) -> None:
    embed = work / "embed-bios.cfg"
    embed.write_text(grub_embed_config(root_uuid))
    _run(["grub-mkimage", "-O", "i386-pc", "-d", str(work / "grub-i386-pc"), "-o",
          str(core_img), "-p", "/boot/grub", "-c", str(embed), "biosdisk", *GRUB_MODULES])
    if core_img.stat().st_size > BIOS_BOOT_SIZE:
        raise ImageError("GRUB's core image does not fit the BIOS boot partition")


def assemble(raw: Path, *, arch: str, core_img: Path | None, esp_img: Path | None,
             root_img: Path, boot_img: Path) -> None:
    """The GPT disk: a BIOS boot partition holding CORE_IMG, the ESP (each unless None),
    and the root partition."""
    parts: list[tuple[str, uuid.UUID, int, Path | None]] = []
    if core_img is not None:
        parts.append(("bios", BIOS_BOOT, BIOS_BOOT_SIZE, None))
    if esp_img is not None:
        parts.append(("esp", ESP, ESP_SIZE, esp_img))
    parts.append(("root", DPS_ROOT[arch], root_img.stat().st_size, root_img))
    lba = MIB // SECTOR  # the first partition at 1 MiB, like every modern partitioner
    table = "label: gpt\n"
    places = []
    for name, kind, size, image in parts:
        table += f"start={lba}, size={size // SECTOR}, type={str(kind).upper()}, name={name}\n"
        places.append((lba, image))
        lba += size // SECTOR
    with open(raw, "wb") as f:
        f.truncate(lba * SECTOR + MIB)  # room for the backup GPT
    _run(["sfdisk", "--quiet", str(raw)], stdin=table.encode())
    with open(raw, "r+b") as disk:
        for start, image in places:
            if image is not None:
                disk.seek(start * SECTOR)
                with open(image, "rb") as src:
                    shutil.copyfileobj(src, disk, MIB)
        if core_img is not None:
            install_bios_boot(disk, core_img.read_bytes(), boot_img.read_bytes(),
                              core_lba=places[0][0])


def install_bios_boot(disk: BinaryIO, core: bytes, boot: bytes, *, core_lba: int) -> None:
    """What grub-bios-setup does for a GPT disk: boot.img's code in the MBR, pointing at
    core.img in the BIOS boot partition, whose first sector lists where the rest lies."""
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
