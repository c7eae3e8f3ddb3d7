"""Booting a disk image the way a cloud does, and running commands in it over SSH.

The image boots with its own firmware, bootloader, kernel and init on a per-run overlay,
with a NoCloud seed that vmrun writes: a login user authorized for this run's key only,
the host key vmrun made (so it is pinned, and the guest generates none), and transient
units that start an SSH server as soon as the user, keys and network are there and say
so on a virtio-serial port (see early_ssh_commands). The datasource is pinned through
SMBIOS. An image baked by vmrun logs in sooner, over a second virtio-serial port, before
cloud-init (see runhook). The working directory is copied in (with --include /
--exclude rules) and chosen results are copied back (--collect).
"""

from vmrun.fullboot.cloudconfig import (
    early_ssh_commands,
    ready_unit_command,
    run_cloud_config,
    transient_unit,
)
from vmrun.fullboot.machine import FullMachine, FullOptions, run_full
from vmrun.fullboot.ready import MAX_READY_LINE, MAX_READY_LINES, SERIAL, ReadyPort
from vmrun.fullboot.remote import REMOTE_WRAPPER, ExitTrailer

__all__ = [
    "MAX_READY_LINE", "MAX_READY_LINES", "REMOTE_WRAPPER", "SERIAL", "ExitTrailer",
    "FullMachine", "FullOptions", "ReadyPort", "early_ssh_commands", "ready_unit_command",
    "run_cloud_config", "run_full", "transient_unit",
]
