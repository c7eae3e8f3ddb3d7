"""Sharing the working directory with the guest: 9p (QEMU's server) or virtiofs."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from vmrun.errors import UsageError
from vmrun.qemu import process
from vmrun.qemu.arch import Arch
from vmrun.qemu.argv import ShareKind
from vmrun.spec import Share


def find_virtiofsd() -> str | None:
    for candidate in (shutil.which("virtiofsd"), "/usr/libexec/virtiofsd",
                      "/usr/lib/qemu/virtiofsd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def choose_share_kind(share: Share, via: str, arch: Arch) -> ShareKind:
    """virtiofs where the host has virtiofsd (and can run it), else 9p; ro always 9p,
    because only QEMU's 9p server enforces read-only on the host side. Guests virtiofsd
    cannot serve (the arch table says which and why) get 9p too."""
    if via == "9p" or share == Share.RO:
        return ShareKind.NINEP
    if not arch.virtiofs or arch.little_endian != (sys.byteorder == "little"):
        if via == "virtiofs":
            raise UsageError(f"--share-via virtiofs: not for a {arch.name} guest",
                             hint="use --share-via 9p")
        return ShareKind.NINEP
    daemon = find_virtiofsd()
    if via == "virtiofs":
        if daemon is None:
            raise UsageError("--share-via virtiofs: virtiofsd not found",
                             hint="apt-get install virtiofsd (or qemu-system-common)")
        return ShareKind.VIRTIOFS
    # The C virtiofsd shipped with QEMU <= 7 sandboxes itself with namespaces: root only.
    if daemon is not None and (os.geteuid() == 0 or not daemon.startswith("/usr/lib/qemu")):
        return ShareKind.VIRTIOFS
    return ShareKind.NINEP


@contextlib.contextmanager
def virtiofsd(path: Path, rundir: Path) -> Iterator[Path]:
    daemon = find_virtiofsd()
    assert daemon is not None
    sock_path = rundir / "virtiofs.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    argv = [daemon, f"--fd={listener.fileno()}", "-o", f"source={path}", "-o", "cache=auto"]
    if daemon.startswith("/usr/lib/qemu"):
        argv += ["-o", "sandbox=chroot"]
    else:
        argv += ["--sandbox", "none"]
    log = rundir / "virtiofsd.log"
    daemon_proc = process.spawn(argv, log=log, pass_fds=(listener.fileno(),))
    listener.close()
    try:
        yield sock_path
    finally:
        try:
            daemon_proc.process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            daemon_proc.process.kill()
            daemon_proc.process.wait()
        os.close(daemon_proc.pidfd)
