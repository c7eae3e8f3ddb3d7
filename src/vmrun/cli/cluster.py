"""`vmrun cluster worker dask://HOST:PORT` and `vmrun cluster probe`."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from vmrun.cache import cache_dir
from vmrun.cli.common import Parser
from vmrun.cluster import Kind, parse_cluster
from vmrun.cluster.worker import advertised, probe_host, resources_option, serve
from vmrun.errors import UsageError
from vmrun.spec import parse_memory


def cluster_parser() -> Parser:
    parser = Parser(prog="vmrun cluster",
                    description="Serve vmrun runs on a cluster (see --cluster of vmrun run).")
    sub = parser.add_subparsers(dest="action", required=True)
    for action, text in (("worker", "start a Dask worker that advertises this host's "
                          "emulators, KVM and memory as resources"),
                         ("probe", "print the resources a worker here would advertise")):
        p = sub.add_parser(action, help=text, description=text)
        if action == "worker":
            p.add_argument("scheduler", metavar="dask://HOST:PORT")
            p.add_argument("--name", help="the worker's name (default: Dask's)")
        p.add_argument("--slots", type=int, help="runs at once (default: the cores)")
        p.add_argument("--memory", help="guest memory to hand out (default: the host's)")
        if action == "probe":
            p.add_argument("--json", action="store_true", help="as JSON")
    return parser


def cmd_cluster(argv: Sequence[str]) -> int:
    args = cluster_parser().parse_args(argv)
    probe = probe_host(cache_dir())
    slots = args.slots if args.slots is not None else probe.cores
    if slots < 1:
        raise UsageError(f"--slots must be at least 1, not {slots}")
    resources = advertised(probe, slots,
                           parse_memory(args.memory) if args.memory is not None else None)
    if args.action == "probe":
        print(json.dumps(resources, sort_keys=True) if args.json
              else resources_option(resources))
        return 0
    spec = parse_cluster(args.scheduler)
    if spec.kind is not Kind.DASK:
        raise UsageError(f"vmrun cluster worker serves a Dask scheduler, not {spec}",
                         hint="vmrun cluster worker dask://HOST:PORT")
    print(f"vmrun: worker for {spec}: {resources_option(resources)}", file=sys.stderr)
    serve(spec, slots, resources, args.name)
    return 0
