"""The Slurm engine's scheduling efficiency and its recovery from a lost node.

    python bench/slurm.py [--runs N] [--seconds S] [--skip-recovery]

Starts the tests' Slurm cluster on this host (tests/slurmtools.py: three nodes of 2 slots
each; needs root, slurm-wlm, munge, tini) and runs N real VMs (`sleep S` in an x86_64
guest) through `SlurmEngine` on its 6 slots. Efficiency is ideal time over actual: the
ideal is the makespan of the same runs (their durations as each task measured them, boot
included) packed onto the slots with no overhead at all; the actual is the engine's wall
time, so the gap is what Slurm and the engine add (submission, scheduling passes, task
start-up, result polling). The issue's target for 20 one-minute runs is 0.95.

Recovery: one run on a node that is killed (its PID namespace: slurmd, step, vmrun, QEMU)
once its QEMU runs; the time from the kill until the retry's task starts elsewhere, with
this cluster's SlurmdTimeout=10.
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path[:0] = [str(SRC), str(ROOT)]  # benchmark this checkout, installed or not
os.environ["PYTHONPATH"] = f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"

from tests.slurmtools import NODE_CPUS, NODES, Cluster, slurm_cluster  # noqa: E402
from vmrun.cluster import ClusterSpec, Kind, RunResult, RunUnit  # noqa: E402
from vmrun.cluster.slurm import SlurmEngine  # noqa: E402

SLOTS = NODE_CPUS * len(NODES)
TARGET = 0.95


def sleeper(ident: str, seconds: float) -> RunUnit:
    return RunUnit(id=ident, arch="x86_64",
                   argv=("--arch", "x86_64", "--net", "none", "-q", "--", "sleep", str(seconds)))


def makespan(durations: list[float], slots: int) -> float:
    """Runs started in order on the first free slot, with no overhead."""
    free = [0.0] * slots
    for duration in durations:
        heapq.heappush(free, heapq.heappop(free) + duration)
    return max(free)


def efficiency(engine: SlurmEngine, runs: int, seconds: float) -> None:
    units = [sleeper(f"run{i}", seconds) for i in range(runs)]
    start = time.monotonic()
    results = engine.run(units, SLOTS, lambda *_: None)
    actual = time.monotonic() - start
    failed = [r for r in results if r.exit_code != 0]
    if failed:
        raise SystemExit(f"slurm.py: runs failed: {failed}")
    ideal = makespan([r.seconds for r in results], SLOTS)
    mean = sum(r.seconds for r in results) / len(results)
    print(f"{runs} runs of sleep {seconds:g} s on {SLOTS} slots: actual {actual:.1f} s, "
          f"ideal {ideal:.1f} s (mean run {mean:.1f} s, boot included): efficiency "
          f"{ideal / actual:.3f} (target {TARGET})")


def qemu_on(cluster: Cluster, node: str) -> bool:
    for pid in cluster.node_processes(node):
        try:
            if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                return True
        except OSError:
            continue
    return False


def recovery(engine: SlurmEngine, cluster: Cluster, seconds: float) -> None:
    results: list[RunResult] = []
    runner = threading.Thread(target=lambda: results.extend(
        engine.run([sleeper("lost", seconds)], 1, lambda *_: None)))
    runner.start()
    lost = ""
    while not lost:
        time.sleep(0.2)
        lost = next((n for n in list(cluster.nodes) if qemu_on(cluster, n)), "")
    time.sleep(2)
    killed = time.monotonic()
    cluster.kill_node(lost)
    runner.join()
    done = time.monotonic()
    [result] = results
    retry_started = done - killed - result.seconds
    print(f"node {lost} lost mid-run: retried on {result.node} (attempts {result.attempts}, "
          f"exit {result.exit_code}); {retry_started:.1f} s from the kill to the retry's "
          f"start, {done - killed:.1f} s to its result")
    cluster.start_node(lost)
    cluster.wait_idle()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--skip-recovery", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmrun-bench-slurm-") as shared, \
            slurm_cluster() as cluster:
        os.chdir(shared)  # the directory the guests share
        engine = SlurmEngine(ClusterSpec(Kind.SLURM, partition="vmrun"), directory=Path(shared))
        efficiency(engine, args.runs, args.seconds)
        if not args.skip_recovery:
            recovery(engine, cluster, 15.0)


if __name__ == "__main__":
    main()
