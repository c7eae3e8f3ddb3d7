"""`vmrun seed OUTPUT.iso --user-data FILE ...`: write a cloud-init NoCloud seed ISO."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from vmrun import seed
from vmrun.cli.common import Parser
from vmrun.errors import UsageError
from vmrun.userfiles import read_user_file


def seed_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vmrun seed",
                    description="Write a cloud-init NoCloud seed ISO (volume label cidata).")
    parser.add_argument("output", type=Path, metavar="OUTPUT.iso")
    parser.add_argument("--user-data", type=Path, required=True, metavar="FILE",
                        help="#cloud-config, a script (#!), or MIME multipart")
    parser.add_argument("--meta-data", type=Path, metavar="FILE",
                        help="YAML merged into the generated meta-data")
    parser.add_argument("--network-config", type=Path, metavar="FILE",
                        help="network config (version 1 or 2) YAML")
    parser.add_argument("--instance-id", metavar="ID",
                        help="pin the instance id (default: the meta-data's, else a fresh one)")
    parser.add_argument("--hostname", metavar="NAME",
                        help="local-hostname (default: the meta-data's, else vmrun)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    return parser


def cmd_seed(argv: Sequence[str]) -> int:
    args = seed_parser().parse_args(list(argv))
    output: Path = args.output
    if not args.force and (output.exists() or output.is_symlink()):
        raise UsageError(f"{output} already exists", hint="pass --force to replace it")
    if not output.parent.is_dir():
        raise UsageError(f"{output.parent} is not a directory",
                         hint="create the output's directory first")

    user_data = read_input(args.user_data, "--user-data")
    seed.validate_user_data(user_data)
    user_meta = read_input(args.meta_data, "--meta-data") if args.meta_data else None
    meta = seed.meta_data(instance_id=args.instance_id, hostname=args.hostname,
                          user_meta=user_meta)
    network = None
    if args.network_config:
        network = read_input(args.network_config, "--network-config")
        seed.validate_network_config(network)

    seed.write_seed(output, user_data=user_data, meta_data=meta, network_config=network)
    print(seed.instance_id_of(meta))
    return 0


def read_input(path: Path, option: str) -> bytes:
    return read_user_file(path, option)
