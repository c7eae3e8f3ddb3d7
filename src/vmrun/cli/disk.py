"""`vmrun disk ...`: create, inspect and transform disk images with qemu-img."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from vmrun.cli.common import Parser
from vmrun.errors import UsageError
from vmrun.images import disk
from vmrun.progress import percent

FORMATS = [f.value for f in disk.Format]
DETECTED = "default: qcow2 if its header says so, else raw"
FOLLOW = ("read the backing files its header names even though its format was guessed "
          "(naming the format says so too); never json: or protocol names")


def follow_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--follow-backing", action="store_true", help=FOLLOW)


def disk_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vmrun disk", description="Create, inspect and transform disk images.")
    sub = parser.add_subparsers(dest="op", required=True, metavar="OPERATION",
                                parser_class=Parser)

    p = sub.add_parser("create", help="a new empty image")
    p.add_argument("path", type=Path, metavar="PATH")
    p.add_argument("size", metavar="SIZE", help="like 10G, 512M or bytes")
    p.add_argument("--format", default="qcow2", choices=FORMATS)

    p = sub.add_parser("overlay", help="a new qcow2 overlay on BASE")
    p.add_argument("base", type=Path, metavar="BASE")
    p.add_argument("new", type=Path, metavar="NEW")
    p.add_argument("--base-format", choices=FORMATS,
                   help="BASE's format (" + DETECTED + ")")
    follow_option(p)

    p = sub.add_parser("chain", help="list the backing chain, top first")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("commit", help="write an overlay's changes into its base")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--format", choices=FORMATS, help=DETECTED)
    follow_option(p)

    p = sub.add_parser("rebase", help="give an overlay another base, or none")
    p.add_argument("file", type=Path, metavar="FILE")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--base", type=Path, metavar="B")
    target.add_argument("--standalone", action="store_true",
                        help="copy the base's data in and drop the backing file")
    p.add_argument("--base-format", choices=FORMATS)
    p.add_argument("--unsafe", action="store_true",
                   help="only rewrite the backing file name (the base was moved)")
    p.add_argument("--format", choices=FORMATS, help="FILE's format (" + DETECTED + ")")
    follow_option(p)

    p = sub.add_parser("flatten", help="the whole chain as one standalone image")
    p.add_argument("src", type=Path, metavar="SRC")
    p.add_argument("dst", type=Path, metavar="DST")
    p.add_argument("--format", default="qcow2", choices=FORMATS)
    p.add_argument("--from", dest="from_", choices=FORMATS,
                   help="SRC's format (" + DETECTED + ")")
    follow_option(p)

    p = sub.add_parser("snapshot", help="internal qcow2 snapshots")
    p.add_argument("action", choices=["create", "list", "apply", "delete"])
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--json", action="store_true", help="list: one JSON array on stdout")

    p = sub.add_parser("convert", help="copy into another format")
    p.add_argument("src", type=Path, metavar="SRC")
    p.add_argument("dst", type=Path, metavar="DST")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--from", dest="from_", choices=FORMATS,
                   help="SRC's format (" + DETECTED + ")")
    p.add_argument("--compress", action="store_true", help="compressed clusters (qcow2 only)")
    follow_option(p)

    p = sub.add_parser("compact", help="drop unused and zeroed clusters")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--output", type=Path, metavar="DST", help="write here instead of in place")
    p.add_argument("--format", choices=FORMATS, help=DETECTED)
    follow_option(p)

    p = sub.add_parser("resize", help="change the virtual size")
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("size", metavar="SIZE")
    p.add_argument("--shrink", action="store_true", help="allow a smaller size (loses data)")
    p.add_argument("--format", choices=FORMATS, help=DETECTED)
    follow_option(p)
    return parser


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())


def cmd_disk(argv: Sequence[str]) -> int:
    """`vmrun disk ARGV`. A format left out is read from the header (qcow2 or raw), and
    a guessed format never makes vmrun read another file: see disk.chain_for_reading."""
    args = disk_parser().parse_args(argv)
    op: str = args.op
    if op == "create":
        disk.create(args.path, args.size, args.format)
    elif op == "chain":
        show_chain(disk.chain(args.file), as_json=args.json)
    elif op == "snapshot":
        return snapshot(args.action, args.file, args.name, as_json=args.json)
    elif op == "resize":
        disk.resize(args.file, args.size, fmt=args.format, shrink=args.shrink,
                    follow_backing=args.follow_backing)
    elif op == "overlay":
        disk.overlay(args.base, args.new, base_format=args.base_format,
                     follow_backing=args.follow_backing)
    else:
        with percent(op) as progress:
            transform(op, args, progress)
    return 0


def transform(op: str, args: argparse.Namespace, progress: Callable[[float], None] | None) -> None:
    """The operations that move image data, with a progress line."""
    follow: bool = args.follow_backing
    if op == "commit":
        disk.commit(args.file, args.format, follow_backing=follow, progress=progress)
    elif op == "rebase":
        if args.standalone and args.base_format:
            raise UsageError("--base-format goes with --base, not --standalone")
        disk.rebase(args.file, args.base, base_format=args.base_format, unsafe=args.unsafe,
                    fmt=args.format, follow_backing=follow, progress=progress)
    elif op == "flatten":
        disk.flatten(args.src, args.dst, dst_format=args.format, src_format=args.from_,
                     follow_backing=follow, progress=progress)
    elif op == "convert":
        disk.convert(args.src, args.dst, src_format=args.from_, dst_format=args.to,
                     compress=args.compress, follow_backing=follow, progress=progress)
    elif op == "compact":
        disk.compact(args.file, args.output, fmt=args.format, follow_backing=follow,
                     progress=progress)


def show_chain(layers: list[disk.Layer], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([{**dataclasses.asdict(layer), "path": str(layer.path)}
                          for layer in layers], indent=2))
        return
    rows = [["PATH", "FORMAT", "VIRTUAL", "ACTUAL", "BACKING"]]
    rows += [[str(layer.path), layer.format, human(layer.virtual_size),
              human(layer.actual_size), layer.backing or "-"] for layer in layers]
    print_table(rows)


def snapshot_json(found: disk.Snapshot) -> dict[str, object]:
    return {"id": found.id, "name": found.name, "date": found.date.isoformat(),
            "vm_state_size": found.vm_state_size, "vm_clock_ns": found.vm_clock_ns}


def snapshot(action: str, path: Path, name: str | None, *, as_json: bool = False) -> int:
    if as_json and action != "list":
        raise UsageError(f"--json goes with snapshot list, not snapshot {action}")
    if action == "list":
        if name is not None:
            raise UsageError("snapshot list takes no NAME")
        snapshots = disk.snapshot_list(path)
        if as_json:
            print(json.dumps(list(map(snapshot_json, snapshots)), indent=2))
        elif snapshots:
            rows = [["ID", "NAME", "DATE", "VM STATE"]]
            rows += [[s.id, s.name, s.date.strftime("%Y-%m-%d %H:%M:%S UTC"),
                      human(s.vm_state_size)] for s in snapshots]
            print_table(rows)
        return 0
    if name is None:
        raise UsageError(f"snapshot {action} needs a NAME")
    if action == "create":
        disk.snapshot_create(path, name)
    elif action == "apply":
        disk.snapshot_apply(path, name)
    else:
        disk.snapshot_delete(path, name)
    return 0
