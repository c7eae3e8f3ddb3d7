"""The Slurm engine: runs as job arrays (sbatch --array --wait), results in a shared dir."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from vmrun.cluster.units import (
    INFRASTRUCTURE_CODES,
    OnOutput,
    RunResult,
    RunUnit,
    read_timings,
    vmrun_env,
)
from vmrun.errors import ChannelLost, UsageError, VmrunError

if TYPE_CHECKING:
    from vmrun.cluster import ClusterSpec

# A lost node shows as an attempt without a result; a run lost on every attempt reports
# the code of a vanished guest.
LOST_EXIT_CODE = ChannelLost.exit_code
MAX_ATTEMPTS = 3
# QEMU's own memory and vmrun's, beside the guest's: what a run asks Slurm for on top.
MEMORY_OVERHEAD_MIB = 512
TAIL_LINES = 50  # as the local engine keeps
POLL_SECONDS = 1.0
PR_SET_PDEATHSIG = 1
CLUSTER_DIR_ENV = "VMRUN_CLUSTER_DIR"
PYTHON_ENV = "VMRUN_SLURM_PYTHON"


class SlurmError(VmrunError):
    """Slurm refused or lost the work: sbatch failed, or no node can take a run."""

    exit_code = UsageError.exit_code


# ---- placement: what a run asks of a node, and which nodes have it -------------------------

@dataclass(frozen=True)
class Needs:
    """What a run asks of a node: Slurm features (arch-ARCH, kvm), memory and CPUs."""

    features: tuple[str, ...]
    mem_mib: int
    cpus: int

    def sbatch_options(self) -> list[str]:
        options = [f"--mem={self.mem_mib}M", f"--cpus-per-task={self.cpus}"]
        if self.features:
            options.append("--constraint=" + "&".join(self.features))
        return options

    def describe(self) -> str:
        return ", ".join([*self.features, f"{self.mem_mib} MiB", f"{self.cpus} CPU"])


def needs_of(unit: RunUnit) -> Needs:
    """What UNIT needs of a node: its architecture's feature (and kvm), its guest's memory
    with QEMU's beside it, and its guest's CPUs."""
    from vmrun.qemu.arch import lookup_arch

    features = [f"arch-{lookup_arch(unit.arch).name}", *(["kvm"] if unit.kvm else [])]
    return Needs(features=tuple(features), mem_mib=unit.memory_mib + MEMORY_OVERHEAD_MIB,
                 cpus=unit.cpus)


@dataclass(frozen=True)
class Node:
    name: str
    features: frozenset[str]
    mem_mib: int
    cpus: int

    def takes(self, needs: Needs) -> bool:
        return (set(needs.features) <= self.features and needs.mem_mib <= self.mem_mib
                and needs.cpus <= self.cpus)


SINFO_FORMAT = "%N|%P|%f|%m|%c"


def parse_sinfo(text: str, partition: str | None) -> list[Node]:
    """Nodes of PARTITION (None: the default one, starred by sinfo) from `sinfo -N -h -o
    SINFO_FORMAT`."""
    nodes: dict[str, Node] = {}
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        name, part, features, mem, cpus = fields
        wanted = part.endswith("*") if partition is None else part.rstrip("*") == partition
        if not wanted:
            continue
        nodes[name] = Node(name=name,
                           features=frozenset(f for f in features.split(",") if f != "(null)"),
                           mem_mib=int(mem.rstrip("+")), cpus=int(cpus.rstrip("+")))
    return list(nodes.values())


def offers(nodes: Sequence[Node]) -> str:
    """What NODES offer, alike nodes together: "n1, n2: arch-s390x, 4096 MiB, 2 CPU"."""
    alike: dict[tuple[str, int, int], list[str]] = {}
    for n in nodes:
        alike.setdefault((",".join(sorted(n.features)) or "-", n.mem_mib, n.cpus),
                         []).append(n.name)
    return "; ".join(
        f"{', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}: "
        f"{features}, {mem} MiB, {cpus} CPU" for (features, mem, cpus), names in alike.items())


def check_placement(needs: Sequence[Needs], nodes: Sequence[Node], partition: str | None) -> None:
    """Raise SlurmError, naming the run's needs and the nodes' offers, when no node of the
    partition can take one of NEEDS: Slurm would leave it pending for ever."""
    where = f"partition {partition}" if partition else "the default partition"
    if not nodes:
        raise SlurmError(f"Slurm has no nodes in {where}",
                         hint="name a partition: --cluster slurm://PARTITION")
    for need in needs:
        if not any(node.takes(need) for node in nodes):
            raise SlurmError(f"no Slurm node in {where} can take a run needing "
                             f"{need.describe()} (nodes: {offers(nodes)})",
                             hint="give nodes the feature in slurm.conf (Features=), or ask "
                                  "for less memory or fewer CPUs")


def query_nodes(partition: str | None) -> list[Node]:
    out = _slurm(["sinfo", "-N", "-h", "-o", SINFO_FORMAT])
    return parse_sinfo(out, partition)


def _slurm(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} is not on PATH",
                         hint="run vmrun on a Slurm login node (slurm-client)") from None
    if done.returncode != 0:
        raise SlurmError(f"{argv[0]} failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def array_spec(indices: Sequence[int]) -> str:
    """INDICES as Slurm's --array list, consecutive runs folded: 0-3,7,9-10."""
    parts: list[str] = []
    ordered = sorted(indices)
    start = prev = ordered[0]
    for index in [*ordered[1:], None]:
        if index is not None and index == prev + 1:
            prev = index
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if index is not None:
            start = prev = index
    return ",".join(parts)


