"""Images from packages: `vmrun image build` against the hand-written recipe, and a cached
`--packages` run against a plain one.

    python bench/build.py [--runs N] [--skip-build]

(a) `vmrun image build --packages python3 --refresh` against the recipe it replaces, run
    by hand on the same suite and packages: mmdebstrap to a tarball, the tarball unpacked,
    `mke2fs -d`, sfdisk, GRUB's images written into place, qemu-img convert (target: at
    most 1.1x); both download the same packages from the same mirror, alternated;
(b) a cached `vmrun --packages python3 -- python3 -c pass` against a cached
    `vmrun -- true` (target: at most 1.3x), alternated, medians; and `--packages python3
    -- true`, to tell the root's own cost from Python's start-up in the guest;
and the sizes: the built disk (qcow2, allocated), the --packages root (squashfs).
Both builds run as root here (mmdebstrap's root mode); the hand recipe needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

from vmrun.build import disk  # noqa: E402
from vmrun.debian import mirror_from_env  # noqa: E402
from vmrun.qemu.arch import lookup_arch  # noqa: E402

# Time vmrun as an installed one runs: with its bytecode cached (a pip install compiles
# it), even where the environment asks Python to write none.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

BUILD_TARGET = 1.1
RUN_TARGET = 1.3
SUITE = "bookworm"
NAME = "bench-build"


def vmrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmrun", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def timed(argv: list[str], **kwargs: object) -> float:
    started = time.monotonic()
    subprocess.run(argv, check=True, env=env(), stdout=subprocess.DEVNULL,
                   **kwargs)  # type: ignore[call-overload]
    return time.monotonic() - started


# The recipe vmrun's builder replaces, as one would write it by hand (root needed).
HAND_RECIPE = r"""
set -e
work=$1 mirror=$2 packages=$3 uuid=$(cat /proc/sys/kernel/random/uuid)
cd "$work"
mmdebstrap --quiet --variant=apt --include="$packages" bookworm root.tar "$mirror"
mkdir root && tar -C root -xpf root.tar
cat > root/etc/fstab <<EOF
UUID=$uuid / ext4 rw,errors=remount-ro 0 1
EOF
mkdir -p root/boot/grub
cat > root/boot/grub/grub.cfg <<EOF
set timeout=0
search --no-floppy --fs-uuid --set=root $uuid
linux /vmlinuz root=UUID=$uuid ro console=ttyS0
initrd /initrd.img
boot
EOF
mke2fs -q -t ext4 -d root -U "$uuid" root.img 2G
printf 'search --fs-uuid --set=root %s\nconfigfile ($root)/boot/grub/grub.cfg\n' "$uuid" > e.cfg
grub-mkimage -O x86_64-efi -d root/usr/lib/grub/x86_64-efi -o BOOTX64.EFI -p /boot/grub \
    -c e.cfg part_gpt ext2 search search_fs_uuid configfile normal linux
grub-mkimage -O i386-pc -d root/usr/lib/grub/i386-pc -o core.img -p /boot/grub -c e.cfg \
    biosdisk part_gpt ext2 search search_fs_uuid configfile normal linux
mkfs.vfat -C -n EFI esp.img 32768 >/dev/null
mmd -i esp.img ::EFI ::EFI/BOOT && mcopy -i esp.img BOOTX64.EFI ::EFI/BOOT/BOOTX64.EFI
truncate -s 2083M disk.raw
printf 'label: gpt\nstart=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\n'\
'start=4096, size=65536, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n'\
'start=69632, size=4194304, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709\n' | sfdisk -q disk.raw
dd if=root/usr/lib/grub/i386-pc/boot.img of=disk.raw bs=440 count=1 conv=notrunc status=none
dd if=core.img of=disk.raw bs=512 seek=2048 conv=notrunc status=none
dd if=esp.img of=disk.raw bs=512 seek=4096 conv=notrunc status=none
dd if=root.img of=disk.raw bs=512 seek=69632 conv=notrunc status=none
qemu-img convert -q -f raw -O qcow2 disk.raw disk.qcow2
"""


def packages() -> str:
    recipe = disk.recipe(lookup_arch("x86_64"), suite=SUITE, mirror=mirror_from_env(),
                         packages=("python3",))
    return ",".join(recipe.bootstrap.packages)


def hand_build(work: Path) -> float:
    return timed(["sh", "-c", HAND_RECIPE, "hand", str(work), mirror_from_env(), packages()])


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def stored_size(name: str) -> int:
    listed = json.loads(subprocess.run(vmrun("image", "ls", "--json"), capture_output=True,
                                       env=env(), check=True).stdout)
    return int(next(entry["size"] for entry in listed if entry["name"] == name))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="builds of each (default 1)")
    parser.add_argument("--run-samples", type=int, default=5)
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args()
    if not args.skip_build:
        ours, theirs = [], []
        for _ in range(args.runs):
            ours.append(timed(vmrun("image", "build", "--name", NAME, "--packages", "python3",
                                    "--suite", SUITE, "--refresh")))
            with tempfile.TemporaryDirectory(prefix="bench-hand-", dir="/var/tmp") as work:
                theirs.append(hand_build(Path(work)))
                hand_size = allocated(Path(work) / "disk.qcow2")
        ratio = statistics.median(ours) / statistics.median(theirs)
        print(f"(a) image build --packages python3: vmrun {statistics.median(ours):.1f}s, "
              f"hand recipe {statistics.median(theirs):.1f}s: {ratio:.2f}x "
              f"(target at most {BUILD_TARGET}x) "
              f"{'MET' if ratio <= BUILD_TARGET else 'NOT MET'}")
        print(f"    sizes: vmrun's qcow2 {stored_size(NAME) / 1e6:.0f} MB, the hand recipe's "
              f"{hand_size / 1e6:.0f} MB")
    timed(vmrun("--packages", "python3", "--", "true"))  # build or find the root, and warm
    timed(vmrun("--", "true"))
    packaged, root_only, plain = [], [], []
    for _ in range(args.run_samples):
        packaged.append(timed(vmrun("--packages", "python3", "--", "python3", "-c", "pass")))
        root_only.append(timed(vmrun("--packages", "python3", "--", "true")))
        plain.append(timed(vmrun("--", "true")))
    base = statistics.median(plain)
    ratio = statistics.median(packaged) / base
    print(f"    the --packages python3 root (squashfs): "
          f"{stored_size('packages:' + SUITE + '/amd64:python3') / 1e6:.0f} MB")
    print(f"(b) cached --packages python3 -- python3 -c pass {statistics.median(packaged):.2f}s,"
          f" vmrun -- true {base:.2f}s: {ratio:.2f}x (target at most "
          f"{RUN_TARGET}x) {'MET' if ratio <= RUN_TARGET else 'NOT MET'}")
    print(f"    of which the root: --packages python3 -- true "
          f"{statistics.median(root_only):.2f}s, {statistics.median(root_only) / base:.2f}x; "
          "the rest is python3 starting in the guest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
