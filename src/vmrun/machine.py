"""Running commands in a VM: a Machine boots once and runs commands one after another."""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import shutil
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from vmrun import share, warm
from vmrun.channel import Request, StdinMode, encode_request, new_token
from vmrun.console import Lifecycle, Serial
from vmrun.errors import (
    BootTimeout,
    ChannelLost,
    CommandTimeout,
    ImageError,
    UsageError,
)
from vmrun.guest.build import Guest, ensure_guest
from vmrun.guestroot import prepare_root
from vmrun.ports import CAPTURE_LIMIT, Ports
from vmrun.progress import reporter
from vmrun.qemu import accel as accellib
from vmrun.qemu import process
from vmrun.qemu.arch import Arch, host_arch, lookup_arch
from vmrun.qemu.argv import (
    PORTS,
    BootPlan,
    RamFile,
    build_argv,
    kernel_cmdline,
)
from vmrun.rundir import run_directory
from vmrun.spec import Boot, Command, MachineSpec, Net, boot_timeout_for, no_command

if TYPE_CHECKING:
    from vmrun.images.attach import Base
    from vmrun.oci.run import OciRun

Notice = Callable[[str], None]
SYNC_TIMEOUT = 5.0  # seconds the agent may take to sync at the end: a ceiling


def notice_stderr(message: str) -> None:
    print(f"vmrun: {message}", file=sys.stderr, flush=True)


def silent(message: str) -> None:
    """The notice of a quiet run (-q): vmrun's own messages are dropped, errors are not."""


@dataclass
class Result:
    """What a command in the guest did.

    With capture, stdout and stderr hold at most the capture limit's bytes each; when a
    stream wrote more, its first bytes are kept, the rest dropped, and truncated is True.
    """

    exit_code: int
    stdout: bytes | None = None
    stderr: bytes | None = None
    timings: dict[str, float] = field(default_factory=dict)
    truncated: bool = False


# ---- the machine -----------------------------------------------------------------------

