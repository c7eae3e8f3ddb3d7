"""`vmrun image bake`: provision an image once with cloud-init and keep the result as a layer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vmrun.cli.common import Parser, count, digest_text, seconds
from vmrun.machine import notice_stderr
from vmrun.qemu.firmware import Firmware
from vmrun.spec import MAX_CPUS, Accel, Boot, MachineSpec, Net, parse_memory
from vmrun.userfiles import read_user_file


def bake_parser() -> Parser:
    parser = Parser(prog="vmrun image bake", description="Boot BASE once with USER-DATA "
                    "(cloud-init), wait until it powers off, and store the result as the "
                    "layer NAME on top of BASE. Unchanged inputs are not baked again.")
    parser.add_argument("base", help="a stored image, an image file or an alias")
    parser.add_argument("--user-data", type=Path, required=True)
    parser.add_argument("--meta-data", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--timeout", type=seconds("--timeout"), default=1800.0,
                        help="seconds until the guest must have powered off (default 1800)")
    parser.add_argument("--arch")
    parser.add_argument("--cpus", type=count("--cpus", MAX_CPUS), default=1)
    parser.add_argument("--memory", default="1G")
    parser.add_argument("--accel", choices=[a.value for a in Accel], default="auto")
    parser.add_argument("--firmware", choices=[f.value for f in Firmware], default="auto")
    parser.add_argument("--net", choices=[n.value for n in Net], default="user")
    parser.add_argument("--quiet", "-q", action="store_true", help="do not show the console")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def cmd_bake(argv: Sequence[str]) -> int:
    args = bake_parser().parse_args(argv)
    from vmrun.bake import bake
    from vmrun.fullboot import FullOptions

    spec = MachineSpec(arch=args.arch, cpus=args.cpus, memory_mib=parse_memory(args.memory),
                       accel=Accel(args.accel), net=Net(args.net), console=not args.quiet,
                       keep=args.keep, verbose=args.verbose, boot=Boot.FULL)
    user_data = read_user_file(args.user_data, "user-data")
    meta_data = read_user_file(args.meta_data, "meta-data") if args.meta_data else None
    image, built = bake(args.base, name=args.name, user_data=user_data, meta_data=meta_data,
                        spec=spec, options=FullOptions(firmware=Firmware(args.firmware)),
                        timeout=args.timeout, notice=notice_stderr)
    if not built:
        notice_stderr(f"{args.name} is up to date (baked before from the same inputs)")
    print(f"{image.name}  {digest_text(image.digest)}")
    return 0
