"""The Dask engine: one task per unit on an existing scheduler, placed by worker resources.

Resource names a worker advertises and a unit asks for (`vmrun cluster worker` probes them;
a plain `dask worker --resources "arch-x86_64=2 memory_mib=8192"` works as well):

    arch-NAME   slots for guests of vmrun architecture NAME (its qemu-system-* is installed)
    memory_mib  guest memory the worker may hand out, in MiB
    kvm         slots whose guests get KVM (the host's own architecture, /dev/kvm works)

Only vmrun's infrastructure failures are retried (the guest vanished: 119, QEMU died: 123,
the worker was lost); a command's own exit status, whatever it is, is its result.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from vmrun.cluster.blobs import SOURCES_ENV, BlobStore
from vmrun.cluster.units import INFRASTRUCTURE_CODES, OnOutput, RunResult, RunUnit
from vmrun.errors import ChannelLost, UsageError, VmrunError

if TYPE_CHECKING:
    from distributed import Client, Future

    from vmrun.cluster import ClusterSpec

INSTALL_HINT = "pip install 'vmrun[dask]' (dask and distributed), here and on every worker"
ATTEMPTS = 3  # runs of one unit at most, counting those lost with their worker


def require_dask() -> None:
    """Raise a one-line UsageError naming what to install when distributed is missing."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise UsageError("--cluster dask:// needs Dask, which is not installed",
                         hint=INSTALL_HINT) from None


def needs(unit: RunUnit) -> dict[str, float]:
    """The worker resources UNIT asks for."""
    wanted: dict[str, float] = {f"arch-{unit.arch}": 1, "memory_mib": unit.memory_mib}
    if unit.kvm:
        wanted["kvm"] = 1
    return wanted


def fits(wanted: Mapping[str, float], offered: Mapping[str, float]) -> bool:
    return all(offered.get(name, 0) >= amount for name, amount in wanted.items())


def check_placement(units: Sequence[RunUnit], workers: Sequence[Mapping[str, float]],
                    where: str) -> None:
    """Refuse, before anything is submitted, a unit that no worker in WORKERS (their
    resources) could ever take: Dask would leave it waiting for ever."""
    if not workers:
        raise VmrunError(f"no Dask worker is connected to {where}",
                         hint="start one on each node: vmrun cluster worker " + where)
    for unit in units:
        wanted = needs(unit)
        if not any(fits(wanted, offered) for offered in workers):
            asked = ", ".join(f"{k}={v:g}" for k, v in sorted(wanted.items()))
            offered = "; ".join(sorted({" ".join(f"{k}={v:g}" for k, v in sorted(w.items()))
                                        or "nothing" for w in workers}))
            raise VmrunError(f"no Dask worker at {where} can run {unit.id!r}: it needs "
                             f"{asked}; the {len(workers)} worker(s) offer {offered}",
                             hint=f"start `vmrun cluster worker {where}` on a host with "
                             f"QEMU for {unit.arch} and enough memory")


@dataclass(frozen=True)
class Outcome:
    """What one task returned: the result and every output line of that attempt."""

    result: RunResult
    output: tuple[tuple[int, bytes], ...]


def execute(unit_json: str, topic: str, sources: tuple[str, ...]) -> dict[str, Any]:
    """The task a worker runs: UNIT here, in a child process that dies with the worker."""
    from distributed import get_worker

    from vmrun.cluster.local import run_unit

    unit = RunUnit.from_json(unit_json)
    worker = get_worker()
    key = worker.get_current_task()
    worker.log_event(topic, {"start": unit.id})  # attempts are counted from these
    argv = BlobStore.for_worker(sources).substitute(unit) if unit.blobs else unit.argv

    def cancelled() -> bool:
        # The client went away or released the run: Dask cannot stop a running task's
        # thread, so the task stops its vmrun (and so its VM) itself.
        task = worker.state.tasks.get(key)
        return task is None or task.state in ("cancelled", "released", "forgotten")

    output: list[tuple[int, bytes]] = []
    result = run_unit(unit, lambda _id, fd, line: output.append((fd, line)),
                      node=socket.gethostname(), argv=argv, cancelled=cancelled)
    return {"result": result.to_json(), "output": output}


# A unit's JSON, the events topic, blob sources -> {"result": RunResult JSON, "output": lines}
Task = Callable[[str, str, tuple[str, ...]], dict[str, Any]]


def _outcome(payload: dict[str, Any]) -> Outcome:
    return Outcome(RunResult.from_json(payload["result"]),
                   tuple((int(fd), bytes(line)) for fd, line in payload["output"]))