# ---- the job directory, shared between the submitting host and the nodes -------------------

@dataclass(frozen=True)
class JobDir:
    root: Path

    @property
    def units(self) -> Path:
        return self.root / "units.json"

    @property
    def script(self) -> Path:
        return self.root / "task.py"

    def log(self, index: int, attempt: int) -> Path:
        return self.root / "logs" / f"{index}-a{attempt}.log"

    def log_pattern(self, attempt: int) -> str:
        return str(self.root / "logs" / f"%a-a{attempt}.log")

    def output(self, index: int, attempt: int, fd: int) -> Path:
        return self.root / "out" / f"{index}-a{attempt}.{'stdout' if fd == 1 else 'stderr'}"

    def result(self, index: int, attempt: int) -> Path:
        return self.root / "results" / f"{index}-a{attempt}.json"

    def timings(self, index: int, attempt: int) -> Path:
        return self.root / "out" / f"{index}-a{attempt}.timings.json"

    def read_result(self, index: int, attempt: int) -> RunResult | None:
        try:
            return RunResult.from_json(self.result(index, attempt).read_text())
        except FileNotFoundError:
            return None


def write_job_dir(root: Path, units: Sequence[RunUnit], cwd: Path, python: str) -> JobDir:
    job = JobDir(root)
    for sub in ("logs", "out", "results"):
        (root / sub).mkdir(parents=True)
    job.units.write_text(json.dumps({"cwd": str(cwd),
                                     "units": [json.loads(u.to_json()) for u in units]}))
    # The batch script is Python itself (sbatch wants a #! line): no shell command line
    # is ever built; the job directory and the attempt come as its arguments.
    job.script.write_text(f"#!{python}\nimport sys\nfrom vmrun.cluster.slurm import task_main\n"
                          "sys.exit(task_main(sys.argv[1:]))\n")
    return job


def default_cluster_dir() -> Path:
    return Path(os.environ.get(CLUSTER_DIR_ENV) or Path.home() / ".cache" / "vmrun" / "cluster")


# ---- the array task, on a node ---------------------------------------------------------------

