"""One command on several architectures at once: `vmrun --arch aarch64,s390x -- CMD`.

Each architecture is a RunUnit (its own vmrun process and VM) handed to an engine: this
host by default, or a cluster (`--cluster dask://HOST:PORT`). Output is merged line by line
with the architecture as a prefix, and a summary table closes the run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from vmrun.cluster import Kind, RunResult, RunUnit, engine_for, parse_cluster
from vmrun.qemu.arch import lookup_arch


def first_failure(codes: Sequence[int]) -> int:
    """The exit status of a matrix run: the first non-zero code in --arch order, else 0."""
    return next((code for code in codes if code != 0), 0)


def _start(timings: dict[str, float]) -> str:
    """How long the guest took to be ready: its boot, or a warm start's restore."""
    if "boot" in timings:
        return f"{timings['boot']:.2f}s"
    if "restore" in timings:
        return f"warm:{timings['restore']:.2f}s"
    return "-"


def table(rows: Sequence[Sequence[str]]) -> str:
    """ROWS as left-aligned columns (the first row is the heading)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


def timing_cells(t: dict[str, float]) -> tuple[str, str]:
    """The start and command columns of a summary row, from a run's timings."""
    return _start(t), f"{t['command']:.2f}s" if "command" in t else "-"


def placement_cells(result: RunResult) -> tuple[str, str]:
    """The node and attempts columns of a summary row (runs on a cluster)."""
    return result.node or "-", str(result.attempts)


def summary(results: Sequence[RunResult], *, placement: bool = False) -> str:
    """The closing table; PLACEMENT adds the node that ran each and its attempts."""
    rows = [("arch", "exit", "start", "command", *(("node", "attempts") if placement else ()))]
    rows += [(result.id, str(result.exit_code), *timing_cells(result.timings),
              *(placement_cells(result) if placement else ())) for result in results]
    return table(rows)


def matrix_units(arches: Sequence[str], passthrough: Sequence[str], command: Sequence[str],
                 *, memory_mib: int = 1024, kvm: bool = False, cpus: int = 1
                 ) -> list[RunUnit]:
    return [RunUnit(id=name, arch=name, memory_mib=memory_mib, kvm=kvm, cpus=cpus,
                    argv=("--arch", name, *passthrough, "--", *command))
            for name in (lookup_arch(a).name for a in arches)]


def run_matrix(arches: Sequence[str], passthrough: Sequence[str], command: Sequence[str],
               jobs: int, *, quiet: bool = False, cluster: str = "local",
               memory_mib: int = 1024, kvm: bool = False, cpus: int = 1) -> int:
    """Run COMMAND once per arch (at most JOBS at a time) where CLUSTER says; returns the
    first failure. QUIET (-q, also in PASSTHROUGH) leaves out the summary table."""
    spec = parse_cluster(cluster)
    units = matrix_units(arches, passthrough, command, memory_mib=memory_mib, kvm=kvm,
                         cpus=cpus)
    width = max(len(unit.id) for unit in units)

    def on_output(unit_id: str, fd: int, line: bytes) -> None:
        os.write(fd, f"[{unit_id:<{width}}] ".encode() + line + b"\n")

    results = engine_for(spec).run(units, jobs, on_output)
    if not quiet:
        print(summary(results, placement=spec.kind is not Kind.LOCAL), file=sys.stderr)
    return first_failure([result.exit_code for result in results])
