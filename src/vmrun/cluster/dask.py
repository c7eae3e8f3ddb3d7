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

import importlib.util
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from vmrun.cluster.blobs import SOURCES_ENV
from vmrun.cluster.units import INFRASTRUCTURE_CODES, OnOutput, RunResult, RunUnit
from vmrun.errors import ChannelLost, UsageError, VmrunError

if TYPE_CHECKING:
    from distributed import Client, Future

    from vmrun.cluster import ClusterSpec

INSTALL_HINT = "pip install 'vmrun[dask]' (dask and distributed), here and on every worker"
ATTEMPTS = 3  # runs of one unit at most, counting those lost with their worker


def require_dask() -> None:
    """Raise a one-line UsageError naming what to install when distributed is missing."""
    if importlib.util.find_spec("distributed") is None:
        raise UsageError("--cluster dask:// needs Dask, which is not installed",
                         hint=INSTALL_HINT)


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

    from vmrun.cluster.blobs import BlobStore
    from vmrun.cluster.local import run_unit

    unit = RunUnit.from_json(unit_json)
    get_worker().log_event(topic, {"start": unit.id})  # attempts are counted from these
    argv = BlobStore.for_worker(sources).substitute(unit) if unit.blobs else unit.argv
    output: list[tuple[int, bytes]] = []
    result = run_unit(unit, lambda _id, fd, line: output.append((fd, line)),
                      node=socket.gethostname(), argv=argv)
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
        from distributed import KilledWorker, as_completed

        with connected(self.spec) as client:
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            check_placement(units, [w.get("resources", {}) for w in workers], str(self.spec))
            topic = f"vmrun-{secrets.token_hex(6)}"
            tries = dict.fromkeys(range(len(units)), 0)
            futures: dict[Future[Any], int] = {}

            def submit(index: int) -> Future[Any]:
                tries[index] += 1
                unit = units[index]
                key = f"vmrun-{re.sub(r'[^A-Za-z0-9_.-]', '_', unit.id)}-{topic}-{tries[index]}"
                future = client.submit(self.task, unit.to_json(), topic, self.blob_sources,
                                       key=key, resources=needs(unit), pure=False,
                                       retries=0)
                futures[future] = index
                return future

            done: dict[int, Outcome] = {}
            pending = as_completed([submit(i) for i in range(len(units))], loop=client.loop)
            for future in pending:
                index = futures.pop(future)
                unit = units[index]
                try:
                    outcome = _outcome(future.result())
                except KilledWorker:
                    outcome = _lost(unit, f"{unit.id}: the Dask workers running it were lost")
                future.release()
                starts = sum(1 for _, msg in client.get_events(topic)
                             if isinstance(msg, dict) and msg.get("start") == unit.id)
                infrastructure = outcome.result.exit_code in INFRASTRUCTURE_CODES
                if infrastructure and max(starts, tries[index]) < self.attempts:
                    pending.add(submit(index))
                    continue
                done[index] = replace(outcome, result=replace(
                    outcome.result, attempts=max(starts, tries[index], 1)))
                for fd, line in outcome.output:
                    on_output(unit.id, fd, line)
        return [done[i].result for i in range(len(units))]
