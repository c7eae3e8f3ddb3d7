from __future__ import annotations

import json
from pathlib import Path

from vmrun.matrix import Leg, summary


def leg(tmp_path: Path, arch: str, timings: dict[str, float] | None) -> Leg:
    path = tmp_path / f"{arch}.json"
    if timings is not None:
        path.write_text(json.dumps(timings))
    return Leg(arch=arch, argv=[], timings_file=path, exit_code=0)


def test_summary_shows_a_boot_or_a_warm_start(tmp_path: Path) -> None:
    table = summary([
        leg(tmp_path, "x86_64", {"boot": 2.5, "command": 0.25}),
        leg(tmp_path, "aarch64", {"restore": 0.05, "command": 0.125}),
        leg(tmp_path, "s390x", None),
    ])
    rows = [line.split() for line in table.splitlines()]
    assert rows == [["arch", "exit", "start", "command"],
                    ["x86_64", "0", "2.50s", "0.25s"],
                    ["aarch64", "0", "warm:0.05s", "0.12s"],
                    ["s390x", "0", "-", "-"]]
