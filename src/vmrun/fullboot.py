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

from __future__ import annotations

import contextlib
import os
import re
import select
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from vmrun import runhook, sync
from vmrun import seed as seedlib
from vmrun import ssh as sshlib
from vmrun.channel import TokenScanner, new_token
from vmrun.console import Lifecycle, Serial
from vmrun.errors import (
    BootTimeout,
    ChannelLost,
    CommandTimeout,
    HostKeyMismatch,
    UsageError,
    VmrunError,
)
from vmrun.images.attach import Base, attach, prepare
from vmrun.images.partitions import read_head
from vmrun.machine import CAPTURE_LIMIT, Result, notice_stderr, silent
from vmrun.progress import reporter
from vmrun.qemu import accel as accellib
from vmrun.qemu import firmware as fwlib
from vmrun.qemu import process
from vmrun.qemu.arch import Arch, host_arch, lookup_arch
from vmrun.qemu.argv import (
    EARLY_SSH_PORT,
    READY_PORT,
    SERIAL_SSH_PORT,
    SSH_PORT,
    FullBootPlan,
    full_boot_argv,
)
from vmrun.rundir import run_directory
from vmrun.spec import Accel, Command, MachineSpec, Net, Share, boot_timeout_for

Notice = Callable[[str], None]
SERIAL = -1  # "port" of the run hook's SSH server, on the virtio-serial port
MAX_READY_LINE = 64 << 10  # a base64 cloud-init result.json fits; anything longer is refused
MAX_READY_LINES = 64  # distinct messages on the ready port; the guest sends two or three
HOSTFWD = re.compile(rb"TCP\[HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+(\d+)\b")
SSH_PROPS = ("After=ssh.service", "After=sshd.service", "After=ssh.socket")
# What cloud-init's network stage waits for before it starts, but cloud-init itself: the
# user, the keys (cloud-init's local stage writes them when the seed is a local disk) and
# a configured network, whichever of the usual network managers brings it up.
EARLY_PROPS = ("DefaultDependencies=no", "After=cloud-init-local.service",
               "After=systemd-networkd-wait-online.service", "After=networking.service",
               "After=NetworkManager-wait-online.service", "Conflicts=shutdown.target",
               "Before=shutdown.target")
EARLY_SSHD = (
    'mkdir -p -m 0755 /run/sshd && exec /usr/sbin/sshd -D -e -p {port} -o PidFile=none '
    '-o PasswordAuthentication=no -o KbdInteractiveAuthentication=no '
    '-o PermitRootLogin=no -o AllowUsers={user} -o UsePAM=no'
)

# Run in the guest by the login shell: cd, run, then the exit status after a token on
# stderr, so an exit status of 255 is never mistaken for ssh's own failure.
REMOTE_WRAPPER = (
    't=$1; d=$2; shift 2; '
    'if [ -n "$d" ]; then cd -- "$d" || { printf "%s%d\\n" "$t" 126 >&2; exit 126; }; fi; '
    '"$@"; rc=$?; printf "%s%d\\n" "$t" "$rc" >&2; exit "$rc"'
)


@dataclass(frozen=True)
class FullOptions:
    """What only a full boot has: firmware, the copy-in rules, what to copy back."""

    firmware: fwlib.Firmware = fwlib.Firmware.AUTO
    rules: tuple[sync.Rule, ...] = ()
    collect: tuple[str, ...] = ()
    # Log in over the virtio-serial port when the image has vmrun's run hook (a baked
    # image); False: always over the forwarded TCP port.
    serial_ssh: bool = True


def transient_unit(name: str, props: Sequence[str], script: str) -> list[str]:
    """A bootcmd entry that queues the transient unit NAME running SCRIPT, with PROPS.
    bootcmd runs in cloud-init's first stage, before the SSH server starts."""
    return ["systemd-run", "--no-block", f"--unit={name}", "--quiet",
            *(f"--property={prop}" for prop in props), "/bin/sh", "-c", script]


def ready_unit_command(message: str, props: Sequence[str] = SSH_PROPS,
                       name: str = "vmrun-ready") -> list[str]:
    """A transient unit, ordered after PROPS, that writes MESSAGE to the ready port."""
    return transient_unit(name, props, f"echo {message} > /dev/virtio-ports/{READY_PORT}")


