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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmrun.qemu.arch import lookup_arch


@dataclass
class Leg:
    arch: str
    argv: list[str]
    timings_file: Path
    process: subprocess.Popen[bytes] | None = None
    partial: dict[int, bytes] = field(default_factory=dict)
    exit_code: int | None = None

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


def summary(legs: Sequence[Leg]) -> str:
    rows = [("arch", "exit", "start", "command")]
    for leg in legs:
        t = leg.timings()
        rows.append((
            leg.arch, str(leg.exit_code), _start(t),
            f"{t['command']:.2f}s" if "command" in t else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


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
        waiting = list(legs)
        running: list[Leg] = []
        selector = selectors.DefaultSelector()
        while waiting or running:
            while waiting and len(running) < jobs:
                leg = waiting.pop(0)
                leg.process = subprocess.Popen(
                    leg.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
                assert leg.process.stdout is not None and leg.process.stderr is not None
                for stream, fd in ((leg.process.stdout, 1), (leg.process.stderr, 2)):
                    selector.register(stream, selectors.EVENT_READ, (leg, fd))
                running.append(leg)
            for key, _ in selector.select():
                leg, fd = key.data
                data = os.read(key.fd, 65536)
                prefix = f"[{leg.arch:<{width}}] ".encode()
                if data:
                    lines = (leg.partial.get(fd, b"") + data).split(b"\n")
                    leg.partial[fd] = lines.pop()
                    if lines:
                        os.write(fd, b"".join(prefix + line + b"\n" for line in lines))
                    continue
                selector.unregister(key.fileobj)
                rest = leg.partial.pop(fd, b"")
                if rest:
                    os.write(fd, prefix + rest + b"\n")
                if not any(k.data[0] is leg for k in selector.get_map().values()):
                    assert leg.process is not None
                    leg.exit_code = leg.process.wait()
                    running.remove(leg)
        if not quiet:
            print(summary(legs), file=sys.stderr)
        return first_failure([leg.exit_code or 0 for leg in legs])
