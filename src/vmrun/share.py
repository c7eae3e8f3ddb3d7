"""Sharing the working directory with the guest: 9p (QEMU's server) or virtiofs.

The guest is root in its VM and the share is the host's directory, so what a guest may do
there is decided on the host. The model: files the guest creates belong to vmrun's user,
with the modes the guest gives them (chmod +x, symlinks and FIFOs work as on a local
disk), except that QEMU and virtiofsd run under a seccomp filter (vmrun.confine) that
refuses set-user-ID and set-group-ID modes, device nodes, any owner or thread identity
other than vmrun's own user, and extended attributes (security.capability would make a
host binary privileged). So as root too, a guest leaves no setuid programs, device nodes
or other users' files behind. Paths never leave the share: QEMU's 9p server walks every
component with openat(O_NOFOLLOW) from the share's root, and virtiofsd is chrooted into
it (C daemon: -o sandbox=chroot; Rust daemon: --sandbox chroot as root, namespace
otherwise), so a symlink a guest makes is only ever resolved by the guest's own kernel.
9p keeps security_model=none: failures to set the owner are ignored, as a guest's root
creating files for a non-root vmrun needs; the filter, not the model, refuses the rest."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmrun.channel import Mount
from vmrun.errors import UsageError
from vmrun.qemu import process
from vmrun.qemu.arch import Arch
from vmrun.qemu.argv import SHARE_TAG, ShareDevice, ShareKind, volume_tag
from vmrun.spec import MachineSpec, Share, Volume


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
        if not daemon_runs_as(daemon, os.geteuid()):
            raise UsageError(f"--share-via virtiofs: {daemon} runs as root only",
                             hint="use --share-via 9p, or install the virtiofsd package")
        return ShareKind.VIRTIOFS
    if daemon is not None and daemon_runs_as(daemon, os.geteuid()):
        return ShareKind.VIRTIOFS
    return ShareKind.NINEP


def daemon_runs_as(daemon: str, euid: int) -> bool:
    # The C virtiofsd shipped with QEMU <= 7 sandboxes itself with chroot or namespaces
    # that need root; the Rust one also runs as an ordinary user.
    return euid == 0 or not is_c_daemon(daemon)


def is_c_daemon(daemon: str) -> bool:
    return daemon.startswith("/usr/lib/qemu")


def virtiofsd_argv(daemon: str, fd: int, path: Path, euid: int) -> list[str]:
    """How vmrun starts DAEMON on the listening socket FD: confined to PATH, no xattrs."""
    if is_c_daemon(daemon):
        # Its own capability drops back up vmrun.confine's filter: no device nodes,
        # no set-id bits kept, no file capabilities, no chown to others.
        return [daemon, f"--fd={fd}", "-o", f"source={path}", "-o", "cache=auto",
                "-o", "sandbox=chroot", "-o", "no_xattr",
                "-o", "modcaps=-mknod:-setfcap:-fsetid:-chown"]
    return [daemon, f"--fd={fd}", "-o", f"source={path}", "-o", "cache=auto",
            "--sandbox", "chroot" if euid == 0 else "namespace"]


def volume_source(volume: Volume) -> Path:
    """VOLUME's host directory, resolved; a file, or nothing there, is a UsageError (9p
    and virtiofs share directories: a file is given by sharing its directory)."""
    try:
        host = volume.host.resolve(strict=True)
    except (OSError, RuntimeError):
        raise UsageError(f"volume {volume.host}: no such directory on the host",
                         hint="create it first; vmrun never creates host directories") from None
    if not host.is_dir():
        raise UsageError(f"volume {volume.host}: not a directory",
                         hint="share the directory that holds it: -v DIR:GUESTDIR")
    return host


def check_clash(volumes: Sequence[Volume], workdir: Path) -> None:
    """No volume goes where the shared working directory WORKDIR is mounted."""
    clash = next((v for v in volumes if v.target == str(workdir)), None)
    if clash is not None:
        raise UsageError(f"volume {clash.host}: {workdir} is the shared working directory's "
                         "guest path", hint="give the volume another guest path")


@contextlib.contextmanager
def virtiofsd(path: Path, rundir: Path, name: str = "virtiofs") -> Iterator[Path]:
    daemon = find_virtiofsd()
    assert daemon is not None
    sock_path = rundir / f"{name}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    argv = virtiofsd_argv(daemon, listener.fileno(), path, os.geteuid())
    log = rundir / f"{name}d.log"
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


@dataclass(frozen=True)
class Shares:
    """The directories a run shares with its guest: the working directory (None when not
    shared) and the volumes (-v), each a device, and where each is mounted."""

    workdir: ShareDevice | None
    workdir_path: Path
    volumes: tuple[ShareDevice, ...] = ()
    targets: tuple[str, ...] = ()  # each volume's guest path

    def mounts(self) -> tuple[Mount, ...]:
        """The first request's mounts: parents before what is mounted inside them."""
        places = [] if self.workdir is None else [(self.workdir, str(self.workdir_path))]
        places += zip(self.volumes, self.targets, strict=True)
        places.sort(key=lambda place: place[1].rstrip("/").count("/"))
        return tuple(Mount(str(device.kind), device.tag, device.readonly, path)
                     for device, path in places)


def make_shares(spec: MachineSpec, arch: Arch, workdir_path: Path, *, via: str, rundir: Path,
                stack: contextlib.ExitStack) -> Shares:
    """SPEC's shares over VIA (auto, 9p or virtiofs; a warm-capable run passes 9p, which
    blocks saving a template only while mounted), virtiofsd started into STACK."""
    workdir = None
    if spec.share != Share.NONE:
        if not workdir_path.is_dir():
            raise UsageError(f"cannot share {workdir_path}: not a directory")
        workdir = _device(spec.share, via, arch, workdir_path, spec.share == Share.RO,
                          rundir, stack, name="virtiofs", tag=SHARE_TAG)
        check_clash(spec.volumes, workdir_path)
    volumes = []
    for index, volume in enumerate(spec.volumes, 1):
        mode = Share.RO if volume.readonly else Share.RW
        volumes.append(_device(mode, via, arch, volume_source(volume), volume.readonly,
                               rundir, stack, name=f"virtiofs{index}", tag=volume_tag(index)))
    return Shares(workdir, workdir_path, tuple(volumes),
                  tuple(volume.target for volume in spec.volumes))


def _device(mode: Share, via: str, arch: Arch, host: Path, readonly: bool, rundir: Path,
            stack: contextlib.ExitStack, *, name: str, tag: str) -> ShareDevice:
    kind = choose_share_kind(mode, via, arch)
    sock = None
    if kind == ShareKind.VIRTIOFS:
        sock = stack.enter_context(virtiofsd(host, rundir, name=name))
    return ShareDevice(kind, host, readonly, sock, tag)
