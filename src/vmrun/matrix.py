"""One command on several architectures at once: `vmrun --arch aarch64,s390x -- CMD`.

Each architecture runs in its own vmrun process (its own VM); their output is merged line
by line with the architecture as a prefix, and a summary table closes the run.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmrun.qemu.arch import lookup_arch


@dataclass
class Leg:
    arch: str  # the label of its lines: an architecture, or a project run's id
    argv: list[str]
    timings_file: Path
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    partial: dict[int, bytes] = field(default_factory=dict)
    exit_code: int | None = None
    started: float = 0.0
    ended: float = 0.0

    def timings(self) -> dict[str, float]:
        try:
            data = json.loads(self.timings_file.read_text())
        except (OSError, ValueError):
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(v, int | float)}


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


def summary(legs: Sequence[Leg]) -> str:
    rows = [("arch", "exit", "start", "command")]
    rows += [(leg.arch, str(leg.exit_code), *timing_cells(leg.timings())) for leg in legs]
    return table(rows)


Writer = Callable[[Leg, int, bytes], None]


def prefixed(width: int) -> Writer:
    """A writer of each line to its own stream (1 or 2), prefixed with its leg's label."""
    def write(leg: Leg, fd: int, line: bytes) -> None:
        os.write(fd, f"[{leg.arch:<{width}}] ".encode() + line + b"\n")
    return write


def _start_leg(leg: Leg, selector: selectors.BaseSelector) -> None:
    leg.started = time.monotonic()
    leg.process = subprocess.Popen(
        leg.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        cwd=leg.cwd)
    assert leg.process.stdout is not None and leg.process.stderr is not None
    for stream, fd in ((leg.process.stdout, 1), (leg.process.stderr, 2)):
        selector.register(stream, selectors.EVENT_READ, (leg, fd))


def run_legs(legs: Sequence[Leg], jobs: int, write: Writer) -> None:
    """Run every leg's argv (at most JOBS at a time), handing each line of its stdout (1)
    and stderr (2) to WRITE as it comes; sets each leg's exit_code and times."""
    running: list[Leg] = []
    try:
        _merge(list(legs), running, jobs, write)
    finally:
        # interrupted (SIGINT, SIGTERM as an exception): no leg outlives the run
        for leg in running:
            assert leg.process is not None
            if leg.process.poll() is None:
                leg.process.terminate()
            leg.process.wait()


def _merge(waiting: list[Leg], running: list[Leg], jobs: int, write: Writer) -> None:
    selector = selectors.DefaultSelector()
    while waiting or running:
        while waiting and len(running) < jobs:
            leg = waiting.pop(0)
            _start_leg(leg, selector)
            running.append(leg)
        for key, _ in selector.select():
            leg, fd = key.data
            data = os.read(key.fd, 65536)
            if data:
                lines = (leg.partial.get(fd, b"") + data).split(b"\n")
                leg.partial[fd] = lines.pop()
                for line in lines:
                    write(leg, fd, line)
                continue
            selector.unregister(key.fileobj)
            key.fileobj.close()  # type: ignore[union-attr]
            rest = leg.partial.pop(fd, b"")
            if rest:
                write(leg, fd, rest)
            if not any(k.data[0] is leg for k in selector.get_map().values()):
                assert leg.process is not None
                leg.exit_code = leg.process.wait()
                leg.ended = time.monotonic()
                running.remove(leg)


def run_matrix(arches: Sequence[str], passthrough: Sequence[str], command: Sequence[str],
               jobs: int, *, quiet: bool = False) -> int:
    """Run COMMAND once per arch (at most JOBS at a time); returns the first failure.
    QUIET (-q, also in PASSTHROUGH) leaves out the summary table."""
    names = [lookup_arch(a).name for a in arches]
    width = max(map(len, names))
    with tempfile.TemporaryDirectory(prefix="vmrun-matrix-") as tmp:
        legs = [
            Leg(arch=name, timings_file=Path(tmp) / f"{name}.json",
                argv=[sys.executable, "-m", "vmrun", "--arch", name,
                      "--timings-file", str(Path(tmp) / f"{name}.json"),
                      *passthrough, "--", *command])
            for name in names
        ]
        run_legs(legs, jobs, prefixed(width))
        if not quiet:
            print(summary(legs), file=sys.stderr)
        return first_failure([leg.exit_code or 0 for leg in legs])
