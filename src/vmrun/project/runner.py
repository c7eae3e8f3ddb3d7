"""Running a project's units: each in a private copy of the project, on an engine."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmrun import cluster
from vmrun.cluster import Engine, OnOutput, RunResult
from vmrun.cluster.units import TIMINGS_ENV
from vmrun.project.plan import RunUnit, vmrun_args

__all__ = ["Engine", "OnOutput", "RunResult", "execute", "run_units"]

RECORD = ".vmrun-run.json"  # in a unit's results directory: exit code, timings, files
WORK_DIR = Path(".vmrun") / "work"
MAX_COLLECT_FILES = 10_000  # per run
MAX_COLLECT_BYTES = 1 << 30  # per run


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
    timings = _json_file(timings_file)
    record = {"exit_code": code, "timings": timings,
              "collected": [str(path) for path in collected.files],
              "skipped": collected.skipped, "node": socket.gethostname()}
    timings_file.unlink(missing_ok=True)
    if os.environ.get(TIMINGS_ENV):  # an engine started us: it reads them from there
        Path(os.environ[TIMINGS_ENV]).write_text(json.dumps(timings))
    (results / RECORD).write_text(json.dumps(record))
    return code


def _json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ---- all of a project's units, on an engine ------------------------------------------------

def run_units(units: Sequence[RunUnit], jobs: int, on_output: OnOutput, engine: Engine
              ) -> list[RunResult]:
    """UNITS on ENGINE (vmrun.cluster: this host, Dask or Slurm), one result each in their
    order: each distinct bake first, once (a failed one fails its runs without starting
    them); then the runs, their results directories cleared first, each result completed
    with the files its run collected (the record `vmrun test --unit` left)."""
    failed_bakes = _bake(units, jobs, on_output, engine)
    runnable = [unit for unit in units if unit.bake not in failed_bakes]
    for unit in runnable:
        shutil.rmtree(Path(unit.root) / unit.results, ignore_errors=True)
    done = engine.run([cluster_unit(unit) for unit in runnable], jobs, on_output)
    by_id = {unit.id: with_record(unit, result)
             for unit, result in zip(runnable, done, strict=True)}
    return [by_id.get(unit.id) or RunResult(
                id=unit.id, exit_code=failed_bakes[unit.bake], seconds=0.0,
                stderr_tail="the bake failed") for unit in units]


def cluster_unit(unit: RunUnit) -> cluster.RunUnit:
    """UNIT as an engine runs it: `vmrun test --project FILE --unit ID` on a node that
    has UNIT's architecture, memory and CPUs (the project on a filesystem every node mounts)."""
    return cluster.RunUnit(id=unit.id, argv=unit.vmrun_args, arch=unit.arch,
                           memory_mib=unit.memory_mib, cpus=unit.cpus)


def _bake(units: Sequence[RunUnit], jobs: int, on_output: OnOutput, engine: Engine
          ) -> dict[tuple[str, ...], int]:
    """Run each distinct bake once; the failed ones and their codes."""
    arches: dict[tuple[str, ...], str] = {}
    for unit in units:
        if unit.bake:
            arches.setdefault(unit.bake, unit.arch)
    if not arches:
        return {}
    done = engine.run([cluster.RunUnit(id=f"bake {bake[bake.index('--name') + 1]}",
                                       argv=vmrun_args(bake), arch=arch)
                       for bake, arch in arches.items()], jobs, on_output)
    return {bake: result.exit_code for bake, result in zip(arches, done, strict=True)
            if result.exit_code != 0}


def with_record(unit: RunUnit, result: RunResult) -> RunResult:
    """RESULT (the engine's: exit code, output, node, attempts, timings) with the files
    UNIT's run collected, from the record it left in its results directory."""
    collected = _json_file(Path(unit.root) / unit.results / RECORD).get("collected", [])
    return dataclasses.replace(
        result, collected=tuple(str(p) for p in collected if isinstance(p, str)))
