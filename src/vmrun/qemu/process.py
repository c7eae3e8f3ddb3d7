"""Starting QEMU so that it never outlives vmrun, and stopping it by a ladder."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmrun import cache as cachelib
from vmrun import confine
from vmrun.errors import QemuError
from vmrun.qemu.arch import Arch
from vmrun.qemu.argv import SANDBOX
from vmrun.qemu.install import host_system, install_hint
from vmrun.qemu.qmp import Qmp

PR_SET_PDEATHSIG = 1


def find_qemu(arch: Arch) -> str:
    path = shutil.which(arch.qemu_binary)
    if path is None:
        raise QemuError(f"QEMU for {arch.name} is not installed ({arch.qemu_binary} is not "
                        "on PATH)", hint=install_hint(arch, host_system()))
    return path


def _child_setup(parent: int) -> None:
    # Runs in the child between fork and exec: die with vmrun, and never dump core
    # (a QEMU core file holds guest RAM).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    confine.confine()  # no setuid files, device nodes or others' files from the guest


def log_tail(path: Path, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


@dataclass
class Qemu:
    argv: list[str]
    process: subprocess.Popen[bytes]
    pidfd: int
    log: Path

    def exited(self) -> bool:
        return self.process.poll() is not None

    def failure(self, message: str) -> QemuError:
        return QemuError(message, argv=self.argv, log_tail=log_tail(self.log))


def spawn(argv: list[str], *, log: Path, pass_fds: tuple[int, ...]) -> Qemu:
    parent = os.getpid()
    log_file = open(log, "wb")  # noqa: SIM115 - handed to the child, closed right after
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=pass_fds,
            start_new_session=True,  # a terminal's Ctrl-C reaches vmrun, which stops QEMU
            preexec_fn=lambda: _child_setup(parent),
        )
    except OSError as exc:
        raise QemuError(f"cannot start {argv[0]}: {exc.strerror}", argv=argv) from exc
    finally:
        log_file.close()
    return Qemu(argv=argv, process=process, pidfd=os.pidfd_open(process.pid), log=log)


def stop(qemu: Qemu, qmp: Qmp | None, *, grace: float = 3.0) -> None:
    """The shutdown ladder: wait briefly, ask QEMU to quit over QMP, then SIGKILL."""
    try:
        if qemu.exited():
            return
        if qmp is not None and not qmp.closed:
            with contextlib.suppress(Exception):
                qmp.send("quit")
        try:
            qemu.process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
        qemu.process.send_signal(signal.SIGKILL)
        qemu.process.wait(timeout=10)
    finally:
        with contextlib.suppress(OSError):
            os.close(qemu.pidfd)


def qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuError(f"cannot run {qemu} --version: {exc}") from exc
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("QEMU emulator version ").strip()


def sandbox_supported(qemu: str, notice: Callable[[str], None]) -> bool:
    """Whether QEMU takes `-sandbox` (it needs a build with seccomp); when it does not,
    NOTICE says so once per QEMU binary and runs go on without it.

    QEMU parses -sandbox before it acts on -version, so `-sandbox ... -version` fails at
    once on a build without seccomp. The answer is cached per binary (path, inode, size,
    mtime): a probe costs a process start."""
    try:
        info = os.stat(qemu)
    except OSError:
        return True  # QEMU's own start will say what is wrong
    key = cachelib.key_of("sandbox-probe", qemu, str(info.st_ino), str(info.st_size),
                          str(info.st_mtime_ns))
    record = cachelib.cache_dir() / "probes" / key
    try:
        return record.read_text() == "yes"
    except OSError:
        pass
    supported = _probe_sandbox(qemu)
    if supported is None:
        return True
    if not supported:
        notice(f"{qemu} was built without seccomp: QEMU runs without -sandbox")
    with contextlib.suppress(OSError), cachelib.staged(record) as tmp:
        tmp.write_text("yes" if supported else "no")
    return supported


def _probe_sandbox(qemu: str) -> bool | None:
    """True or False; None when QEMU does not even print its version (no answer)."""
    def exits_0(*args: str) -> bool:
        try:
            return subprocess.run([qemu, *args], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=30, check=False).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    if exits_0("-sandbox", SANDBOX, "-version"):
        return True
    return False if exits_0("-version") else None