def _die_with_parent() -> None:
    # In the child between fork and exec: vmrun (and through its own death signal, QEMU)
    # dies with this task even where proctrack/linuxproc loses track of it.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        lines = deque(f.read().splitlines(), maxlen=TAIL_LINES)
    return b"\n".join(lines).decode(errors="replace")


def run_task(job: JobDir, index: int, attempt: int, node: str) -> RunResult:
    """Run unit INDEX of JOB (this is attempt ATTEMPT) and write its result file."""
    plan = json.loads(job.units.read_text())
    unit = RunUnit.from_json(json.dumps(plan["units"][index]))
    cwd = Path(plan["cwd"])
    if not cwd.is_dir():
        raise SlurmError(f"{unit.id}: {cwd} is not on node {node}",
                         hint="run from a directory every node mounts")
    print(f"vmrun: {unit.id} attempt {attempt} on {node}: vmrun {' '.join(unit.argv)}",
          flush=True)
    if unit.blobs:
        from vmrun.cluster.blobs import BlobStore
        argv = BlobStore.for_worker().substitute(unit)
    else:
        argv = unit.argv
    started = time.monotonic()
    with open(job.output(index, attempt, 1), "wb") as out, \
            open(job.output(index, attempt, 2), "wb") as err:
        code = subprocess.call(
            [sys.executable, "-m", "vmrun", *argv], cwd=cwd,
            env=vmrun_env(str(job.timings(index, attempt))), stdin=subprocess.DEVNULL,
            stdout=out, stderr=err,
            preexec_fn=_die_with_parent)
    result = RunResult(id=unit.id, exit_code=128 - code if code < 0 else code,
                       seconds=time.monotonic() - started,
                       stdout_tail=_tail(job.output(index, attempt, 1)),
                       stderr_tail=_tail(job.output(index, attempt, 2)),
                       node=node, attempts=attempt,
                       timings=read_timings(job.timings(index, attempt)))
    temp = job.result(index, attempt).with_suffix(".tmp")
    temp.write_text(result.to_json())
    temp.rename(job.result(index, attempt))
    print(f"vmrun: {unit.id} exit {result.exit_code} after {result.seconds:.1f}s", flush=True)
    return result


def task_main(argv: Sequence[str]) -> int:
    """Entry of the batch script: ARGV is JOB_DIR ATTEMPT; the unit is SLURM_ARRAY_TASK_ID."""
    root, attempt = argv
    index = int(os.environ["SLURM_ARRAY_TASK_ID"])
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    run_task(JobDir(Path(root)), index, int(attempt), node)
    return 0


# ---- the engine, on the submitting host -----------------------------------------------------

# Array task states in which a task runs no more (squeue(1) spells them out). In EXITED the
# task's own runner ended: its result file is due, and a shared filesystem may take a
# moment to show it; GONE: slurmctld no longer remembers a task whose job has ended.
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                      "BOOT_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "DEADLINE", "GONE"})
EXITED = frozenset({"COMPLETED", "FAILED", "GONE"})
# Ends that another attempt may not meet: the node failed or was taken away, or the task
# left no result. A task cancelled, out of time or out of memory is not tried again.
RETRIED_STATES = frozenset({"NODE_FAIL", "BOOT_FAIL", "PREEMPTED", *EXITED})
RESULT_GRACE_SECONDS = 15.0


class Verdict(StrEnum):
    WAIT = "wait"  # still queued or running
    DONE = "done"  # its result is the run's outcome
    RETRY = "retry"  # another attempt
    LOST = "lost"  # no result, and no attempt left


def is_final(result: RunResult | None, last: bool) -> bool:
    """Whether an attempt's RESULT (None: the task left none, its node was lost) is the
    run's outcome: anything but vmrun's infrastructure failures is, and the LAST attempt
    always is."""
    return last or (result is not None and result.exit_code not in INFRASTRUCTURE_CODES)


