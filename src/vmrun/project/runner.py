"""Running a project's units: each in a private copy of the project, on an engine."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from vmrun.matrix import Leg, run_legs
from vmrun.project.plan import RunUnit

RECORD = ".vmrun-run.json"  # in a unit's results directory: exit code, timings, files
WORK_DIR = Path(".vmrun") / "work"
TAIL_BYTES = 64 * 1024
MAX_COLLECT_FILES = 10_000  # per run
MAX_COLLECT_BYTES = 1 << 30  # per run

OnOutput = Callable[[str, int, bytes], None]  # (unit id, 1 or 2, one line without "\n")


@dataclass(frozen=True)
class RunResult:
    """What one unit's run gave: its exit code, wall time, output tails and files."""

    id: str
    exit_code: int
    seconds: float
    stdout_tail: str = ""
    stderr_tail: str = ""
    collected: tuple[str, ...] = ()  # paths of the collected files (absolute)
    node: str = ""  # the host it ran on
    attempts: int = 1
    timings: dict[str, float] = field(default_factory=dict)  # boot, command, ... (vmrun's)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "exit_code": self.exit_code, "seconds": self.seconds,
                "stdout_tail": self.stdout_tail, "stderr_tail": self.stderr_tail,
                "collected": list(self.collected), "node": self.node,
                "attempts": self.attempts, "timings": self.timings}


class Engine(Protocol):
    """Runs units (each its argv from its root), at most JOBS at a time."""

    def run(self, units: Sequence[RunUnit], jobs: int, on_output: OnOutput
            ) -> list[RunResult]: ...


# ---- one unit, in its own process: `vmrun test --unit ID` ---------------------------------

@contextmanager
def private_copy(root: Path, mode: str = "auto") -> Iterator[Path]:
    """A copy of the project at ROOT that one run may change: parallel runs of one profile
    each write their own files; removed afterwards. MODE "auto": in a git work tree, the
    files git shows (tracked, and untracked but not ignored: no .venv, no build outputs),
    else everything; "all": everything. The .vmrun directory never."""
    parent = root / WORK_DIR
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=parent))
    try:
        listed = git_files(root) if mode == "auto" else None
        if listed is None:
            shutil.copytree(root, work, symlinks=True, dirs_exist_ok=True,
                            ignore=lambda d, names: [".vmrun"] if Path(d) == root else [])
        else:
            _copy_listed(root, work, listed)
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def git_files(root: Path) -> list[str] | None:
    """The paths (relative to ROOT) git shows in ROOT: tracked, or untracked and not
    ignored; None when ROOT is not in a git work tree (or git is missing)."""
    if shutil.which("git") is None:
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
             "--exclude-standard"], capture_output=True, check=False, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    return [name for name in done.stdout.decode(errors="surrogateescape").split("\0")
            if name and name.split("/")[0] != ".vmrun"]


def _copy_listed(root: Path, work: Path, names: Sequence[str]) -> None:
    for name in dict.fromkeys(names):
        source, target = root / name, work / name
        if not os.path.lexists(source):
            continue  # deleted in the work tree, still in the index
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir() and not source.is_symlink():  # a submodule
            shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target, follow_symlinks=False)


@dataclass
class Collected:
    """What collect copied, and what it left out and why."""

    files: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "PATH: why"
    size: int = 0


def collect(work: Path, results: Path, globs: Sequence[str], *,
            most_files: int = MAX_COLLECT_FILES, most_bytes: int = MAX_COLLECT_BYTES
            ) -> Collected:
    """Copy the regular files matching GLOBS in WORK to the same relative paths under
    RESULTS, at most MOST_FILES files and MOST_BYTES bytes (apparent size: a sparse file
    counts whole). Symbolic links are never followed (a guest could point one at a host
    file); FIFOs, sockets and devices are passed over."""
    done = Collected()
    for glob in globs:
        for path in sorted(work.glob(glob)):
            relative = path.relative_to(work)
            if any(part.is_symlink() for part in _ancestors(work, relative)):
                done.skipped.append(f"{relative}: a symbolic link")
                continue
            for source in _regular_files(path):
                target = results / source.relative_to(work)
                if target in done.files:
                    continue
                size = source.lstat().st_size
                if len(done.files) >= most_files or done.size + size > most_bytes:
                    done.skipped.append(f"{source.relative_to(work)}: over the limit of "
                                        f"{most_files} files or {most_bytes >> 20} MiB")
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target, follow_symlinks=False)
                done.files.append(target)
                done.size += size
    return done


def _ancestors(work: Path, relative: Path) -> Iterator[Path]:
    current = work
    for part in relative.parts:
        current = current / part
        yield current