def _lost(unit: RunUnit, reason: str) -> Outcome:
    line = f"vmrun: error: {reason}".encode()
    return Outcome(RunResult(id=unit.id, exit_code=ChannelLost.exit_code, seconds=0.0,
                             stderr_tail=line.decode(), node="-"), ((2, line),))


@contextmanager
def connected(spec: ClusterSpec) -> Iterator[Client]:
    require_dask()
    from distributed import Client
    try:
        client = Client(spec.address, timeout="15s", set_as_default=False)
    except (OSError, TimeoutError) as e:
        raise VmrunError(f"cannot reach the Dask scheduler at {spec}: {e}",
                         hint="is `dask scheduler` running there, and the port open?"
                         ) from None
    try:
        yield client
    finally:
        client.close()


class DaskEngine:
    """Units as tasks on the Dask scheduler SPEC names. The workers' slots, not JOBS,
    bound how many run at once; output comes per unit when its run ends."""

    def __init__(self, spec: ClusterSpec, *, blob_sources: Sequence[str] | None = None,
                 attempts: int = ATTEMPTS, task: Task = execute) -> None:
        """BLOB_SOURCES: where workers fetch blobs their caches lack (default: this
        environment's VMRUN_BLOB_SOURCES). TASK runs one unit on a worker (the scheduling
        benchmark swaps in its own; vmrun's runs use execute)."""
        require_dask()
        self.spec = spec
        self.blob_sources = tuple(os.environ.get(SOURCES_ENV, "").split()
                                  if blob_sources is None else blob_sources)
        self.attempts = attempts
        self.task = task

    def run(self, units: Sequence[RunUnit], jobs: int, on_output: OnOutput
            ) -> list[RunResult]:
        with connected(self.spec) as client:
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            check_placement(units, [w.get("resources", {}) for w in workers], str(self.spec))
            batch = Batch(client, units, self, f"vmrun-{secrets.token_hex(6)}")
            try:
                outcomes = batch.collect(on_output)
            except (OSError, CancelledError) as e:
                raise VmrunError(f"lost the Dask scheduler at {self.spec} mid-run: "
                                 f"{str(e) or type(e).__name__}") from None
        return [outcomes[i].result for i in range(len(units))]


class Batch:
    """One engine.run's units on the cluster: their tasks, tries and start events."""

    def __init__(self, client: Client, units: Sequence[RunUnit], engine: DaskEngine,
                 topic: str) -> None:
        self.client = client
        self.units = units
        self.engine = engine
        self.topic = topic  # the events topic the tasks' starts go to
        self.tries = dict.fromkeys(range(len(units)), 0)
        self.futures: dict[Future[Any], int] = {}

    def submit(self, index: int) -> Future[Any]:
        self.tries[index] += 1
        unit = self.units[index]
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", unit.id)
        future = self.client.submit(
            self.engine.task, unit.to_json(), self.topic, self.engine.blob_sources,
            key=f"vmrun-{name}-{self.topic}-{self.tries[index]}", resources=needs(unit),
            pure=False, retries=0)
        self.futures[future] = index
        return future

    def starts(self, unit: RunUnit) -> int:
        """How many times a worker started UNIT: Dask itself reruns a task whose worker
        was lost, and only the task knows it ran."""
        return sum(1 for _, msg in self.client.get_events(self.topic)
                   if isinstance(msg, dict) and msg.get("start") == unit.id)

    def collect(self, on_output: OnOutput) -> dict[int, Outcome]:
        """Each unit's final outcome, resubmitting those the infrastructure failed."""
        from distributed import KilledWorker, as_completed

        done: dict[int, Outcome] = {}
        pending = as_completed([self.submit(i) for i in range(len(self.units))],
                               loop=self.client.loop)
        for future in pending:
            index = self.futures.pop(future)
            unit = self.units[index]
            try:
                outcome = _outcome(future.result())
            except KilledWorker:
                outcome = _lost(unit, f"{unit.id}: the Dask workers running it were lost")
            future.release()
            attempts = max(self.starts(unit), self.tries[index], 1)
            if (outcome.result.exit_code in INFRASTRUCTURE_CODES
                    and attempts < self.engine.attempts):
                pending.add(self.submit(index))
                continue
            done[index] = replace(outcome, result=replace(outcome.result, attempts=attempts))
            for fd, line in outcome.output:
                on_output(unit.id, fd, line)
        return done