def early_ssh_commands() -> list[list[str]]:
    """An SSH server of the image's own, on another port, started as soon as the user,
    the keys and the network are there, without waiting for cloud-init's network stage
    (a Python start-up that does nothing more for a local seed; 15 s and more under TCG)
    and all that is ordered after it. Its readiness (sshd's own sd_notify) is announced
    as `ssh PORT`; should it fail, the image's SSH server still announces `ssh 22`.

    It runs without PAM: PAM's nologin check keeps users out until the boot is over, which
    is the wait this server exists to skip. Without PAM sshd refuses a locked account, so
    the login user's password is "*" (matches no password) rather than locked."""
    sshd = transient_unit("vmrun-sshd", (*EARLY_PROPS, "Type=notify"),
                          EARLY_SSHD.format(port=EARLY_SSH_PORT, user=sshlib.LOGIN_USER))
    ready = ready_unit_command(f"ssh {EARLY_SSH_PORT}", (
        "DefaultDependencies=no", "After=vmrun-sshd.service", "Requisite=vmrun-sshd.service"),
        name="vmrun-ready-early")
    return [sshd, ready]


def run_cloud_config(keys: sshlib.Keys) -> dict[str, Any]:
    """vmrun's cloud-config for a run: its login user, the pinned host key, readiness."""
    return {
        "users": [{
            "name": sshlib.LOGIN_USER, "shell": "/bin/sh", "lock_passwd": False,
            "hashed_passwd": "*",
            "sudo": "ALL=(ALL) NOPASSWD:ALL", "ssh_authorized_keys": [keys.client_public],
        }],
        "ssh_pwauth": False,
        "disable_root": True,
        "ssh_deletekeys": True,
        # Only the type the seed brings: cloud-init generates none (the schema wants one).
        "ssh_genkeytypes": ["ed25519"],
        "ssh_keys": {"ed25519_private": keys.host_private,
                     "ed25519_public": keys.host_public},
        # The run's overlay has the base's size: there is nothing to grow.
        "growpart": {"mode": "off"},
        "resize_rootfs": False,
        "bootcmd": [
            # cloud-init's later stages (a Python start-up each, seconds under TCG) still
            # run, but yield the CPU to the login and the command.
            *(["systemctl", "set-property", "--runtime", unit, "CPUWeight=1"]
              for unit in ("cloud-init.service", "cloud-config.service",
                           "cloud-final.service")),
            *early_ssh_commands(),
            ready_unit_command(f"ssh {SSH_PORT}"),
        ],
    }


