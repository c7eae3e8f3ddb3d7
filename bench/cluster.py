"""The Dask engine's scheduling: efficiency on many short runs, and recovery from a lost node.

    python bench/cluster.py [--runs 120] [--seconds 1] [--workers 3] [--slots 2]

Starts a real `dask scheduler` and WORKERS plain `dask worker --no-nanny` processes on
loopback (resources arch-x86_64=SLOTS), then:

- efficiency: RUNS units of SECONDS each through vmrun's DaskEngine (placement check,
  one task per unit with resources, attempts counted from start events, results in
  order), whose task on the worker sleeps instead of booting a VM: the ideal time is
  ceil(RUNS / slots) * SECONDS; efficiency = ideal / measured (target >= 0.9).
- recovery: two 10-second units on workers of one slot each; one busy worker is killed
  (SIGKILL) after 3 s; the time from the kill to the lost unit's restart on the idle
  worker, and the unit's attempts (2 expected).

With --vm, also the speedup of real VM runs: VMS cold x86_64 runs of `sh -c 'echo
$((6*7))'` through the real task on 1, 2 and 3 vmrun workers of one slot each (each
worker a `vmrun cluster worker`); the wall time of each, and its speedup over one worker.

The scheduler and workers share this host's cores with the client; sleeping tasks use
none, so the first figures measure scheduling, not the VMs. VM runs under TCG keep a core
busy each: on a host of 2 cores, more than 2 workers cannot help.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))  # benchmark this checkout, installed or not

from distributed import Client  # noqa: E402

from vmrun.cluster import RunResult, RunUnit, parse_cluster  # noqa: E402
from vmrun.cluster.dask import DaskEngine  # noqa: E402


def sleeping_task(unit_json: str, topic: str, sources: tuple[str, ...]) -> dict[str, Any]:
    """Stands in for execute: the same start event and result, a sleep for the VM."""
    from distributed import get_worker

    unit = RunUnit.from_json(unit_json)
    get_worker().log_event(topic, {"start": unit.id})
    seconds = float(unit.argv[0])
    if len(unit.argv) > 1:  # the recovery figure's record of starts
        with open(unit.argv[1], "a") as starts:
            starts.write(f"{time.time()} {unit.id}\n")
    time.sleep(seconds)
    return {"result": RunResult(id=unit.id, exit_code=0, seconds=seconds,
                                node=get_worker().name).to_json(), "output": []}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def cluster(workers: int, slots: int, logs: Path, *, vmrun_workers: bool = False
            ) -> Iterator[tuple[str, dict[str, int]]]:
    """A scheduler and WORKERS workers (`vmrun cluster worker` with VMRUN_WORKERS, else
    plain Dask ones): its URL, and each worker's pid by name."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    processes = [subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
         "--port", str(port), "--no-dashboard"], env=env,
        stdout=(logs / "scheduler.log").open("wb"), stderr=subprocess.STDOUT)]
    try:
        for i in range(workers):
            argv = ([sys.executable, "-m", "vmrun", "cluster", "worker",
                     f"dask://127.0.0.1:{port}", "--slots", str(slots), "--name", f"w{i}"]
                    if vmrun_workers else
                    [sys.executable, "-m", "distributed.cli.dask_worker",
                     f"tcp://127.0.0.1:{port}", "--no-nanny", "--nthreads", str(slots),
                     "--name", f"w{i}", "--no-dashboard",
                     "--resources", f"arch-x86_64={slots} memory_mib={slots * 1024}"])
            processes.append(subprocess.Popen(
                argv, env=env, stdout=(logs / f"w{i}.log").open("wb"), stderr=subprocess.STDOUT))
        with Client(f"tcp://127.0.0.1:{port}",  # type: ignore[no-untyped-call]
                    timeout=60) as client:
            client.wait_for_workers(workers, timeout=120)
        yield f"dask://127.0.0.1:{port}", {f"w{i}": p.pid for i, p in
                                             enumerate(processes[1:])}
    finally:
        for process in processes:
            process.kill()
            process.wait()


