"""A Dask worker for vmrun runs: probes this host and advertises what it found as resources."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vmrun.cluster import ClusterSpec
from vmrun.cluster.dask import require_dask
from vmrun.qemu import accel as accellib
from vmrun.qemu.arch import ARCHES, host_arch, lookup_arch
from vmrun.spec import host_memory_mib


@dataclass(frozen=True)
class HostProbe:
    arches: tuple[str, ...]  # vmrun architectures whose qemu-system-* is on PATH
    kvm: bool  # a KVM guest of the host's architecture booted here in this host boot
    memory_mib: int
    cores: int


def probe_host(cache: Path) -> HostProbe:
    """What this host offers, starting nothing: KVM counts only where a run here has
    already found it working (vmrun.qemu.accel's remembered answer)."""
    arches = tuple(sorted(name for name, arch in ARCHES.items()
                          if shutil.which(arch.qemu_binary)))
    native = lookup_arch(host_arch())
    qemu = shutil.which(native.qemu_binary)
    answer = accellib.remembered_kvm(qemu, native.machine, cache) if qemu else None
    return HostProbe(arches=arches, kvm=answer == (None,), memory_mib=host_memory_mib(),
                     cores=os.cpu_count() or 1)


def advertised(probe: HostProbe, slots: int, memory_mib: int | None = None
               ) -> dict[str, float]:
    """The worker resources for PROBE with SLOTS runs at once: see vmrun.cluster.dask."""
    resources: dict[str, float] = {f"arch-{name}": slots for name in probe.arches}
    resources["memory_mib"] = memory_mib if memory_mib is not None else probe.memory_mib
    if probe.kvm:
        resources["kvm"] = slots
    return resources


def resources_option(resources: Mapping[str, float]) -> str:
    """RESOURCES as `dask worker --resources` takes them."""
    return " ".join(f"{name}={amount:g}" for name, amount in sorted(resources.items()))


async def _serve(spec: ClusterSpec, slots: int, resources: dict[str, float],
                 name: str | None) -> None:
    from distributed import Worker

    async with Worker(spec.address, nthreads=slots, resources=resources, name=name) as worker:
        await worker.finished()


def serve(spec: ClusterSpec, slots: int, resources: dict[str, float],
          name: str | None = None) -> None:
    """Run a worker (no nanny: the runs' processes die with it) until it is stopped."""
    require_dask()
    asyncio.run(_serve(spec, slots, resources, name))
