"""`vmrun image build` and `vmrun image export`: disks from packages, and disks for elsewhere."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vmrun.build.debootstrap import check_suite, parse_packages
from vmrun.build.disk import DEFAULT_SIZE, FIRMWARES, MIB
from vmrun.cli.common import Parser, seconds
from vmrun.errors import UsageError
from vmrun.images.disk import parse_size
from vmrun.images.store import StoredImage
from vmrun.machine import notice_stderr
from vmrun.qemu.arch import host_arch, lookup_arch
from vmrun.userfiles import read_user_file

EXPORT_FORMATS = ("raw", "qcow2", "vmdk", "vhdx")


def cmd_build(argv: Sequence[str]) -> int:
    parser = Parser(prog="vmrun image build", description="Build a bootable disk from Debian "
                    "(or Ubuntu) packages, without root or loop devices, and store it as "
                    "NAME: GPT, GRUB for BIOS and UEFI where the architecture has them, the "
                    "distribution's kernel, cloud-init and sshd (so --boot full and image "
                    "bake work), the root partition typed for --boot fast. The same inputs "
                    "and archive state give the stored image at once.")
    parser.add_argument("--name", required=True)
    parser.add_argument("--arch", help="guest architecture (default: the host's); a "
                        "foreign one needs qemu-user-static registered with binfmt_misc")
    parser.add_argument("--suite", help="default: the suite vmrun's guest kernel for the "
                        "architecture comes from")
    parser.add_argument("--mirror", help="default $VMRUN_DEBIAN_MIRROR or "
                        "http://deb.debian.org/debian")
    parser.add_argument("--packages", metavar="P,...", help="packages beside the base set")
    parser.add_argument("--size", default=f"{DEFAULT_SIZE // MIB}M",
                        help="size of the root partition (default 2G)")
    parser.add_argument("--firmware", metavar="bios,uefi", help="boot loaders to install "
                        "(default: every one the architecture has)")
    parser.add_argument("--user-data", type=Path, help="then bake it with this cloud-init "
                        "user-data: the built disk is stored as NAME-base, the bake as NAME")
    parser.add_argument("--timeout", type=seconds("--timeout"), default=1800.0,
                        help="with --user-data: seconds the bake may take (default 1800)")
    parser.add_argument("--refresh", action="store_true",
                        help="build again even when the same inputs were built before")
    args = parser.parse_args(list(argv))
    from vmrun.build.image import build_image

    arch = lookup_arch(args.arch or host_arch())
    firmware = None
    if args.firmware is not None:
        firmware = [f for f in args.firmware.split(",") if f]
        for name in firmware:
            if name not in FIRMWARES:
                raise UsageError(f"bad --firmware {name!r}", hint="bios, uefi or both")
    user_data = read_user_file(args.user_data, "user-data") if args.user_data else None
    name = f"{args.name}-base" if user_data is not None else args.name
    built = build_image(
        name, arch=arch, suite=check_suite(args.suite) if args.suite else None,
        mirror=args.mirror,
        packages=parse_packages(args.packages) if args.packages else (),
        size=parse_size(args.size), firmware=firmware, refresh=args.refresh,
        notice=notice_stderr)
    notice_stderr(f"{name}: built in {built.seconds:.0f}s" if built.built else
                  f"{name} is up to date (built before from the same inputs and archive "
                  f"state, {built.state.date})")
    image = built.image
    if user_data is not None:
        image = _bake(name, args.name, user_data, arch.name, args.timeout)
    print(f"{image.name}  sha256:{image.digest}")
    return 0


def _bake(base: str, name: str, user_data: bytes, arch: str, timeout: float) -> StoredImage:
    from vmrun.bake import bake
    from vmrun.fullboot import FullOptions
    from vmrun.spec import Boot, MachineSpec

    image, built = bake(base, name=name, user_data=user_data, spec=MachineSpec(
        arch=arch, boot=Boot.FULL), options=FullOptions(), timeout=timeout,
        notice=notice_stderr)
    if not built:
        notice_stderr(f"{name} is up to date (baked before from the same inputs)")
    return image


def cmd_export(argv: Sequence[str]) -> int:
    parser = Parser(prog="vmrun image export", description="Write a stored image, its layer "
                    "chain flattened, as one standalone disk for another hypervisor or a "
                    "cloud.")
    parser.add_argument("name", help="a stored image (name or digest)")
    parser.add_argument("file", type=Path, help="the new file (must not exist)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="qcow2")
    args = parser.parse_args(list(argv))
    from vmrun.images import disk, store

    image = store.resolve(args.name)
    disk.convert(image.path, args.file, src_format=image.format or "qcow2",
                 dst_format=args.format, follow_backing=bool(image.backing))
    notice_stderr(f"{args.file}: {args.format}, {args.file.stat().st_size / 1e6:.0f} MB")
    return 0