# ---- the machine -------------------------------------------------------------------------

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
        self.ready_lines: list[bytes] = []
        self.ready_buffer = b""
        self.port = 0
        self.proxy: Path | None = None  # the socket ssh takes the serial stream from
        self.sockets: Path | None = None
        self.firmware = fwlib.Firmware.AUTO
        self.ssh = ""
        self.copied = False
        self.control: Path | None = None
        self.masters: list[subprocess.Popen[bytes]] = []

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
            assert guest_port is not None
            if guest_port == SERIAL:
                self.proxy = self._socket_dir() / "proxy"
                if spec.verbose:
                    self.notice(f"SSH server on the virtio-serial port {SERIAL_SSH_PORT} "
                                "(the image's run hook)")
            else:
                self.port = forwarded.get(guest_port, forwarded[SSH_PORT])
                if spec.verbose:
                    self.notice(f"SSH server on guest port {guest_port}, "
                                f"127.0.0.1:{self.port} here")
            t = self._phase("sshd started", t)
            self._start_master(deadline, timeout)
            self._phase("ssh ready", t)

    def _ssh_announced(self) -> int | None:
        """The guest port of the first SSH server the guest announced (SERIAL: the run
        hook's, on the virtio-serial port), if one has."""
        for line in self.ready_lines:
            words = line.split()
            if words[:1] == [b"ssh"]:
                port = words[1] if len(words) > 1 else b""
                if port == b"serial":
                    if self.options.serial_ssh:
                        return SERIAL
                    continue
                return int(port) if port in (b"%d" % SSH_PORT, b"%d" % EARLY_SSH_PORT) \
                    else SSH_PORT
        return None

    def _socket_dir(self) -> Path:
        """A private directory for the run's UNIX sockets, short enough for their names
        (about 108 bytes): the keys' own, else one under the temporary directory."""
        assert self.keys is not None
        if self.sockets is None:
            self.sockets = self.keys.directory
            if len(os.fsencode(self.keys.directory / "control")) > 100:
                self.sockets = Path(tempfile.mkdtemp(prefix="vmrun-ssh-"))
                self.stack.callback(shutil.rmtree, self.sockets, ignore_errors=True)
        return self.sockets

    def _listen_for_proxy(self) -> socket.socket | None:
        """The socket ssh's ProxyCommand fetches the serial stream from (None: TCP)."""
        if self.proxy is None:
            return None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.stack.callback(listener.close)
        listener.bind(str(self.proxy))
        listener.listen(1)
        listener.setblocking(False)
        return listener

    def _hand_over_stream(self, listener: socket.socket) -> bool:
        """Give the serial stream to the ProxyCommand that connected (ours: same user).
        True once handed over; the stream serves one connection, so this is once."""
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return False
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
            if struct.unpack("3i", creds)[1] != os.getuid():
                return False
            stream = self.socks["ssh"]
            stream.setblocking(True)  # ssh expects a blocking descriptor
            socket.send_fds(conn, [b"x"], [stream.fileno()])
        stream.close()
        listener.close()
        return True

    def _start_master(self, deadline: float, timeout: VmrunError) -> None:
        """Log in once; later sessions share this connection (see ssh.ssh_options)."""
        assert self.rundir is not None and self.keys is not None
        control = self._socket_dir() / "control"
        listener = self._listen_for_proxy()
        argv = sshlib.ssh_argv(self.keys, self.port, ["sh", "-c", "echo ready; exec cat"],
                               ssh=self.ssh, control=control, master=True, proxy=self.proxy)
        with open(self._ssh_log(), "ab") as log:
            master = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=log)
        self.masters.append(master)
        self.stack.callback(_end_master, master)
        assert master.stdout is not None
        out = master.stdout.fileno()
        said = bytearray()

        def read(readable: list[int]) -> None:
            nonlocal listener
            if listener is not None and listener.fileno() in readable \
                    and self._hand_over_stream(listener):
                listener = None
            if out in readable:
                data = os.read(out, 64)
                said.extend(data if data else b"<eof>")

        self.pump(lambda: b"ready\n" in said or b"<eof>" in said,
                  max(1.0, deadline - time.monotonic()), timeout, extra=read,
                  readers=lambda: [out] if listener is None else [out, listener.fileno()])
        if b"ready\n" not in said:
            master.wait()
            raise self._ssh_failure("logging in to the guest")
        self.control = control

    def end_master(self) -> None:
        """Close the shared connection; later sessions connect (and check the key) anew,
        which only TCP allows (the serial stream serves one connection)."""
        self.control = None
        for callback_master in list(self.masters):
            _end_master(callback_master)

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
            data = self.socks["ready"].recv(1 << 16)
        except BlockingIOError:
            return
        self.ready_buffer += data
        while b"\n" in self.ready_buffer:
            line, self.ready_buffer = self.ready_buffer.split(b"\n", 1)
            line = line.strip()
            if line in self.ready_lines:
                continue  # the same message again grows nothing
            if len(self.ready_lines) >= MAX_READY_LINES:
                self.failed = True
                raise ChannelLost("the guest sent too many messages on vmrun's ready port")
            self.ready_lines.append(line)
        if len(self.ready_buffer) > MAX_READY_LINE:
            self.failed = True
            raise ChannelLost("the guest sent an oversized message on vmrun's ready port")

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

    # -- SSH

    def _ssh(self, remote: Sequence[str], *, tty: bool = False) -> list[str]:
        assert self.keys is not None
        return sshlib.ssh_argv(self.keys, self.port, remote, tty=tty, ssh=self.ssh,
                               control=self.control, proxy=self.proxy)

    def _ssh_log(self) -> Path:
        assert self.rundir is not None
        return self.rundir / "ssh.log"

    def _ssh_failure(self, what: str) -> VmrunError:
        self.failed = True
        log = process.log_tail(self._ssh_log(), 600)
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in log or "Host key verification failed" in log:
            return HostKeyMismatch(f"{what}: the server on the forwarded port did not show the "
                              "guest's pinned host key (refused as an impostor)")
        last = log.strip().splitlines()[-1] if log.strip() else "no message"
        return ChannelLost(f"{what}: ssh failed: {last}")

    def copy_in(self) -> None:
        """Copy the working directory into the guest, at the same path, with the rules."""
        t = time.monotonic()
        dest = str(self.share_path)
        remote = ["sh", "-c", '{ mkdir -p -- "$1" 2>/dev/null && [ -w "$1" ]; } || '
                  'sudo -n install -d -o "$(id -un)" -- "$1" && shift && exec "$@"',
                  "sh", dest, *sync.guest_unpack_argv(dest)]
        with open(self._ssh_log(), "ab") as log:
            proc = subprocess.Popen(self._ssh(remote), stdin=subprocess.PIPE,
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
            raise self._ssh_failure("copying the working directory into the guest")
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
        with open(self._ssh_log(), "ab") as log:
            proc = subprocess.Popen(self._ssh(remote), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=log)
            assert proc.stdout is not None
            try:
                report = sync.unpack_collected(cast(BinaryIO, proc.stdout), self.share_path)
            finally:
                proc.stdout.close()
                code = self._wait_child(proc)
        if code != 0:
            raise self._ssh_failure("copying results back from the guest")
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
        if self.qemu is None or self.keys is None:
            raise UsageError("the machine is not started (use it in a with statement)")
        if command.user is not None:
            raise UsageError("--user does not work with --boot full",
                             hint="switch users in the command (su, setpriv)")
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
        stdout: int | None = subprocess.PIPE if capture else self.stdout_fd
        proc = subprocess.Popen(self._ssh(remote, tty=command.tty), stdin=stdin, stdout=stdout,
                                stderr=subprocess.PIPE)
        trailer = ExitTrailer(token.encode())
        captured = {"stdout": bytearray(), "stderr": bytearray()}
        truncated = False
        pending_input = bytearray(command.input or b"")
        pidfd = os.pidfd_open(proc.pid)
        streams = {proc.stderr.fileno(): "stderr"} if proc.stderr else {}
        if proc.stdout is not None:
            streams[proc.stdout.fileno()] = "stdout"
        if proc.stdin is not None:
            if pending_input:
                os.set_blocking(proc.stdin.fileno(), False)
            else:
                proc.stdin.close()

        def handle(readable: list[int]) -> None:
            nonlocal truncated
            for fd, name in list(streams.items()):
                if fd not in readable:
                    continue
                data = os.read(fd, 1 << 16)
                if not data:
                    del streams[fd]
                    continue
                if name == "stderr":
                    data = trailer.feed(data)
                if capture:
                    room = capture_limit - len(captured[name])
                    captured[name] += data[:max(0, room)]
                    truncated |= len(data) > room
                else:
                    sink = self.stderr_fd if name == "stderr" else self.stdout_fd
                    if sink is not None:
                        _write_all(sink, data)
            if proc.stdin is not None and not proc.stdin.closed and pending_input:
                try:
                    sent = os.write(proc.stdin.fileno(), pending_input)
                    del pending_input[:sent]
                except BlockingIOError:
                    pass
                except BrokenPipeError:
                    pending_input.clear()
                if not pending_input:
                    proc.stdin.close()

        def finished() -> bool:
            return not streams and proc.poll() is not None

        try:
            self.pump(finished, command.timeout, CommandTimeout(
                f"the command ran longer than {command.timeout}s (--timeout)"),
                extra=handle, readers=lambda: [pidfd, *streams])
        finally:
            os.close(pidfd)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        code = proc.returncode
        if trailer.status is not None:
            exit_code = trailer.status
        elif command.tty and code != sshlib.SSH_FAILED:
            exit_code = code  # a terminal merges stderr: ssh's own status is the command's
        else:
            raise self._ssh_failure_from(bytes(trailer.rest))
        self._phase("command", t)
        if self.options.collect:
            self.collect()
        result = Result(exit_code=exit_code, timings=dict(self.timings))
        if capture:
            result.stdout = bytes(captured["stdout"])
            result.stderr = bytes(captured["stderr"])
            result.truncated = truncated
        return result

    def _ssh_failure_from(self, stderr_tail: bytes) -> VmrunError:
        with open(self._ssh_log(), "ab") as log:
            log.write(stderr_tail)
        return self._ssh_failure("running the command")


def _end_master(master: subprocess.Popen[bytes]) -> None:
    if master.poll() is not None:
        return
    with contextlib.suppress(OSError):
        if master.stdin is not None:
            master.stdin.close()  # the remote `cat` sees EOF, and the session ends
    try:
        master.wait(timeout=5)
    except subprocess.TimeoutExpired:
        master.kill()
        master.wait()
    if master.stdout is not None:
        master.stdout.close()


class ExitTrailer:
    """Passes ssh's stderr through; the exit status follows the token, on its line."""

    def __init__(self, token: bytes) -> None:
        self.scanner = TokenScanner(token)
        self.status: int | None = None
        self.trailer = b""
        self.rest = bytearray()  # the end of what came without a token: ssh's complaints

    def feed(self, data: bytes) -> bytes:
        if self.scanner.done:
            self._take_status(data)
            return b""
        out = self.scanner.feed(data)
        if self.scanner.done:
            self._take_status(self.scanner.after)
        else:
            self.rest += out
            del self.rest[:-4096]
        return out

    def _take_status(self, data: bytes) -> None:
        if self.status is not None:
            return
        self.trailer = (self.trailer + data)[:16]
        line, newline, _ = self.trailer.partition(b"\n")
        if newline:
            digits = line.strip()
            ok = digits.isdigit() and len(digits) <= 3 and int(digits) <= 255
            self.status = int(digits) if ok else 255


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BrokenPipeError:
            return
        view = view[written:]


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
