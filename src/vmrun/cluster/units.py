"""What a cluster engine runs and what it reports: RunUnit in, RunResult out (JSON both ways)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Called with a unit's id, the stream (1 or 2) and one line of its output, without "\n".
OnOutput = Callable[[str, int, bytes], None]

# vmrun's reserved exit codes that mean the infrastructure failed, not the command: the
# guest vanished (ChannelLost) or QEMU died (QemuError). Only these are retried.
INFRASTRUCTURE_CODES = frozenset({119, 123})

# Where a vmrun process an engine starts writes its run's timings (boot, command, ...) as a
# JSON object: honoured by `vmrun [run]` and by `vmrun test --unit`, whatever the argv.
TIMINGS_ENV = "VMRUN_TIMINGS_FILE"


def vmrun_env(timings_file: str) -> dict[str, str]:
    """The environment of a vmrun process an engine starts: ours, and TIMINGS_ENV."""
    return {**os.environ, TIMINGS_ENV: timings_file}


@dataclass(frozen=True)
class RunUnit:
    """One run: ``python -m vmrun *argv`` (a plain run's options, "--", the command; or a
    subcommand such as ``test --project FILE --unit ID``), and
    what a node needs to take it (the architecture's emulator or KVM, memory, CPUs)."""

    id: str
    argv: tuple[str, ...]
    arch: str
    memory_mib: int = 1024
    kvm: bool = False
    cpus: int = 1  # the guest's virtual CPUs
    # Digests ("sha256:HEX") the run needs; a worker resolves each and puts the local
    # path in place of "{sha256:HEX}" wherever it appears in argv.
    blobs: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunUnit:
        data = json.loads(text)
        return cls(id=data["id"], argv=tuple(data["argv"]), arch=data["arch"],
                   memory_mib=int(data["memory_mib"]), kvm=bool(data["kvm"]),
                   cpus=int(data.get("cpus", 1)),
                   blobs=tuple(data.get("blobs", ())))


@dataclass(frozen=True)
class RunResult:
    """How one unit ended: its exit status (vmrun's, so the command's own or 117-125),
    where it ran and after how many attempts (1 unless the infrastructure failed)."""

    id: str
    exit_code: int
    seconds: float
    stdout_tail: str = ""
    stderr_tail: str = ""
    collected: tuple[str, ...] = ()
    node: str = ""
    attempts: int = 1
    timings: dict[str, float] = field(default_factory=dict)  # the TIMINGS_ENV file

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "collected": list(self.collected)}

    def to_json(self) -> str:
        return json.dumps(self.as_json())

    @classmethod
    def from_json(cls, text: str) -> RunResult:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        return cls(id=data["id"], exit_code=int(data["exit_code"]),
                   seconds=float(data["seconds"]), stdout_tail=data.get("stdout_tail", ""),
                   stderr_tail=data.get("stderr_tail", ""),
                   collected=tuple(data.get("collected", ())), node=data.get("node", ""),
                   attempts=int(data.get("attempts", 1)),
                   timings={k: float(v) for k, v in data.get("timings", {}).items()})


def read_timings(path: Path) -> dict[str, float]:
    """The phase timings a vmrun process wrote to PATH (VMRUN_TIMINGS_FILE); {} if none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, int | float)}
