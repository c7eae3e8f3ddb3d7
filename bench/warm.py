"""Warm starts against cold boots, side by side in one session.

    python bench/warm.py [--runs N] [--arch ARCH[,ARCH...]] [--parallel N]

For each architecture: `vmrun --cold -- true` (the baseline), warm `vmrun -- true` with
the working directory shared and with --share none, alternated (cold, warm, warm-none,
...) so drift on the host hits all alike; medians of wall time from the host's side
(Python start-up included). Then what making a template adds to the run that makes it
(its "template" phase, and its wall time beside the cold median), and N warm runs at once
from one template: each checked, and the memory of their QEMUs summed while all run
(RSS, and PSS, which splits the template's shared pages among the copies).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))  # benchmark this checkout, installed or not

from vmrun.warm import store  # noqa: E402

# Time vmrun as an installed one runs: with its bytecode cached (a pip install compiles
# it), even where the environment asks Python to write none.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

TARGETS = {"warm-share": 0.20, "warm-none": 0.12}
SPEEDUP = 10.0
MAKE_OVERHEAD = 0.5


def vmrun(args: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vmrun", *args], cwd=cwd, env=env,
                          capture_output=True, timeout=600, check=False)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"warm.py: vmrun {' '.join(args)} failed: {done.stderr.decode()}")
    return elapsed, done


def remove_templates(arch: str, share: str) -> None:
    """Only the shape being measured: a user's other templates stay."""
    for template in store.all_templates():
        shape = (store.read_meta(template) or {}).get("shape", {})
        if (shape.get("arch"), shape.get("share"), shape.get("memory_mib")) == \
                (arch, share, 1024):
            store.remove(template)


def compare(arch: str, runs: int, cwd: Path) -> dict[str, float]:
    kinds = {"cold": ["--cold"], "warm-share": [], "warm-none": ["--share", "none"]}
    for extra in kinds.values():  # a template per shape before timing
        vmrun(["--arch", arch, *extra, "--", "true"], cwd)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(runs):
        for kind, extra in kinds.items():
            elapsed, done = vmrun(["--arch", arch, "--verbose", *extra, "--", "true"], cwd)
            warm = b"start: warm" in done.stderr
            if warm != (kind != "cold"):
                raise SystemExit(f"warm.py: {kind} run started {'warm' if warm else 'cold'}")
            times[kind].append(elapsed)
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    cold = medians["cold"]
    print(f"{arch}: cold {cold:.3f}s (baseline, median of {runs})")
    for kind in ("warm-share", "warm-none"):
        value = medians[kind]
        target = TARGETS[kind] if arch == "x86_64" else None
        verdict = "" if target is None else (
            f", target <= {target:.2f}s: {'met' if value <= target else 'NOT met'}")
        print(f"{arch}: {kind} {value:.3f}s, {cold / value:.1f}x faster than cold "
              f"(target >= {SPEEDUP:.0f}x: {'met' if cold / value >= SPEEDUP else 'NOT met'})"
              f"{verdict}")
    return medians


def make_overhead(arch: str, cold: float, cwd: Path, repeats: int = 2) -> None:
    for _ in range(repeats):
        remove_templates(arch, "9p")
        elapsed, done = vmrun(["--arch", arch, "--verbose", "--", "true"], cwd)
        found = re.search(rb"template: ([0-9.]+)s", done.stderr)
        phase = float(found.group(1)) if found else float("nan")
        print(f"{arch}: making the template: its phase {phase:.3f}s, the run {elapsed:.3f}s "
              f"against cold {cold:.3f}s (target: adds <= {MAKE_OVERHEAD}s: "
              f"{'met' if phase <= MAKE_OVERHEAD else 'NOT met'})")


def qemu_memory(pids: list[int]) -> tuple[int, int, int]:
    """How many QEMU children PIDS have, and their summed RSS and PSS in KiB."""
    rss = pss = seen = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid not in pids or "qemu-system" not in stat:
                continue
            seen += 1
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return seen, rss, pss


def peak_memory(runs: list[subprocess.Popen[bytes]], window: float = 6.0) -> tuple[int, int, int]:
    """qemu_memory sampled while the runs sleep, until every run's QEMU is seen (a busy
    host starts them late); the sample that saw the most."""
    best = (0, 0, 0)
    deadline = time.monotonic() + window
    while time.monotonic() < deadline and best[0] < len(runs):
        time.sleep(0.25)
        best = max(best, qemu_memory([run.pid for run in runs]))
    return best


def parallel(arch: str, count: int, cwd: Path) -> None:
    vmrun(["--arch", arch, "--share", "none", "--", "true"], cwd)  # the template, if none
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    script = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; sleep 3"
    start = time.monotonic()
    runs = [subprocess.Popen([sys.executable, "-m", "vmrun", "--arch", arch, "--verbose",
                              "--share", "none", "--", "sh", "-c", script], cwd=cwd, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(count)]
    seen, rss, pss = peak_memory(runs)
    results = [run.communicate(timeout=600) for run in runs]
    elapsed = time.monotonic() - start
    ok = sum(1 for run, (_, err) in zip(runs, results, strict=True)
             if run.returncode == 0 and b"start: warm" in err)
    distinct = len({out for out, _ in results})
    print(f"{arch}: {count} warm runs at once: {ok} correct and warm, {distinct} distinct "
          f"random outputs, {elapsed:.2f}s in all (3 s of it sleep); memory of the "
          f"{seen} QEMUs seen at once: RSS {rss / 1024:.0f} MiB, PSS {pss / 1024:.0f} MiB "
          f"({pss / 1024 / max(seen, 1):.0f} MiB each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--arch", default="x86_64")
    parser.add_argument("--parallel", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        for arch in args.arch.split(","):
            medians = compare(arch, args.runs, cwd)
            make_overhead(arch, medians["cold"], cwd)
            if args.parallel:
                parallel(arch, args.parallel, cwd)


if __name__ == "__main__":
    main()