def _regular_files(path: Path) -> Iterator[Path]:
    mode = path.lstat().st_mode
    if stat.S_ISREG(mode):
        yield path
    elif stat.S_ISDIR(mode):
        for top, _dirs, files in os.walk(path):  # os.walk does not follow links by default
            for name in sorted(files):
                if stat.S_ISREG((Path(top) / name).lstat().st_mode):
                    yield Path(top) / name


def execute(unit: RunUnit) -> int:
    """Run UNIT here: bake if it must, run it in a private copy of the project, collect
    its files into its results directory with a record beside them; its exit code."""
    from vmrun.cli import main

    root = Path(unit.root)
    results = root / unit.results
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    code = subprocess.run(unit.bake, stdin=subprocess.DEVNULL).returncode if unit.bake else 0
    timings_file = results / ".vmrun-timings.json"
    collected = Collected()
    if code == 0:
        with private_copy(root, unit.copy) as work:
            os.chdir(work)
            try:
                code = main([unit.run_argv[0], "--timings-file", str(timings_file),
                             *unit.run_argv[1:]])
            finally:
                os.chdir(root)
            collected = collect(work, results, unit.collect)
    for line in collected.skipped[:20]:
        print(f"vmrun test: not collected: {line}", file=sys.stderr)
    record = {"exit_code": code, "timings": _json_file(timings_file),
              "collected": [str(path) for path in collected.files],
              "skipped": collected.skipped, "node": socket.gethostname()}
    timings_file.unlink(missing_ok=True)
    (results / RECORD).write_text(json.dumps(record))
    return code


def _json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---- the local engine: units as processes on this host ------------------------------------

class LocalEngine:
    """Each unit a `python -m vmrun test --unit ID` process here, their lines merged as
    they come (vmrun.matrix); bakes run first, each once."""

    def run(self, units: Sequence[RunUnit], jobs: int, on_output: OnOutput
            ) -> list[RunResult]:
        failed_bakes = self._bake(units, jobs, on_output)
        tails: dict[tuple[str, int], bytearray] = {}

        def write(leg: Leg, fd: int, line: bytes) -> None:
            tail = tails.setdefault((leg.arch, fd), bytearray())
            tail += line + b"\n"
            del tail[:-TAIL_BYTES]
            on_output(leg.arch, fd, line)

        runnable = [unit for unit in units if unit.bake not in failed_bakes]
        legs = {unit.id: Leg(arch=unit.id, argv=list(unit.argv), cwd=Path(unit.root),
                             timings_file=Path(unit.root) / unit.results / RECORD)
                for unit in runnable}
        for unit in runnable:
            shutil.rmtree(Path(unit.root) / unit.results, ignore_errors=True)
        run_legs(list(legs.values()), jobs, write)
        results = []
        for unit in units:
            if unit.id not in legs:
                results.append(RunResult(id=unit.id, exit_code=failed_bakes[unit.bake],
                                         seconds=0.0, stderr_tail="the bake failed"))
                continue
            leg = legs[unit.id]
            results.append(result_of(unit, leg.exit_code or 0, leg.ended - leg.started,
                                     bytes(tails.get((unit.id, 1), b"")),
                                     bytes(tails.get((unit.id, 2), b""))))
        return results

    def _bake(self, units: Sequence[RunUnit], jobs: int, on_output: OnOutput
              ) -> dict[tuple[str, ...], int]:
        """Run each distinct bake once; the failed ones and their codes."""
        bakes = list(dict.fromkeys(unit.bake for unit in units if unit.bake))
        legs = [Leg(arch=f"bake {bake[bake.index('--name') + 1]}", argv=list(bake),
                    timings_file=Path(os.devnull)) for bake in bakes]
        run_legs(legs, jobs, lambda leg, fd, line: on_output(leg.arch, fd, line))
        return {bake: leg.exit_code or 1 for bake, leg in zip(bakes, legs, strict=True)
                if leg.exit_code != 0}


ENGINES: dict[str, Callable[[], Engine]] = {"local": LocalEngine}


def result_of(unit: RunUnit, exit_code: int, seconds: float, stdout: bytes,
              stderr: bytes) -> RunResult:
    """UNIT's result from its process's exit code and output, and the record it left."""
    record = _json_file(Path(unit.root) / unit.results / RECORD)
    timings = record.get("timings", {})
    collected = record.get("collected", [])
    return RunResult(
        id=unit.id, exit_code=exit_code, seconds=round(seconds, 3),
        stdout_tail=stdout.decode(errors="replace"),
        stderr_tail=stderr.decode(errors="replace"),
        collected=tuple(str(p) for p in collected if isinstance(p, str)),
        node=str(record.get("node", socket.gethostname())),
        timings={k: float(v) for k, v in timings.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)})
