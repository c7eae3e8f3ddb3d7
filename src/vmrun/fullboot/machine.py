"""FullMachine: a disk image booted in full, with its own firmware and init; commands over SSH.

Its collaborators: the seed and vmrun's cloud-config (cloudconfig), the ready port
(ready), the SSH login and its master connection (sshlink), one command's streams and exit
status (remote). See the package's docstring for the whole story.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from vmrun import runhook, sync
from vmrun import seed as seedlib
from vmrun import ssh as sshlib
from vmrun.channel import new_token
from vmrun.console import Lifecycle, Serial
from vmrun.errors import (
    BootTimeout,
    ChannelLost,
    CommandTimeout,
    UsageError,
    VmrunError,
)
from vmrun.fullboot.cloudconfig import run_cloud_config
from vmrun.fullboot.ready import SERIAL, ReadyPort
from vmrun.fullboot.remote import REMOTE_WRAPPER, RemoteRun
from vmrun.fullboot.sshlink import SshLink
from vmrun.images.attach import Base, attach, prepare
from vmrun.images.partitions import read_head
from vmrun.machine import Result, notice_stderr, silent
from vmrun.ports import CAPTURE_LIMIT
from vmrun.progress import reporter
from vmrun.qemu import accel as accellib
from vmrun.qemu import firmware as fwlib
from vmrun.qemu import process
from vmrun.qemu.arch import Arch, host_arch, lookup_arch
from vmrun.qemu.argv import (
    SERIAL_SSH_PORT,
    SSH_PORT,
    FullBootPlan,
    full_boot_argv,
)
from vmrun.rundir import run_directory
from vmrun.spec import Accel, Command, MachineSpec, Net, Share, boot_timeout_for

Notice = Callable[[str], None]
HOSTFWD = re.compile(rb"TCP\[HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+(\d+)\b")


@dataclass(frozen=True)
class FullOptions:
    """What only a full boot has: firmware, the copy-in rules, what to copy back."""

    firmware: fwlib.Firmware = fwlib.Firmware.AUTO
    rules: tuple[sync.Rule, ...] = ()
    collect: tuple[str, ...] = ()
    # Log in over the virtio-serial port when the image has vmrun's run hook (a baked
    # image); False: always over the forwarded TCP port.
    serial_ssh: bool = True


class FullMachine(Lifecycle):
    """A disk image booted in full; commands run over SSH. Use it as a context manager."""

    def __init__(self, spec: MachineSpec, options: FullOptions | None = None, *,
                 notice: Notice = notice_stderr, stdout_fd: int | None = None,
                 stderr_fd: int | None = None, user_data: bytes | None = None,
                 meta_data: bytes | None = None) -> None:
        if spec.image is None:
            raise UsageError("--boot full needs --image")
        if options is not None and options.collect and spec.tty:
            raise UsageError("--collect cannot be used with -t")
        if options is not None and options.collect and spec.share != Share.RW:
            raise UsageError("--collect writes into the working directory, which needs "
                             "--share rw")
        if spec.volumes or spec.publish:
            # Not yet: the image's own init mounts nothing of vmrun's, and its SSH
            # forward is the only one (see full_boot_argv).
            raise UsageError("--volume and --publish do not work with --boot full",
                             hint="use --boot fast, or copy files in with --include")
        super().__init__(verbose=spec.verbose, notice=notice)
        self.spec = spec
        self.options = options or FullOptions()
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.user_data = user_data  # None: vmrun's own run config (SSH); else a bake
        self.meta_data = meta_data
        self.arch: Arch = lookup_arch(spec.arch or host_arch())
        self.share_path = (spec.share_dir or Path.cwd()).resolve()
        self.base: Base | None = None
        self.overlay: Path | None = None
        self.keys: sshlib.Keys | None = None
        self.ready = ReadyPort()
        self.link: SshLink | None = None  # made with the keys, before the boot
        self.firmware = fwlib.Firmware.AUTO
        self.ssh = ""
        self.copied = False

    # -- lifecycle

    def start(self) -> None:
        t = time.monotonic()
        spec = self.spec
        assert spec.image is not None
        qemu_binary = process.find_qemu(self.arch)
        if self.user_data is None:
            self.ssh = sshlib.find_ssh()
        with reporter(quiet=self.notice is silent) as progress:
            self.base = prepare(spec.image, guest_arch=self.arch.name,
                                debian_arch=self.arch.debian_arch, notice=self.notice,
                                progress=progress, image_format=spec.image_format,
                                insecure_registries=spec.insecure_registries)
        bootable = fwlib.bootable_by(read_head(self.base.path, self.base.format))
        self.firmware = fwlib.choose_firmware(self.arch.name, self.options.firmware, bootable,
                                              spec.image)
        firmware = fwlib.firmware_files(self.arch.name, self.firmware)
        accel = self._accel()
        self.rundir = self.stack.enter_context(
            run_directory(keep=lambda: spec.keep, notice=self.notice))
        self.overlay = attach(self.base, self.rundir).overlay
        seed = self._write_seed()
        uefi_vars = None
        if firmware.vars_template is not None:
            uefi_vars = self.rundir / "uefi-vars.fd"
            shutil.copyfile(firmware.vars_template, uefi_vars)
        fds = self._socketpairs(("qmp", "serial", "ready", "ssh"))
        if self.keys is not None:
            # Read by the run hook, if the image has one, before the SSH client's bytes.
            self.socks["ssh"].sendall(runhook.run_header(self.keys))
        plan = FullBootPlan(
            arch=self.arch, accel=accel, cpus=spec.cpus, memory_mib=spec.memory_mib,
            disk=self.overlay, seed=seed, fds=fds, uefi_code=firmware.code,
            uefi_vars=uefi_vars, net_outbound=spec.net == Net.USER,
            sandbox=process.sandbox_supported(qemu_binary, self.notice),
        )
        argv = full_boot_argv(plan, qemu_binary)
        (self.rundir / "qemu.argv").write_text(shlex.join(argv) + "\n")
        if spec.verbose:
            self.notice(f"firmware: {self.firmware}; qemu argv: {shlex.join(argv)}")
        self.serial = Serial(self.rundir / "serial.log", show=spec.console)
        self.serial.log.touch()
        t = self._phase("prepare", t)
        self._spawn(argv, fds).execute("qmp_capabilities")
        t = self._phase("booting", t)
        forwarded = self._forwarded_ports()
        t = self._phase("port ready", t)
        if self.user_data is None:
            boot_timeout = boot_timeout_for(spec, accel, self.arch.name)
            deadline = time.monotonic() + boot_timeout
            timeout = BootTimeout(f"the guest's SSH server did not start within "
                                  f"{boot_timeout:.0f}s (--boot-timeout)")
            self.pump(lambda: self._ssh_announced() is not None, boot_timeout, timeout)
            guest_port = self._ssh_announced()
            link = self._link()
            assert guest_port is not None
            if guest_port == SERIAL:
                link.use_serial()
                if spec.verbose:
                    self.notice(f"SSH server on the virtio-serial port {SERIAL_SSH_PORT} "
                                "(the image's run hook)")
            else:
                link.port = forwarded.get(guest_port, forwarded[SSH_PORT])
                if spec.verbose:
                    self.notice(f"SSH server on guest port {guest_port}, "
                                f"127.0.0.1:{link.port} here")
            t = self._phase("sshd started", t)
            try:
                link.start_master(self._pump_for_link, deadline, timeout, self.socks["ssh"])
            finally:
                self.failed |= link.failed
            self._phase("ssh ready", t)


    # -- what tests and bakes look at

    @property
    def ready_lines(self) -> list[bytes]:
        return self.ready.lines

    @property
    def port(self) -> int:
        return self.link.port if self.link is not None else 0

    @property
    def proxy(self) -> Path | None:
        return self.link.proxy if self.link is not None else None

    def end_master(self) -> None:
        """Close the shared SSH connection (see SshLink.end_masters)."""
        if self.link is not None:
            self.link.end_masters()

    def _ssh_announced(self) -> int | None:
        return self.ready.ssh_announced(serial_ok=self.options.serial_ssh)

    def _link(self) -> SshLink:
        assert self.link is not None, "the run's keys make the link"
        return self.link

    def _link_failure(self, what: str) -> VmrunError:
        self.failed = True
        return self._link().failure(what)

    def _pump_for_link(self, until: Callable[[], bool], timeout: float, on_timeout: VmrunError,
                       extra: Callable[[list[int]], None],
                       readers: Callable[[], list[int]]) -> None:
        self.pump(until, timeout, on_timeout, extra=extra, readers=readers)

    def _accel(self) -> Accel:
        from vmrun.guest.build import ensure_guest

        if self.spec.accel == Accel.TCG or self.arch.name != host_arch():
            return Accel.TCG
        # KVM is proven with vmrun's own small guest, as for a fast boot.
        with reporter(quiet=self.notice is silent) as progress:
            guest = ensure_guest(self.arch, mirror=self.spec.mirror, notice=self.notice,
                                 insecure_unverified_guest=self.spec.insecure_unverified_guest,
                                 progress=progress)
        choice = accellib.choose_for_guest(self.spec.accel, self.arch, guest.kernel,
                                           guest.initrd)
        fallback = accellib.fallback_notice(choice, verbose=self.spec.verbose)
        if fallback is not None:
            self.notice(fallback)
        return choice.accel

    def _write_seed(self) -> Path:
        assert self.rundir is not None
        if self.user_data is None:
            self.keys = sshlib.make_keys(self.rundir / "ssh")
            self.link = SshLink(self.keys, ssh=self.ssh, log=self.rundir / "ssh.log",
                                stack=self.stack)
            # Held in memory for the seed; no file keeps the host's private key.
            _remove(self.keys.directory / "ssh_host_ed25519_key")
            user_data = seedlib.merge_cloud_config(b"#cloud-config\n",
                                                   run_cloud_config(self.keys))
        else:
            user_data = self.user_data
        meta = seedlib.meta_data(user_meta=self.meta_data)
        path = self.rundir / "seed.iso"
        # The seed holds the guest's SSH host key: gone when the run ends, whatever
        # happened, even with --keep (registered before QEMU starts, so it runs after
        # QEMU has stopped).
        self.stack.callback(_remove, path)
        seedlib.write_seed(path, user_data=user_data, meta_data=meta)
        return path

    def _forwarded_ports(self) -> dict[int, int]:
        """Guest port -> the host port QEMU bound for it on 127.0.0.1."""
        assert self.qmp is not None
        text = self.qmp.execute("human-monitor-command", {"command-line": "info usernet"})
        ports = {int(guest): int(host) for host, guest in HOSTFWD.findall(str(text).encode())}
        if SSH_PORT not in ports:
            raise self._qemu().failure("QEMU did not report the forwarded SSH port")
        return ports

    def _qemu(self) -> process.Qemu:
        assert self.qemu is not None
        return self.qemu

    def _stop(self) -> None:
        if self.qemu is None:
            return
        t = time.monotonic()
        # A run's overlay is thrown away: no guest shutdown to wait for.
        process.stop(self.qemu, self.qmp, grace=3.0)
        self._phase("power-off", t)

    # -- the event loop

    def pump(self, until: Callable[[], bool], timeout: float | None,
             on_timeout: VmrunError | None,
             extra: Callable[[list[int]], None] | None = None,
             readers: Callable[[], list[int]] | None = None,
             on_exit: Callable[[], bool] | None = None) -> None:
        """Read the console, QMP and the ready port until UNTIL() holds (no polling).

        READERS adds fds to wait on and EXTRA handles them; when QEMU exits, ON_EXIT says
        whether that was expected (else the guest vanished)."""
        qemu = self._qemu()
        assert self.qmp is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        serial, ready = self.socks["serial"], self.socks["ready"]
        while not until():
            fds = [qemu.pidfd, serial.fileno(), ready.fileno(), self.qmp.fileno()]
            fds += readers() if readers is not None else []
            readable, _, _ = select.select(fds, [], [], self._wait_until(deadline))
            if qemu.pidfd not in readable:
                self._check_pause()  # (QEMU's exit says more than the pause before it)
            if not readable:
                if deadline is not None and time.monotonic() >= deadline:
                    self.failed = True
                    assert on_timeout is not None, "a timeout needs its error"
                    raise on_timeout
                continue
            if serial.fileno() in readable:
                self._console().read(serial)
            if ready.fileno() in readable:
                self._read_ready()
            if self.qmp.fileno() in readable:
                self.qmp.read_available()
                self._check_qmp_events()
            if extra is not None:
                extra(readable)
            if qemu.pidfd in readable:
                self._console().drain(serial)
                qemu.process.wait()
                if on_exit is not None and on_exit():
                    return
                self._guest_gone()

    def _read_ready(self) -> None:
        try:
            self.ready.read(self.socks["ready"])
        except ChannelLost:
            self.failed = True
            raise

    def _guest_gone(self) -> None:
        self.failed = True
        assert self.serial is not None and self.qemu is not None
        if self.serial.panicked():
            raise self.serial.panic()
        code = self.qemu.process.returncode
        if code not in (0, None):
            raise self.qemu.failure(f"QEMU exited with status {code}")
        tail = self.serial.tail_text(10)
        raise ChannelLost("the VM powered off before the command finished",
                          hint="serial console tail:\n" + tail if tail else None)

    # -- copying

    def copy_in(self) -> None:
        """Copy the working directory into the guest, at the same path, with the rules."""
        t = time.monotonic()
        dest = str(self.share_path)
        remote = ["sh", "-c", '{ mkdir -p -- "$1" 2>/dev/null && [ -w "$1" ]; } || '
                  'sudo -n install -d -o "$(id -un)" -- "$1" && shift && exec "$@"',
                  "sh", dest, *sync.guest_unpack_argv(dest)]
        with open(self._link().log, "ab") as log:
            proc = subprocess.Popen(self._link().argv(remote), stdin=subprocess.PIPE,
                                    stdout=log, stderr=log)
            assert proc.stdin is not None
            try:
                report = sync.pack(self.share_path, self.options.rules, cast(BinaryIO, proc.stdin))
                proc.stdin.close()
            except BrokenPipeError:
                report = None
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            code = self._wait_child(proc)
        if code != 0 or report is None:
            raise self._link_failure("copying the working directory into the guest")
        self.copied = True
        if self.spec.verbose:
            self.notice(f"copied in {report.files} entries, {report.bytes / 1e6:.1f} MB")
        self._phase("copy-in", t)

    def _wait_child(self, proc: subprocess.Popen[bytes]) -> int:
        """Wait for PROC while still reading the console and QMP (QEMU must not stall)."""
        pidfd = os.pidfd_open(proc.pid)
        try:
            self.pump(lambda: proc.poll() is not None, None, None,
                      readers=lambda: [pidfd])
        finally:
            os.close(pidfd)
        return proc.wait()

    def collect(self) -> sync.CollectReport:
        t = time.monotonic()
        remote = sync.guest_pack_argv(str(self.share_path), self.options.collect)
        with open(self._link().log, "ab") as log:
            proc = subprocess.Popen(self._link().argv(remote), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=log)
            assert proc.stdout is not None
            try:
                report = sync.unpack_collected(cast(BinaryIO, proc.stdout), self.share_path)
            finally:
                proc.stdout.close()
                code = self._wait_child(proc)
        if code != 0:
            raise self._link_failure("copying results back from the guest")
        if report.skipped_count:
            self.notice(f"collect skipped {report.skipped_count} entries: "
                        + "; ".join(report.skipped[:3]))
        self._phase("collect", t)
        return report

    def run(self, command: Command, *, capture: bool = False,
            capture_limit: int = CAPTURE_LIMIT) -> Result:
        """Run COMMAND in the guest over SSH; the Result holds its exact exit status (and
        with capture at most CAPTURE_LIMIT bytes of each stream, see Result.truncated)."""
        if capture_limit < 0:
            raise UsageError(f"capture_limit must not be negative (got {capture_limit})")
        if self.qemu is None or self.link is None:
            raise UsageError("the machine is not started (use it in a with statement)")
        if self.spec.share != Share.NONE and not self.copied:
            self.copy_in()
        t = time.monotonic()
        token = new_token()
        cwd = command.cwd or (str(self.share_path) if self.spec.share != Share.NONE else "")
        inner = list(command.argv)
        if command.env:
            inner = ["env", "--", *(f"{k}={v}" for k, v in command.env), *inner]
        remote = ["sh", "-c", REMOTE_WRAPPER, "sh", token, cwd, *inner]
        stdin: int | None = subprocess.DEVNULL
        if command.input is not None:
            stdin = subprocess.PIPE
        elif command.stdin_stream or command.tty:
            stdin = None  # ssh reads this process's stdin
        proc = subprocess.Popen(self.link.argv(remote, tty=command.tty), stdin=stdin,
                                stdout=subprocess.PIPE if capture else self.stdout_fd,
                                stderr=subprocess.PIPE)
        remote_run = RemoteRun(proc, command, token.encode(), capture=capture,
                               capture_limit=capture_limit, stdout_fd=self.stdout_fd,
                               stderr_fd=self.stderr_fd)
        pidfd = os.pidfd_open(proc.pid)
        try:
            self.pump(remote_run.finished, command.timeout, CommandTimeout(
                f"the command ran longer than {command.timeout}s (--timeout)"),
                extra=remote_run.handle, readers=lambda: [pidfd, *remote_run.readers()])
        finally:
            os.close(pidfd)
            remote_run.close()
        exit_code = self._exit_code(remote_run, tty=command.tty)
        self._phase("command", t)
        if self.options.collect:
            self.collect()
        result = Result(exit_code=exit_code, timings=dict(self.timings))
        if capture:
            result.stdout = bytes(remote_run.captured["stdout"])
            result.stderr = bytes(remote_run.captured["stderr"])
            result.truncated = remote_run.truncated
        return result

    def _exit_code(self, remote_run: RemoteRun, *, tty: bool) -> int:
        """The command's exit status: after the token, or with a terminal ssh's own."""
        if remote_run.trailer.status is not None:
            return remote_run.trailer.status
        code = remote_run.proc.returncode
        if tty and code != sshlib.SSH_FAILED:
            return code  # a terminal merges stderr: ssh's own status is the command's
        self.failed = True
        raise self._link().failure_from(bytes(remote_run.trailer.rest), "running the command")


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def run_full(argv: Sequence[str], *, spec: MachineSpec, options: FullOptions | None = None,
             capture: bool = False, input: bytes | None = None,
             env: dict[str, str] | None = None, timeout: float | None = None,
             notice: Notice = notice_stderr, capture_limit: int = CAPTURE_LIMIT) -> Result:
    """Boot SPEC's image in full, run ARGV over SSH, power off; like vmrun.run()."""
    command = Command(argv=tuple(argv), env=tuple((env or {}).items()), timeout=timeout,
                      input=input)
    fds = (None, None) if capture else (sys.stdout.fileno(), sys.stderr.fileno())
    with FullMachine(spec, options, notice=notice, stdout_fd=fds[0],
                     stderr_fd=fds[1]) as machine:
        result = machine.run(command, capture=capture, capture_limit=capture_limit)
    result.timings = dict(machine.timings)
    return result
