"""`vmrun test` against a shell loop of the same `vmrun` calls, side by side in one session.

    python bench/projects.py [--runs N] [--rounds R] [--jobs J] [--big M]

A project of one profile on the host's architecture with N shards (the default guest, a
command that reads the project and writes a file). Each round times, alternating so drift
on the host hits both alike:

- **loop**: `xargs -P J` of N `vmrun --arch ARCH -e VMRUN_SHARD=I -- CMD` calls in the
  project directory (what people script today: no private copies, no reports);
- **vmrun test**: `vmrun test -j J --junit FILE` on the same project.

Medians of wall time and the ratio test/loop (target: at most 1.05). Then, once, what a
project of M runs (default 20) costs end to end with `vmrun test` (warm starts where they
work, as in everyday use).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))  # benchmark this checkout, installed or not

from vmrun.qemu.arch import host_arch, lookup_arch  # noqa: E402

TARGET = 1.05
COMMAND = "cat vmrun.toml > /dev/null; echo shard $VMRUN_SHARD > out-$VMRUN_SHARD.txt"


def project(directory: Path, shards: int) -> None:
    (directory / "vmrun.toml").write_text(textwrap.dedent(f"""\
        [profile.bench]
        command = ["sh", "-c", "{COMMAND}"]
        shards = {shards}
        collect = ["out-*.txt"]
        """))
    for i in range(50):  # a small source tree for the private copies
        (directory / "src").mkdir(exist_ok=True)
        (directory / "src" / f"module{i}.py").write_text("x = 1\n" * 200)


def timed(argv: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    start = time.monotonic()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=3600,
                          check=False)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"projects.py: {' '.join(argv)} failed: {done.stderr.decode()}")
    return elapsed


def loop_argv(arch: str, runs: int, jobs: int) -> list[str]:
    vmrun = f"{sys.executable} -m vmrun --arch {arch} -e VMRUN_SHARDS={runs}"
    script = (f"seq 1 {runs} | xargs -P {jobs} -I{{}} {vmrun} -e VMRUN_SHARD={{}} "
              f"-- sh -c '{COMMAND}'")
    return ["sh", "-c", script]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=4, help="shards of the project")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--big", type=int, default=20, help="runs of the end-to-end project")
    args = parser.parse_args()
    arch = lookup_arch(host_arch()).name
    test_argv = [sys.executable, "-m", "vmrun", "test", "-q", "-j", str(args.jobs),
                 "--junit", "report.xml"]
    with tempfile.TemporaryDirectory(prefix="vmrun-bench-projects-") as tmp:
        root = Path(tmp)
        project(root, args.runs)
        timed(test_argv, root)  # the guest and a warm-start template before timing
        times: dict[str, list[float]] = {"loop": [], "vmrun test": []}
        for _ in range(args.rounds):
            times["loop"].append(timed(loop_argv(arch, args.runs, args.jobs), root))
            times["vmrun test"].append(timed(test_argv, root))
        loop, test = (statistics.median(times[k]) for k in ("loop", "vmrun test"))
        print(f"{args.runs} runs on {arch}, --jobs {args.jobs}, {args.rounds} rounds "
              "(median wall time)")
        print(f"  loop of vmrun calls  {loop:7.2f}s  ({loop / args.runs:.2f}s a run)")
        print(f"  vmrun test           {test:7.2f}s  ({test / args.runs:.2f}s a run)")
        verdict = "met" if test / loop <= TARGET else "NOT met"
        print(f"  ratio test/loop      {test / loop:7.3f}   target <= {TARGET} ({verdict})")
        project(root, args.big)
        big = timed(test_argv, root)
        print(f"{args.big}-run project end to end (vmrun test -j {args.jobs}): {big:.2f}s "
              f"({big / args.big:.2f}s a run)")


if __name__ == "__main__":
    main()
