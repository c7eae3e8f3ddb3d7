"""vmrun: run a command in a throwaway virtual machine.

    import vmrun
    result = vmrun.run(["uname", "-r"], capture=True)  # result.stdout, result.exit_code
    # capture keeps at most capture_limit bytes of each stream (64 MiB by default); past
    # it the rest is dropped, the exit code still arrives and result.truncated is True.
    log = vmrun.run(["make", "check"], capture=True, capture_limit=1 << 20)
    with vmrun.Machine(vmrun.MachineSpec(share=vmrun.Share.NONE)) as vm:
        vm.run(vmrun.Command(("make", "check")))
    spec = vmrun.MachineSpec(image="debian:12", boot=vmrun.Boot.FULL)
    vmrun.run_full(["systemctl", "is-system-running"], spec=spec, capture=True)
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

from vmrun.errors import (
    BakeFailed,
    BootTimeout,
    ChannelLost,
    CommandTimeout,
    FetchError,
    GuestPanic,
    HostKeyMismatch,
    ImageError,
    KernelUnfit,
    QemuError,
    QmpError,
    UnsafeImage,
    UsageError,
    VerificationError,
    VmrunError,
)
from vmrun.machine import Machine, Result, run
from vmrun.spec import Accel, Boot, Command, MachineSpec, Net, Publish, Share, User, Volume

# Imported when first used: they pull in YAML and the seed writer, which a plain
# `vmrun -- CMD` does not need at start-up.
_LAZY = {"FullMachine": "vmrun.fullboot", "FullOptions": "vmrun.fullboot",
         "run_full": "vmrun.fullboot", "bake": "vmrun.bake"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vmrun' has no attribute {name!r}")


__all__ = [
    "Accel",
    "BakeFailed",
    "Boot",
    "BootTimeout",
    "ChannelLost",
    "Command",
    "CommandTimeout",
    "FetchError",
    "FullMachine",
    "FullOptions",
    "GuestPanic",
    "HostKeyMismatch",
    "ImageError",
    "KernelUnfit",
    "Machine",
    "MachineSpec",
    "Net",
    "Publish",
    "QemuError",
    "QmpError",
    "Result",
    "Share",
    "UnsafeImage",
    "UsageError",
    "User",
    "VerificationError",
    "VmrunError",
    "Volume",
    "__version__",
    "bake",
    "run",
    "run_full",
]