class Machine(Lifecycle):
    """A booted VM that runs commands one after another; use it as a context manager.

    >>> with Machine(MachineSpec(share=Share.NONE)) as vm:
    ...     vm.run(Command(("uname", "-r")), capture=True).stdout
    """

    def __init__(self, spec: MachineSpec | None = None, *, notice: Notice = notice_stderr,
                 stdout_fd: int | None = None, stderr_fd: int | None = None,
                 share_via: str = "auto", guest: Guest | None = None,
                 oci: OciRun | None = None) -> None:
        """GUEST replaces vmrun's own kernel and initramfs (tests boot other agents); OCI
        is the spec's OCI image when the caller prepared it already (vmrun.oci.run)."""
        self.spec = spec or MachineSpec()
        super().__init__(verbose=self.spec.verbose, notice=notice)
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd
        self.share_via = share_via
        self.first_request = True
        self.argv: list[str] = []
        self.accel: accellib.AccelChoice | None = None
        self.guest: Guest | None = guest
        self.base: Base | None = None
        # What the commands run in: the image's partition (FAST), or SQUASHFS_ROOT.
        self.root: int | str | None = None
        self.oci = oci
        self.shares: share.Shares | None = None  # the working directory's and -v's
        self.arch: Arch = lookup_arch(self.spec.arch or host_arch())
        self.share_path = (self.spec.share_dir or Path.cwd()).resolve()
        self.custom_guest = guest is not None
        self.qemu_binary = ""
        self.overlay: Path | None = None
        self.warm_capable = False  # may start warm or make a template (share by 9p)
        self.first_warm = False  # restored: the first request refreshes the guest's identity
        self.ports: Ports | None = None  # once QEMU's sockets are made

    # -- lifecycle

    def start(self) -> None:
        t = time.monotonic()
        spec = self.spec
        if spec.boot == Boot.FULL:
            raise UsageError("Machine boots vmrun's guest; --boot full is vmrun.fullboot")
        qemu_binary = process.find_qemu(self.arch)
        quiet = self.notice is silent  # -q: no progress either
        progress = self.stack.enter_context(reporter(quiet=quiet))
        prepared = prepare_root(spec, self.arch, notice=self.notice, progress=progress,
                                oci=self.oci)
        self.oci, self.base, self.root = prepared.oci, prepared.base, prepared.root
        # KVM is probed with vmrun's own guest: a kernel of the user's that cannot reach
        # the agent must not have KVM remembered as unusable.
        probe = self.guest
        if probe is None:
            probe = ensure_guest(
                self.arch, mirror=spec.mirror, notice=self.notice,
                insecure_unverified_guest=spec.insecure_unverified_guest,
                progress=progress)
        if self.guest is None and spec.kernel is not None:
            from vmrun.guest.userkernel import user_guest

            self.guest = user_guest(
                spec.kernel, self.arch, modules=spec.modules, mirror=spec.mirror,
                notice=self.notice, progress=progress,
                insecure_unverified_guest=spec.insecure_unverified_guest)
        self.guest = self.guest or probe
        t = self._phase("fetch", t)
        self.accel = accellib.choose_for_guest(spec.accel, self.arch, probe.kernel,
                                               probe.initrd)
        # Said once per host boot, when found (and with --verbose): not before every command;
        # a quiet run leaves the news to the next run that can show it.
        fallback = None if quiet else accellib.fallback_notice(self.accel,
                                                               verbose=spec.verbose)
        if fallback is not None:
            self.notice(fallback)
        self.rundir = self.stack.enter_context(
            run_directory(keep=lambda: spec.keep, notice=self.notice, name=spec.name))
        if spec.verbose and spec.name is not None:
            self.notice(f"run {spec.name}: {self.rundir}")
        why_cold = warm.why_cold(spec, arch=self.arch.name, custom_guest=self.custom_guest,
                                 share_via=self.share_via, qemu=qemu_binary)
        self.warm_capable = why_cold == "" and not spec.cold
        assert self.rundir is not None
        # Warm: 9p, which blocks saving a template only while mounted (virtiofs always).
        self.shares = share.make_shares(spec, self.arch, self.share_path, rundir=self.rundir,
                                        via="9p" if self.warm_capable else self.share_via,
                                        stack=self.stack)
        self.overlay = self._attach_image()
        start_plan = self._start_plan(qemu_binary, why_cold)
        self.serial = Serial(self.rundir / "serial.log", show=spec.console)
        self.serial.log.touch()
        t = self._phase("prepare", t)
        if start_plan.mode == warm.Mode.RESTORE:
            try:
                self._restore(qemu_binary, start_plan)
                self._phase("restore", t)
                return
            except warm.RestoreFailed as exc:
                self.notice(f"warm start failed ({exc}); booting cold, making a new template")
                start_plan = self._locked(warm.remake(start_plan))
        self._boot(qemu_binary, start_plan, t)

    def _plan(self, qemu_binary: str, fds: dict[str, int]) -> BootPlan:
        spec = self.spec
        assert self.guest is not None and self.accel is not None
        return BootPlan(
            arch=self.arch, accel=self.accel.accel, cpus=spec.cpus, memory_mib=spec.memory_mib,
            kernel=self.guest.kernel, initrd=self.guest.initrd,
            cmdline=kernel_cmdline(
                self.arch, console=spec.console, extra=self._cmdline_extra(),
                tsc_khz=accellib.tcg_tsc_khz(self.arch, self.accel.accel),
                warm=self.warm_capable, memory_mib=spec.memory_mib,
            ),
            fds=fds, share=self.shares.workdir if self.shares else None,
            net=spec.net == Net.USER, disk=self.overlay,
            root_image=self.oci.image.path if self.oci is not None else None,
            sandbox=process.sandbox_supported(qemu_binary, self.notice),
            volumes=self.shares.volumes if self.shares else (), forwards=spec.publish,
        )

    def _cmdline_extra(self) -> str:
        """Words after vmrun's own: the agent's check of a kernel of the user's (a normal
        boot skips it), $VMRUN_KERNEL_APPEND, then --append (last: it can override)."""
        words = ["vmrun.check" if self.spec.kernel is not None else "",
                 os.environ.get("VMRUN_KERNEL_APPEND", ""), self.spec.append]
        return " ".join(word for word in words if word)

    def _start_plan(self, qemu_binary: str, why_not: str) -> warm.StartPlan:
        """Warm or cold: the template for this machine's shape, if it can have one."""
        assert self.guest is not None
        shape = None
        if self.warm_capable:
            shape = warm.shape_of(self._plan(qemu_binary, dict.fromkeys(PORTS, 0)),
                                  qemu_binary, self.guest, tty=self.spec.tty)
        return self._locked(warm.choose(shape, cold=self.spec.cold, why_not=why_not,
                                        notice=self.notice))

    def _locked(self, plan: warm.StartPlan) -> warm.StartPlan:
        """PLAN, or a cold start when it would make a template another run is making."""
        if plan.mode == warm.Mode.MAKE and not self.stack.enter_context(
                warm.maker_lock(plan.key)):
            plan = warm.StartPlan(warm.Mode.COLD, why="another run is making the template")
        if self.spec.verbose:
            self.notice(f"start: {plan.mode} ({plan.why})")
        return plan

    def _launch(self, plan: BootPlan, fds: dict[str, int]) -> None:
        self.argv = build_argv(plan, self.qemu_binary)
        assert self.rundir is not None
        (self.rundir / "qemu.argv").write_text(shlex.join(self.argv) + "\n")
        if self.spec.verbose:
            self.notice("qemu argv: " + shlex.join(self.argv))
        self._spawn(self.argv, fds).send("qmp_capabilities")

    def _boot(self, qemu_binary: str, start_plan: warm.StartPlan, t: float) -> None:
        """Boot cold to agent-ready; with MAKE, save the template there and go on."""
        self.qemu_binary = qemu_binary
        fds = self._make_sockets()
        plan = self._plan(qemu_binary, fds)
        assert self.rundir is not None and self.accel is not None
        ram = -1
        if start_plan.mode == warm.Mode.MAKE:
            ram = warm.memory_file(plan.memory_mib << 20)
            self.stack.callback(os.close, ram)
            fds = {**fds, "ram": os.dup(ram)}  # QEMU's copy, closed once it has it
            plan = replace(plan, ram=RamFile(Path(f"/proc/self/fd/{fds['ram']}"), shared=True))
        self._launch(plan, fds)
        boot_timeout = boot_timeout_for(self.spec, self.accel.accel, self.arch.name)
        try:
            self._pump(lambda: "ready" in self._ports().events, boot_timeout, BootTimeout(
                f"the guest agent was not ready within {boot_timeout:.0f}s (--boot-timeout)",
                hint=_user_kernel_hint(self.spec, self.arch)))
        except BootTimeout:
            # A kernel that said what it lacks but cannot power off.
            _check_kernel_fit(self.spec, self._console())
            raise
        t = self._phase("boot", t)
        if start_plan.mode == warm.Mode.MAKE:
            assert self.qmp is not None
            try:
                warm.save(self.qmp, ram, start_plan)
            except warm.TemplateFailed as exc:
                self.notice(f"warm start: no template made ({exc})")
            self._phase("template", t)

    def _restore(self, qemu_binary: str, start_plan: warm.StartPlan) -> None:
        """Start QEMU from the template; RestoreFailed leaves nothing of the attempt."""
        assert start_plan.template is not None
        self.qemu_binary = qemu_binary
        attempt, self.stack = self.stack, contextlib.ExitStack()
        try:
            fds = self._make_sockets()
            state_fd = warm.open_state(start_plan.template)  # _spawn closes it
            plan = replace(self._plan(qemu_binary, fds), incoming=True,
                           ram=RamFile(start_plan.template.ram, shared=False))
            self._launch(plan, {**fds, "state": state_fd})
            assert self.qmp is not None and self.qemu is not None
            warm.restored(self.qmp, self.qemu, start_plan, state_fd, timeout=60.0)
        except BaseException:
            self.failed = True
            self.stack.close()
            self.stack = attempt
            self.failed = False
            self.socks, self.ports, self.qemu, self.qmp = {}, None, None, None
            raise
        attempt.push(self.stack.__exit__)
        self.stack = attempt
        self.first_warm = True

    def _attach_image(self) -> Path | None:
        if self.oci is not None:
            from vmrun.images.attach import record_base

            assert self.rundir is not None
            record_base(self.rundir, None, self.oci.image.path)
        if self.base is None:
            return None
        from vmrun.images.attach import attach

        assert self.rundir is not None
        return attach(self.base, self.rundir).overlay

    def _make_sockets(self) -> dict[str, int]:
        extra = ("tty",) if self.spec.tty else ()
        child_fds = self._socketpairs((*PORTS, *extra, "serial", "qmp"))
        self.ports = Ports(self.socks, self.stdout_fd, self.stderr_fd, tty=self.spec.tty)
        return child_fds

    def _stop(self) -> None:
        """The guest syncs what it wrote, then QEMU quits: its disk image is flushed by
        QEMU itself, and no guest shutdown path is translated afresh (TCG)."""
        if self.qemu is None:
            return
        t = time.monotonic()
        if not self.failed and not self.qemu.exited() and not self._ports().sync(
                self.qemu.pidfd, SYNC_TIMEOUT):
            with contextlib.suppress(OSError):  # an agent that cannot sync: the old way
                self.socks["control"].sendall(b"poweroff\n")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.qemu.process.wait(timeout=5)
        process.stop(self.qemu, self.qmp)
        self._phase("shutdown", t)

    # -- running commands

    def run(self, command: Command, *, capture: bool = False,
            capture_limit: int = CAPTURE_LIMIT) -> Result:
        """Run COMMAND in the guest; returns its exit code (and output when captured:
        at most CAPTURE_LIMIT bytes of each stream, see Result.truncated)."""
        if capture_limit < 0:
            raise UsageError(f"capture_limit must not be negative (got {capture_limit})")
        if self.qemu is None:
            raise UsageError("the machine is not started (use it in a with statement)")
        if command.tty and not self.spec.tty:
            raise UsageError("this machine has no terminal", hint="use MachineSpec(tty=True)")
        if self.oci is not None:
            from vmrun.oci.run import apply

            command = apply(self.oci, command,
                            shared=self.shares is not None and self.shares.workdir is not None)
        elif not command.argv:
            raise no_command()
        t = time.monotonic()
        token = new_token()
        stdin_mode = StdinMode.NULL
        if command.input is not None:
            stdin_mode = StdinMode.FILE
        elif command.stdin_stream and not command.tty:
            stdin_mode = StdinMode.PORT
        mounts = self.shares.mounts() if self.first_request and self.shares else ()
        size: tuple[int, int] | None = None
        if command.tty:
            columns, lines = shutil.get_terminal_size()
            size = (lines, columns)
        seed, clock = warm.fresh_identity() if self.first_warm else (None, None)
        request = Request(
            argv=command.argv, cwd=command.cwd or str(self.share_path), env=command.env,
            token=token, stdin=stdin_mode, stdin_data=command.input or b"", tty=size,
            mounts=mounts, net=self.first_request and self.spec.net == Net.USER,
            disk=self.first_request and self.spec.image is not None,
            root=self.root if self.first_request else None,
            user=self._user(command),
            seed=seed, clock=clock,
        )
        self.first_warm = False
        self.first_request = False
        ports = self._ports()
        ports.begin(encode_request(request), token.encode(), capture=capture,
                    limit=capture_limit, tty=command.tty,
                    stdin_fd=0 if stdin_mode == StdinMode.PORT or command.tty else None)
        exit_code: int | None = None

        def finished() -> bool:
            nonlocal exit_code
            exit_code = ports.exit_code() if exit_code is None else exit_code
            return exit_code is not None and ports.drained()

        with _raw_terminal(command.tty):
            self._pump(ports.started, 60.0,
                       ChannelLost("the guest agent did not start the command"))
            failure = ports.root_failure()
            if failure is not None:
                ports.end()
                if self.oci is not None:
                    raise ImageError(f"the root image of {self.spec.image} {failure}")
                raise ImageError(f"partition {self.root} of image {self.spec.image} {failure}",
                                 hint="use --boot disk to attach it as a plain disk")
            t = self._phase("start", t)
            self._pump(finished, command.timeout, CommandTimeout(
                f"the command ran longer than {command.timeout}s (--timeout)"))
            if command.tty:
                ports.drain_tty()
        self._phase("command", t)
        ports.stdin_fd = None
        result = Result(exit_code=exit_code if exit_code is not None else 255,
                        timings=dict(self.timings))
        if capture:
            result.stdout = bytes(ports.outputs["stdout"].capture or b"")
            result.stderr = bytes(ports.outputs["stderr"].capture or b"")
            result.truncated = any(ports.outputs[n].truncated for n in ("stdout", "stderr"))
        return result

    def _user(self, command: Command) -> tuple[int, int] | None:
        if command.user is not None:  # -u; an OCI image's group was found by apply()
            return command.user.uid, command.user.gid or 0
        if self.oci is None or self.oci.identity.uid == self.oci.identity.gid == 0:
            return None
        return self.oci.identity.uid, self.oci.identity.gid

    def _ports(self) -> Ports:
        assert self.ports is not None
        return self.ports

    # -- the event loop

    def _pump(self, until: Callable[[], bool], timeout: float | None,
              on_timeout: Exception) -> None:
        """Move bytes between host and guest until UNTIL() holds; no polling, no threads."""
        assert self.qemu is not None and self.qmp is not None
        ports = self._ports()
        deadline = None if timeout is None else time.monotonic() + timeout
        serial = self.socks["serial"]
        while not until():
            readers = [self.qemu.pidfd, serial.fileno(), self.qmp.fileno(), *ports.readers()]
            readable, writable, _ = select.select(readers, ports.writers(), [],
                                                  self._wait_until(deadline))
            self._check_pause()
            if not readable and not writable:
                if deadline is not None and time.monotonic() >= deadline:
                    self.failed = True
                    raise on_timeout
                continue
            if serial.fileno() in readable:
                self._console().read(serial)
            if self.qmp.fileno() in readable:
                self.qmp.read_available()
                self._check_qmp_events()
            closed = self.qemu.pidfd in readable
            closed |= not ports.handle(readable, writable)
            if closed:
                self._guest_gone()

    def _guest_gone(self) -> None:
        """QEMU exited while vmrun still waited for the guest: say why, never succeed."""
        assert self.qemu is not None
        self.failed = True
        # Whatever the guest wrote before it went is still in the sockets.
        self._console().drain(self.socks["serial"])
        try:
            code = self.qemu.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            # A channel closed but QEMU lives on: nothing good can come of it.
            self.qemu.process.kill()
            code = self.qemu.process.wait()
        _check_kernel_fit(self.spec, self._console())
        if self._console().panicked():
            panic = self._console().panic()
            panic.hint = _user_kernel_hint(self.spec, self.arch)
            raise panic
        if code != 0:
            raise self.qemu.failure(f"QEMU exited with status {code}")
        tail = self._console().tail_lines(10)
        hint = "serial console tail:\n" + "\n".join(tail) if tail else None
        raise ChannelLost("the VM stopped before the command reported its exit status",
                          hint=_user_kernel_hint(self.spec, self.arch) or hint)