def verdict(result: RunResult | None, state: str | None, waited: float, last: bool) -> Verdict:
    """What to do with an attempt: its RESULT file (None: none yet), its task's STATE (None:
    not known yet), WAITED seconds since it was first seen ended without a result."""
    if result is not None:
        return Verdict.DONE if is_final(result, last) else Verdict.RETRY
    if state not in TERMINAL or (state in EXITED and waited < RESULT_GRACE_SECONDS):
        return Verdict.WAIT
    return Verdict.LOST if last or state not in RETRIED_STATES else Verdict.RETRY


@dataclass(frozen=True)
class Submission:
    job_id: str
    attempt: int
    indices: tuple[int, ...]
    process: subprocess.Popen[str]


def sbatch_argv(job: JobDir, indices: Sequence[int], jobs: int, attempt: int, needs: Needs,
                partition: str | None) -> list[str]:
    return [
        "sbatch", "--parsable", "--wait", "--no-requeue", "--job-name=vmrun",
        f"--array={array_spec(indices)}%{jobs}", f"--output={job.log_pattern(attempt)}",
        *([f"--partition={partition}"] if partition else []),
        *needs.sbatch_options(), str(job.script), str(job.root), str(attempt),
    ]


@contextmanager
def submitted(argv: list[str], attempt: int, indices: Sequence[int]) -> Iterator[Submission]:
    """An array job submitted with --wait; cancelled if the caller leaves while it runs
    (scancel of an ended job changes nothing)."""
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    job_id = process.stdout.readline().strip().split(";")[0]
    if not job_id:
        error = process.stderr.read().strip()
        process.wait()
        raise SlurmError(f"sbatch failed: {error or process.returncode}")
    try:
        yield Submission(job_id=job_id, attempt=attempt, indices=tuple(indices),
                         process=process)
    finally:
        if process.poll() is None:
            subprocess.run(["scancel", job_id], capture_output=True, check=False)
            process.terminate()  # sbatch --wait polls slowly; the job is over or cancelled
        process.communicate()


