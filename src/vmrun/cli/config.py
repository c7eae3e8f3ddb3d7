"""`vmrun config check`: read and check the project file, print its resolved profiles."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Any

from vmrun.cli.common import Parser
from vmrun.project import Profile, load


def config_parser() -> Parser:
    parser = Parser(prog="vmrun config", description="Work with the project file "
                    "(vmrun.toml, or [tool.vmrun] in pyproject.toml).")
    commands = parser.add_subparsers(dest="action", required=True, metavar="check")
    check = commands.add_parser("check", help="check every key without running anything "
                                "and print the resolved profiles (extends applied)")
    check.add_argument("--project", type=Path, metavar="FILE",
                       help="the project file (default: found from here upwards)")
    check.add_argument("--json", action="store_true", help="print them as JSON")
    return parser


def profile_json(profile: Profile) -> dict[str, Any]:
    """PROFILE as JSON values (paths and enums as strings, arch resolved)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple | list):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    data = {key: plain(value) for key, value in asdict(profile).items()}
    data["arch"] = list(profile.arches)
    data["env"] = dict(profile.env)
    return data


def cmd_config(argv: Sequence[str]) -> int:
    args = config_parser().parse_args(argv)
    project = load(file=args.project)
    profiles = {name: profile_json(p) for name, p in project.profiles.items()}
    if args.json:
        print(json.dumps({"file": str(project.path), "root": str(project.root),
                          "profiles": profiles}, indent=2))
        return 0
    print(f"{project.path}: {len(profiles)} profile(s), all keys valid")
    for name, data in profiles.items():
        print(f"\n[profile.{name}]")
        for key, value in data.items():
            if key != "name" and value not in (None, [], {}, ""):
                print(f"{key} = {json.dumps(value)}")
    return 0
