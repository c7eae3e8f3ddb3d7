"""Where runs execute: this host (`local`), a Dask scheduler (`dask://HOST:PORT`) or Slurm.

An engine takes RunUnits and gives back one RunResult per unit, in the units' order:

    engine = engine_for(parse_cluster("dask://10.0.0.5:8786"))
    results = engine.run(units, jobs=4, on_output=print_line)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol
from urllib.parse import urlsplit

from vmrun.cluster.units import INFRASTRUCTURE_CODES, OnOutput, RunResult, RunUnit
from vmrun.errors import UsageError

__all__ = ["INFRASTRUCTURE_CODES", "ClusterSpec", "Engine", "Kind", "OnOutput", "RunResult",
           "RunUnit", "engine_for", "parse_cluster"]

DASK_PORT = 8786


class Kind(StrEnum):
    LOCAL = "local"
    DASK = "dask"
    SLURM = "slurm"


@dataclass(frozen=True)
class ClusterSpec:
    kind: Kind
    host: str = ""  # dask: the scheduler's host
    port: int = 0  # dask: the scheduler's port
    partition: str = ""  # slurm: "" for the cluster's default partition

    @property
    def address(self) -> str:
        """The Dask scheduler's address, as distributed spells it."""
        return f"tcp://{self.host}:{self.port}"

    def __str__(self) -> str:
        if self.kind is Kind.DASK:
            return f"dask://{self.host}:{self.port}"
        if self.kind is Kind.SLURM:
            return f"slurm://{self.partition}"
        return "local"


class Engine(Protocol):
    def run(self, units: Sequence[RunUnit], jobs: int, on_output: OnOutput
            ) -> list[RunResult]:
        """Run UNITS (at most JOBS at a time where the engine limits it), passing output
        lines to ON_OUTPUT; one result per unit, in UNITS' order, each reported once."""
        ...


USAGE = "--cluster takes local, dask://HOST:PORT or slurm://[PARTITION]"


def parse_cluster(url: str) -> ClusterSpec:
    if url == "local":
        return ClusterSpec(Kind.LOCAL)
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in (Kind.DASK, Kind.SLURM):
        raise UsageError(f"--cluster {url!r}: unknown kind of cluster", hint=USAGE)
    parts = urlsplit(url)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"--cluster {url!r}: nothing may follow the "
                         f"{'address' if scheme == Kind.DASK else 'partition'}", hint=USAGE)
    if scheme == Kind.SLURM:
        partition = parts.netloc
        if partition and not partition.replace("-", "").replace("_", "").replace(
                ".", "").isalnum():
            raise UsageError(f"--cluster {url!r}: {partition!r} is not a partition name",
                             hint=USAGE)
        return ClusterSpec(Kind.SLURM, partition=partition)
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise UsageError(f"--cluster {url!r}: {e}", hint=USAGE) from None
    if not host:
        raise UsageError(f"--cluster {url!r}: no scheduler host", hint=USAGE)
    return ClusterSpec(Kind.DASK, host=host, port=port or DASK_PORT)


def engine_for(spec: ClusterSpec) -> Engine:
    """The engine for SPEC; a Dask or Slurm engine whose software is missing says what to
    install when it is asked for, not before."""
    if spec.kind is Kind.DASK:
        from vmrun.cluster.dask import DaskEngine
        return DaskEngine(spec)
    if spec.kind is Kind.SLURM:
        try:
            from vmrun.cluster.slurm import (  # type: ignore[import-not-found,unused-ignore]
                SlurmEngine,
            )
        except ModuleNotFoundError as e:
            if e.name != "vmrun.cluster.slurm":
                raise
            raise UsageError(f"--cluster {spec}: this vmrun has no Slurm engine") from None
        engine: Engine = SlurmEngine(spec)
        return engine
    from vmrun.cluster.local import LocalEngine
    return LocalEngine()