def _check_kernel_fit(spec: MachineSpec, console: Serial) -> None:
    """KernelUnfit when the agent said the kernel lacks options (a kernel of the user's:
    vmrun's own has them all)."""
    if spec.kernel is None:
        return
    from vmrun.guest import userkernel

    missing = userkernel.missing_options(bytes(console.tail))
    if missing:
        raise userkernel.unfit(spec.kernel, missing, modules=spec.modules)


def _user_kernel_hint(spec: MachineSpec, arch: Arch) -> str | None:
    if spec.kernel is None:
        return None
    from vmrun.guest.userkernel import guest_hint

    return guest_hint(arch)


@contextlib.contextmanager
def _raw_terminal(enabled: bool) -> Iterator[None]:
    if not enabled or not os.isatty(0):
        yield
        return
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


def run(argv: Sequence[str], *, spec: MachineSpec | None = None, capture: bool = False,
        input: bytes | None = None, env: dict[str, str] | None = None,
        timeout: float | None = None, cwd: str | None = None,
        notice: Notice = notice_stderr, capture_limit: int = CAPTURE_LIMIT) -> Result:
    """Boot a fresh VM, run ARGV in it, power it off; the Result holds the exit code.

    With capture=False the guest's output goes to this process's stdout and stderr; with
    capture=True at most CAPTURE_LIMIT bytes of each are kept (see Result.truncated).
    """
    command = Command(argv=tuple(argv), env=tuple((env or {}).items()), cwd=cwd,
                      timeout=timeout, input=input)
    fds = (None, None) if capture else (sys.stdout.fileno(), sys.stderr.fileno())
    with Machine(spec, notice=notice, stdout_fd=fds[0], stderr_fd=fds[1]) as machine:
        result = machine.run(command, capture=capture, capture_limit=capture_limit)
    result.timings = dict(machine.timings)
    return result
