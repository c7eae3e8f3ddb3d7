"""`vmrun template ls|rm|prune`: the memory templates warm starts restore from."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

from vmrun.cli.common import Parser
from vmrun.errors import UsageError
from vmrun.warm import store


def template_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vmrun template", description="List and remove the memory templates "
                    "that warm starts restore from (one per machine shape, made by the first "
                    "run of that shape).")
    sub = parser.add_subparsers(dest="op", required=True, metavar="OPERATION",
                                parser_class=Parser)
    p = sub.add_parser("ls", help="list templates, their size on disk and last use")
    p.add_argument("--json", action="store_true", help="one JSON array")
    p = sub.add_parser("rm", help="remove a template (runs in progress keep their copy)")
    p.add_argument("key", nargs="+", metavar="KEY", help="a key, or a unique prefix of one")
    p = sub.add_parser("prune", help="remove templates unused for a while, unreadable ones "
                       "and what interrupted makers left")
    p.add_argument("--unused-days", type=float, default=30.0, metavar="DAYS",
                   help="remove templates not used for DAYS days (default 30; 0: all)")
    return parser


def _ago(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return "just now"


def _show(as_json: bool) -> None:
    rows = [store.listing(t) for t in store.all_templates()]
    if as_json:
        print(json.dumps([row.to_json() for row in rows], indent=1))
        return
    now = time.time()
    print(f"{'KEY':<32}  {'ARCH':<8} {'ACCEL':<5} {'MEMORY':>7} {'SHARE':<5} "
          f"{'SIZE':>9}  LAST USED")
    for row in rows:
        print(f"{row.key:<32}  {row.arch:<8} {row.accel:<5} {row.memory_mib:>6}M "
              f"{row.share:<5} {row.size / 2**20:>7.1f}M  {_ago(now - row.last_used)}")


def _lookup(prefix: str) -> store.Template:
    found = [t for t in store.all_templates() if t.key.startswith(prefix)]
    if len(found) != 1:
        what = "no template" if not found else f"{len(found)} templates"
        raise UsageError(f"{what} with key {prefix!r}", hint="see vmrun template ls")
    return found[0]


def cmd_template(argv: Sequence[str]) -> int:
    args = template_parser().parse_args(list(argv))
    if args.op == "ls":
        _show(args.json)
    elif args.op == "rm":
        for template in [_lookup(prefix) for prefix in args.key]:
            store.remove(template)
            print(f"removed {template.key}")
    else:
        if args.unused_days < 0:
            raise UsageError("--unused-days must not be negative")
        for key in store.prune(args.unused_days):
            print(f"removed {key}")
    return 0