def units(count: int, seconds: float, *record: str) -> list[RunUnit]:
    return [RunUnit(id=f"u{i}", argv=(str(seconds), *record), arch="x86_64")
            for i in range(count)]


def efficiency(runs: int, seconds: float, workers: int, slots: int, logs: Path) -> None:
    with cluster(workers, slots, logs) as (url, _):
        engine = DaskEngine(parse_cluster(url), task=sleeping_task)
        started = time.monotonic()
        results = engine.run(units(runs, seconds), 1, lambda *_: None)
        measured = time.monotonic() - started
    assert [r.id for r in results] == [f"u{i}" for i in range(runs)]
    assert all(r.attempts == 1 and r.exit_code == 0 for r in results)
    ideal = math.ceil(runs / (workers * slots)) * seconds
    print(f"efficiency: {runs} runs of {seconds:g}s on {workers * slots} slots: measured "
          f"{measured:.2f}s, ideal {ideal:.2f}s: {ideal / measured:.3f} (target >= 0.9)")


def recovery(logs: Path) -> None:
    with cluster(3, 1, logs) as (url, pids):
        spec = parse_cluster(url)
        engine = DaskEngine(spec, task=sleeping_task)
        killed: list[float] = []
        record = logs / "starts"

        def kill_one() -> None:
            time.sleep(3)
            with Client(spec.address, timeout=30) as client:  # type: ignore[no-untyped-call]
                busy = [addr for addr, keys in client.processing().items() if keys]
                info = client.scheduler_info(n_workers=-1)["workers"]
                os.kill(pids[info[busy[0]]["name"]], signal.SIGKILL)
                killed.append(time.time())

        killer = threading.Thread(target=kill_one)
        killer.start()
        started = time.monotonic()
        results = engine.run(units(2, 10, str(record)), 1, lambda *_: None)
        measured = time.monotonic() - started
        killer.join()
    starts = sorted(float(line.split()[0]) for line in record.read_text().splitlines())
    restarts = [t for t in starts if t > killed[0]]
    attempts = sorted(r.attempts for r in results)
    print(f"recovery: a worker killed 3s into two 10s runs: the lost run restarted "
          f"{restarts[0] - killed[0]:.2f}s after the kill on another worker; attempts "
          f"{attempts} (expected [1, 2]); the pair took {measured:.2f}s (ideal without "
          f"the loss 10s, with it 13s)")


def vm_speedup(vms: int, logs: Path) -> None:
    work = [RunUnit(id=f"vm{i}", arch="x86_64", memory_mib=512,
                    argv=("--cold", "--memory", "512M", "--", "sh", "-c", "echo $((6*7))"))
            for i in range(vms)]
    times: dict[int, float] = {}
    for workers in (1, 2, 3):
        with cluster(workers, 1, logs, vmrun_workers=True) as (url, _):
            started = time.monotonic()
            results = DaskEngine(parse_cluster(url)).run(work, 1, lambda *_: None)
            times[workers] = time.monotonic() - started
        assert all(r.exit_code == 0 and r.stdout_tail == "42" for r in results), results
        print(f"vm matrix: {vms} cold x86_64 runs on {workers} worker(s): "
              f"{times[workers]:.2f}s, speedup {times[1] / times[workers]:.2f}x over one "
              f"worker (host cores: {os.cpu_count()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=120)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--vm", type=int, default=0, metavar="VMS",
                        help="also time VMS real VM runs on 1, 2 and 3 workers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmrun-bench-cluster-") as tmp:
        efficiency(args.runs, args.seconds, args.workers, args.slots, Path(tmp))
        recovery(Path(tmp))
        if args.vm:
            vm_speedup(args.vm, Path(tmp))


if __name__ == "__main__":
    main()
