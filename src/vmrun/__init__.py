"""vmrun: run a command in a throwaway virtual machine.

    import vmrun
    result = vmrun.run(["uname", "-r"], capture=True)
    with vmrun.Machine(vmrun.MachineSpec(share=vmrun.Share.NONE)) as vm:
        vm.run(vmrun.Command(("make", "check")))
"""

from __future__ import annotations

__version__ = "0.1.0"

from vmrun.errors import (
    BootTimeout,
    ChannelLost,
    CommandTimeout,
    FetchError,
    GuestPanic,
    ImageError,
    QemuError,
    QmpError,
    UnsafeImage,
    UsageError,
    VerificationError,
    VmrunError,
)
from vmrun.machine import Machine, Result, run
from vmrun.spec import Accel, Command, MachineSpec, Net, Share

__all__ = [
    "Accel",
    "BootTimeout",
    "ChannelLost",
    "Command",
    "CommandTimeout",
    "FetchError",
    "GuestPanic",
    "ImageError",
    "Machine",
    "MachineSpec",
    "Net",
    "QemuError",
    "QmpError",
    "Result",
    "Share",
    "UnsafeImage",
    "UsageError",
    "VerificationError",
    "VmrunError",
    "__version__",
    "run",
]
