"""`vmrun test`: run a project's profiles (vmrun.toml) across architectures and shards."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from vmrun import config
from vmrun.cli.common import Parser, count
from vmrun.cli.run import split_command
from vmrun.cluster import Kind, engine_for, parse_cluster
from vmrun.errors import UsageError
from vmrun.matrix import first_failure
from vmrun.project import load, parse_shard, plan
from vmrun.project.plan import RunUnit
from vmrun.project.report import json_report, junit_xml, summary, write_json
from vmrun.project.runner import OnOutput, execute, run_units


def test_parser() -> Parser:
    parser = Parser(
        prog="vmrun test", usage="vmrun test [OPTIONS] [PROFILE...] [-- EXTRA ARGS]",
        description="Run the project's profiles (vmrun.toml, or [tool.vmrun] in "
        "pyproject.toml, found from the current directory upwards): every profile by "
        "default, on each of its architectures and shards, each in a fresh VM and a private "
        "copy of the project. EXTRA ARGS go after each profile's command. Collected files "
        "land in .vmrun/results/PROFILE/ARCH[/SHARD]/.")
    parser.add_argument("profiles", nargs="*", metavar="PROFILE")
    parser.add_argument("--project", type=Path, metavar="FILE",
                        help="the project file (default: found from here upwards)")
    parser.add_argument("--jobs", "-j", type=count("--jobs", config.MAX_JOBS),
                        default=os.cpu_count() or 1, help="how many VMs at once")
    parser.add_argument("--list", action="store_true",
                        help="print the runs instead of running them (with --json: one "
                        "JSON object per line, for a CI matrix)")
    parser.add_argument("--shard", type=parse_shard, metavar="I/N",
                        help="only the I-th of N equal slices of the runs (1-based)")
    parser.add_argument("--junit", type=Path, metavar="FILE",
                        help="write a JUnit XML report: a test case per run, and the test "
                        "cases of the JUnit files the profiles collect")
    parser.add_argument("--json", nargs="?", const="-", metavar="FILE",
                        help="with --list: JSON lines; else write the report as JSON to "
                        "FILE ('-': standard output)")
    parser.add_argument("--cluster", metavar="URL", default="local",
                        help="where the runs go: local (the default: processes on this "
                        "host), dask://HOST:PORT (a Dask scheduler) or slurm://[PARTITION]; "
                        "the project must be on a filesystem every node mounts")
    parser.add_argument("--unit", metavar="ID", help="run just this run, here (what each "
                        "run's argv does; see --list)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no summary table")
    return parser


def cmd_test(argv: Sequence[str]) -> int:
    options, extra = split_command(argv)
    args = test_parser().parse_args(options)
    spec = parse_cluster(args.cluster)
    project = load(file=args.project)
    if args.unit is not None:
        return execute(_one_unit(plan(project, extra=extra), args.unit))
    units = plan(project, args.profiles, shard=args.shard, extra=extra)
    for report_file in (args.junit, None if args.json in (None, "-") else Path(args.json)):
        if report_file is not None and not report_file.parent.is_dir():
            raise UsageError(f"cannot write {report_file}: {report_file.parent} is not a "
                             "directory")
    if args.list:
        lines = "".join(json.dumps(unit.as_json()) + "\n" if args.json else
                        f"{unit.id}  {' '.join(unit.run_argv)}\n" for unit in units)
        if args.json in (None, "-"):
            sys.stdout.write(lines)
        else:
            Path(args.json).write_text(lines)
        return 0
    if units:
        results = run_units(units, args.jobs, writer(units), engine_for(spec))
    else:
        results = []
        print("vmrun test: no runs in this slice", file=sys.stderr)
    code = first_failure([result.exit_code for result in results])
    if not args.quiet and results:
        print(summary(units, results, placement=spec.kind is not Kind.LOCAL),
              file=sys.stderr)
    if args.junit is not None:
        args.junit.write_bytes(junit_xml(units, results))
    if args.json is not None:
        report = json_report(units, results, code)
        if args.json == "-":
            print(json.dumps(report, indent=2))
        else:
            write_json(Path(args.json), report)
    return code


def _one_unit(units: Sequence[RunUnit], ident: str) -> RunUnit:
    for unit in units:
        if unit.id == ident:
            return unit
    raise UsageError(f"no run {ident!r} in this project", hint="vmrun test --list")


def writer(units: Sequence[RunUnit]) -> OnOutput:
    """Each line to its stream, prefixed with its run's id (padded to the longest)."""
    width = max((len(unit.id) for unit in units), default=0)

    def write(ident: str, fd: int, line: bytes) -> None:
        os.write(fd, f"[{ident:<{width}}] ".encode() + line + b"\n")

    return write
