"""`vmrun doctor`: what runs need on this host, each problem with its fix."""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence

from vmrun import doctor
from vmrun.cli.common import Parser
from vmrun.qemu.arch import host_arch, lookup_arch

MARKS = {doctor.Status.OK: "ok", doctor.Status.WARN: "warn", doctor.Status.UNKNOWN: "??",
         doctor.Status.FAIL: "FAIL"}


def doctor_parser() -> Parser:
    parser = Parser(
        prog="vmrun doctor",
        description="Check what runs need on this host (QEMU per architecture, KVM or HVF, "
        "firmware, virtiofsd, signature checking, the cache), downloading and booting "
        "nothing; each problem with its fix.",
        epilog="exit status: 0 when everything runs of the host's architecture (or of the "
        "--arch ones) need is there, 1 otherwise; 125 on bad usage",
    )
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument("--arch", metavar="A,...", help="check these architectures only "
                        "(each then required); default: all, the host's required")
    return parser


def cmd_doctor(argv: Sequence[str]) -> int:
    args = doctor_parser().parse_args(argv)
    arches = ([lookup_arch(name) for name in args.arch.split(",") if name]
              if args.arch else None)
    checks = doctor.run_checks(arches)
    healthy = doctor.healthy(checks)
    if args.json:
        print(json.dumps({"host": {"arch": host_arch(), "system": platform.system()},
                          "ok": healthy, "checks": [check.as_json() for check in checks]},
                         indent=2))
    else:
        print(render(checks, healthy))
    return 0 if healthy else 1


def render(checks: Sequence[doctor.Check], healthy: bool) -> str:
    width = max(len(check.name) for check in checks)
    lines = [f"host: {host_arch()}, {platform.system()}"]
    for check in checks:
        lines.append(f"{MARKS[check.status]:<4}  {check.name:<{width}}  {check.detail}")
        if check.fix and check.status != doctor.Status.OK:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {check.fix}")
    failed = [check.name for check in checks if check.required
              and check.status == doctor.Status.FAIL]
    lines.append("ready: everything needed is here" if healthy
                 else f"not ready: {', '.join(failed)}")
    return "\n".join(lines)