def task_states(job_id: str) -> dict[int, tuple[str, str]]:
    """State and node of each array task of JOB_ID that slurmctld still remembers."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                             text=True, check=False, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    states: dict[int, tuple[str, str]] = {}
    for line in out.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("ArrayTaskId", "").isdigit():
            states[int(fields["ArrayTaskId"])] = (fields.get("JobState", "?"),
                                                  fields.get("NodeList", "?"))
    return states


def print_output(unit_id: str, fd: int, line: bytes) -> None:
    os.write(fd, f"[{unit_id}] ".encode() + line + b"\n")


@dataclass
class Tracker:
    """One engine run: the units' open attempts, their array jobs, and the results so far."""

    job: JobDir
    units: Sequence[RunUnit]
    needs: Sequence[Needs]
    jobs: int
    partition: str | None
    max_attempts: int
    on_output: OnOutput
    stack: ExitStack
    final: dict[int, RunResult] = field(default_factory=dict)
    current: dict[int, Submission] = field(default_factory=dict)  # open index -> its job
    ended_at: dict[int, float] = field(default_factory=dict)

    def submit(self, indices: Sequence[int], attempt: int) -> None:
        """An array job per distinct set of needs; JOBS is shared between them."""
        groups: dict[Needs, list[int]] = {}
        for index in indices:
            groups.setdefault(self.needs[index], []).append(index)
        share = max(1, self.jobs // len(groups))
        for need, group in groups.items():
            sub = self.stack.enter_context(submitted(
                sbatch_argv(self.job, group, share, attempt, need, self.partition),
                attempt, group))
            self.current.update(dict.fromkeys(group, sub))

    def check(self) -> None:
        """Decide what can be decided: results that appeared, tasks that ended without one."""
        states = {sub.job_id: task_states(sub.job_id) for sub in set(self.current.values())}
        present = set(os.listdir(self.job.root / "results"))  # after the states: no race
        retry: dict[int, list[int]] = {}
        for index, sub in list(self.current.items()):
            state, node = states[sub.job_id].get(index, (
                "GONE" if sub.process.poll() is not None else "", "?"))
            name = self.job.result(index, sub.attempt).name
            result = self.job.read_result(index, sub.attempt) if name in present else None
            if result is None and state in EXITED:
                self.ended_at.setdefault(index, time.monotonic())
            waited = time.monotonic() - self.ended_at.get(index, time.monotonic())
            last = sub.attempt >= self.max_attempts
            what = verdict(result, state or None, waited, last)
            if what is Verdict.WAIT:
                continue
            del self.current[index]
            self.ended_at.pop(index, None)
            why = (f"exit {result.exit_code} on {result.node}" if result
                   else f"{state.lower()} on {node}")
            if what is Verdict.DONE and result is not None:
                self.final[index] = result
                self._emit(index, result, files=True)
            elif what is Verdict.LOST:
                self.final[index] = self._lost(index, sub.attempt, why)
                self._emit(index, self.final[index], files=False)
            else:
                os.write(2, f"vmrun: {self.units[index].id}: attempt {sub.attempt} lost "
                            f"({why}); trying again\n".encode())
                retry.setdefault(sub.attempt + 1, []).append(index)
        for attempt, indices in retry.items():
            self.submit(indices, attempt)

    def _lost(self, index: int, attempt: int, why: str) -> RunResult:
        return RunResult(id=self.units[index].id, exit_code=LOST_EXIT_CODE, seconds=0.0,
                         stderr_tail=f"vmrun: run lost after {attempt} attempt(s) ({why}); "
                                     f"logs in {self.job.root / 'logs'}",
                         attempts=attempt)

    def _emit(self, index: int, result: RunResult, files: bool) -> None:
        """Pass RESULT's output on: the whole of it, from its attempt's files (FILES), or
        the tails the result holds."""
        for fd in (1, 2):
            if files:
                data = self.job.output(index, result.attempts, fd).read_bytes()
            else:
                data = (result.stdout_tail if fd == 1 else result.stderr_tail).encode()
            for line in data.splitlines():
                self.on_output(result.id, fd, line)


class SlurmEngine:
    """Runs units as Slurm array tasks in the partition SPEC names (the cluster's default
    one when it names none). Unit, output and result files, and each task's Slurm log,
    live in a fresh job directory under DIRECTORY ($VMRUN_CLUSTER_DIR by default), which
    every node must see at the same path; it is kept for inspection."""

    def __init__(self, spec: ClusterSpec | None = None, *, directory: Path | None = None,
                 max_attempts: int = MAX_ATTEMPTS, python: str = "") -> None:
        self.partition = (spec.partition if spec is not None else "") or None
        self.directory = directory or default_cluster_dir()
        self.max_attempts = max_attempts
        self.python = python or os.environ.get(PYTHON_ENV) or sys.executable
        self.last_job: JobDir | None = None  # the job directory of the latest run()

    def run(self, units: Sequence[RunUnit], jobs: int,
            on_output: OnOutput = print_output) -> list[RunResult]:
        """Run UNITS, each reported once (its output passed to ON_OUTPUT as its final
        attempt ends); their results in UNITS' order."""
        needs = [needs_of(u) for u in units]
        check_placement(sorted(set(needs), key=str), query_nodes(self.partition), self.partition)
        self.directory.mkdir(parents=True, exist_ok=True)
        job = write_job_dir(Path(tempfile.mkdtemp(prefix="vmrun-slurm-", dir=self.directory)),
                            units, Path.cwd(), self.python)
        self.last_job = job
        with ExitStack() as stack:
            tracker = Tracker(job=job, units=units, needs=needs, jobs=jobs,
                              partition=self.partition, max_attempts=self.max_attempts,
                              on_output=on_output, stack=stack)
            tracker.submit(range(len(units)), 1)
            while tracker.current:
                time.sleep(POLL_SECONDS)
                tracker.check()
        return [tracker.final[i] for i in range(len(units))]
