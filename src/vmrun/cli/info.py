"""`vmrun info`: what vmrun would use on this machine (QEMU, accelerator, guest kernel)."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from typing import Any

from vmrun import __version__
from vmrun import cache as cachelib
from vmrun.cli.common import Parser
from vmrun.guest.build import ensure_guest
from vmrun.machine import notice_stderr
from vmrun.progress import reporter
from vmrun.qemu import accel as accellib
from vmrun.qemu import process
from vmrun.qemu.arch import host_arch, lookup_arch
from vmrun.spec import Accel


def info_parser() -> Parser:
    parser = Parser(prog="vmrun info", description="What vmrun would use on this machine.")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--arch")
    parser.add_argument("--mirror")
    parser.add_argument("--insecure-unverified-guest", action="store_true")
    return parser


def cmd_info(argv: Sequence[str]) -> int:
    args = info_parser().parse_args(argv)
    arch = lookup_arch(args.arch or host_arch())
    qemu = process.find_qemu(arch)
    with reporter() as progress:
        guest = ensure_guest(arch, mirror=args.mirror, notice=notice_stderr,
                             insecure_unverified_guest=args.insecure_unverified_guest,
                             progress=progress)

    choice = accellib.choose_for_guest(Accel.AUTO, arch, guest.kernel, guest.initrd)
    info: dict[str, Any] = {
        "vmrun_version": __version__,
        "qemu": qemu,
        "qemu_version": process.qemu_version(qemu),
        "accel": str(choice.accel),
        "accel_reason": choice.reason,
        "host_arch": host_arch(),
        "host_os": platform.system(),
        "arch": arch.name,
        "kernel": str(guest.kernel),
        "kernel_release": guest.release,
        "initrd": str(guest.initrd),
        "cache_dir": str(cachelib.cache_dir()),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0
