from __future__ import annotations

from vmrun.cluster import RunResult
from vmrun.matrix import summary


def result(arch: str, timings: dict[str, float], node: str = "", attempts: int = 1
           ) -> RunResult:
    return RunResult(id=arch, exit_code=0, seconds=1.0, timings=timings, node=node,
                     attempts=attempts)


def test_summary_shows_a_boot_or_a_warm_start() -> None:
    table = summary([
        result("x86_64", {"boot": 2.5, "command": 0.25}),
        result("aarch64", {"restore": 0.05, "command": 0.125}),
        result("s390x", {}),
    ])
    rows = [line.split() for line in table.splitlines()]
    assert rows == [["arch", "exit", "start", "command"],
                    ["x86_64", "0", "2.50s", "0.25s"],
                    ["aarch64", "0", "warm:0.05s", "0.12s"],
                    ["s390x", "0", "-", "-"]]


def test_a_cluster_summary_names_each_run_s_node_and_attempts() -> None:
    table = summary([result("x86_64", {"boot": 2.5, "command": 0.25}, "node1", 1),
                     result("i386", {}, "node3", 2)], placement=True)
    rows = [line.split() for line in table.splitlines()]
    assert rows == [["arch", "exit", "start", "command", "node", "attempts"],
                    ["x86_64", "0", "2.50s", "0.25s", "node1", "1"],
                    ["i386", "0", "-", "-", "node3", "2"]]
