"""Deciding a run's start (restore a template, boot cold and make one, or just boot cold),
saving a booted guest as a template, and waiting for a restored one to run."""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from vmrun.cache import sha256_file
from vmrun.errors import QemuError
from vmrun.guest.build import Guest
from vmrun.qemu import process
from vmrun.qemu.accel import tcg_tsc_khz
from vmrun.qemu.argv import PSERIES_FDT_WINDOW_MIB, BootPlan
from vmrun.qemu.qmp import Qmp
from vmrun.spec import Accel, MachineSpec, Share
from vmrun.warm import ramfile, store
from vmrun.warm.key import (
    Shape,
    binary_identity,
    host_cpu,
    qemu_version_cached,
    template_key,
)

Notice = Callable[[str], None]
SAVE_TIMEOUT = 30.0  # seconds the device state may take to save: a ceiling, never a measure


# Where a restored copy was seen to run and to reseed its generator (vmrun-reseed, see
# vmrun/guest/reseed.py): every architecture but riscv64, whose copies QEMU (7.2 and 10.0
# alike) restores without the ACLINT mtimer's time_delta or the Sstc timer, so some
# copies' timers never fire (`sleep` hangs; fixes posted upstream in September 2025).
# ppc64le also needs a QEMU that migrates the decrementer, and no more memory than its
# device tree's window allows (see why_cold).
WARM_ARCHES = frozenset({"x86_64", "i386", "aarch64", "armv7", "s390x", "ppc64le"})
# QEMU before 8.2 does not migrate a ppc CPU's decrementer ("target/ppc: Migrate DECR
# SPR"): a restored pseries copy's timers never fire (`sleep 1` never returns).
PPC_DECR_MIGRATED = (8, 2)

class Mode(StrEnum):
    COLD = "cold"  # boot, no template
    MAKE = "make"  # boot, then save a template at agent-ready and go on
    RESTORE = "warm"  # restore a template


class TemplateFailed(QemuError):
    """A template could not be saved; the run that tried goes on without one."""


class RestoreFailed(QemuError):
    """A template could not be restored; the run boots cold instead."""


@dataclass(frozen=True)
class StartPlan:
    mode: Mode
    key: str = ""
    shape: Shape | None = None
    template: store.Template | None = None
    why: str = ""  # said with -v


def choose(shape: Shape | None, *, cold: bool, why_not: str, notice: Notice) -> StartPlan:
    """How this run starts. SHAPE None: it cannot be warm (WHY_NOT says why). A template
    that fails its checks is removed (with one line) and a new one made."""
    if cold:
        return StartPlan(Mode.COLD, why="--cold")
    if shape is None:
        return StartPlan(Mode.COLD, why=why_not)
    key = template_key(shape)
    template = store.find(key)
    if template is not None:
        reason = store.refusal(template, key, shape)
        if reason is None:
            return StartPlan(Mode.RESTORE, key, shape, template, f"template {key[:12]}")
        notice(f"warm start: template {key[:12]} refused ({reason}); booting cold, "
               "making a new one")
        store.remove(template)
    return StartPlan(Mode.MAKE, key, shape, why=f"no template {key[:12]} yet")


def save(qmp: Qmp, ram: int, plan: StartPlan) -> store.Template:
    """Save the running guest (its RAM shared, in the file RAM) as PLAN's template, then
    let it go on.

    The device state goes to a file QEMU gets by fd (exec: is refused by -sandbox and
    file: needs QEMU 8); migration ends with the guest stopped, the RAM file is copied
    while it is, then the guest continues."""
    assert plan.shape is not None
    staging = store.staging_directory(plan.key)
    try:
        made = time.time()
        with open(staging / "state", "wb") as out:
            qmp.execute("getfd", {"fdname": "vmrun-template"}, fds=(out.fileno(),))
        qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True},
            {"capability": "events", "state": True}]})
        qmp.execute("migrate", {"uri": "fd:vmrun-template"})
        _wait_migrated(qmp)
        digest = ramfile.copy_sparse_fd(ram, staging / "ram")
        qmp.execute("cont")
        files = {"ram": store.file_record(staging / "ram", digest),
                 "state": store.file_record(staging / "state",
                                            sha256_file(staging / "state"))}
        store.write_meta(staging, plan.key, plan.shape, files, made)
        return store.publish(staging, plan.key)
    except QemuError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(QemuError):
            qmp.execute("cont")  # the run goes on cold, whatever state saving left
        raise TemplateFailed(str(exc)) from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _wait_migrated(qmp: Qmp) -> None:
    deadline = time.monotonic() + SAVE_TIMEOUT
    while True:
        for event in qmp.events:
            if event.get("event") != "MIGRATION":
                continue
            status = (event.get("data") or {}).get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                info = qmp.execute("query-migrate")
                raise QemuError(f"saving the template failed: {info.get('error-desc', status)}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise QemuError(f"saving the template took more than {SAVE_TIMEOUT:.0f}s")
        if select.select([qmp.fileno()], [], [], left)[0]:
            qmp.read_available()
            if qmp.closed:
                raise QemuError("QEMU closed its monitor while saving the template")


def wait_restored(qmp: Qmp, qemu: process.Qemu, state_fd: int, timeout: float) -> None:
    """Load the device state from STATE_FD (which QEMU inherited) and wait until the
    restored guest runs (it resumes on its own); RestoreFailed when QEMU exits or stays
    stopped."""
    try:
        qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]}, timeout=timeout)
        qmp.execute("migrate-incoming", {"uri": f"fd:{state_fd}"}, timeout=timeout)
        status = qmp.execute("query-status", timeout=timeout)
    except QemuError as exc:
        raise RestoreFailed(str(exc), argv=qemu.argv,
                            log_tail=process.log_tail(qemu.log)) from exc
    deadline = time.monotonic() + timeout
    while status.get("status") != "running":
        if any(e.get("event") == "RESUME" for e in qmp.events):
            return
        if status.get("status") not in ("inmigrate", "prelaunch", "restore-vm"):
            raise RestoreFailed(f"the restored VM is {status.get('status')}, not running",
                                argv=qemu.argv, log_tail=process.log_tail(qemu.log))
        left = deadline - time.monotonic()
        if left <= 0:
            raise RestoreFailed(f"restoring took more than {timeout:.0f}s", argv=qemu.argv)
        readable = select.select([qmp.fileno(), qemu.pidfd], [], [], left)[0]
        if qemu.pidfd in readable:
            raise RestoreFailed("QEMU could not restore the template", argv=qemu.argv,
                                log_tail=process.log_tail(qemu.log))
        if qmp.fileno() in readable:
            qmp.read_available()


def open_state(template: store.Template) -> int:
    """The device-state file as an fd for QEMU to inherit (-incoming fd:N)."""
    return os.open(template.state, os.O_RDONLY)


def restored(qmp: Qmp, qemu: process.Qemu, plan: StartPlan, state_fd: int,
             timeout: float) -> None:
    """Restore the template's state, wait for the guest to run, note the template's use."""
    assert plan.template is not None
    wait_restored(qmp, qemu, state_fd, timeout)
    store.mark_used(plan.template)


def remake(plan: StartPlan) -> StartPlan:
    """After a failed restore: the template goes, and this run boots cold to make a new
    one (when no other run is making it already)."""
    if plan.template is not None:
        store.remove(plan.template)
    return StartPlan(Mode.MAKE, plan.key, plan.shape, why="the template could not be restored")


def why_cold(spec: MachineSpec, *, arch: str, custom_guest: bool, share_via: str,
             qemu: str = "") -> str:
    """Why a run with SPEC (on the QEMU binary QEMU) cannot start warm; "" when it can."""
    if arch not in WARM_ARCHES:
        return f"warm starts are not verified for {arch} guests yet"
    if arch == "ppc64le":
        why = _why_cold_pseries(spec, qemu)
        if why:
            return why
    if custom_guest:
        return "a guest other than vmrun's own"
    if spec.kernel is not None:
        # A copy of a template is a machine of its own only once the restored kernel has
        # reseeded its generator (a suspend cycle through PM_DEBUG's pm_test), which a
        # kernel of the user's need not offer; and it changes with every build, so a
        # template would be made far more often than used.
        return "--kernel boots cold: a template needs a kernel vmrun can reseed"
    if share_via == "virtiofs" and (spec.share != Share.NONE or spec.volumes):
        return "virtiofs (vhost-user-fs) cannot be saved in a template: use --share-via 9p"
    if os.environ.get("VMRUN_COLD"):
        return "VMRUN_COLD is set"
    return ""


def _why_cold_pseries(spec: MachineSpec, qemu: str) -> str:
    if spec.memory_mib > PSERIES_FDT_WINDOW_MIB:
        # Above it, pseries writes its device tree at reset into the middle of the guest's
        # memory, where no mem= keeps the kernel away (see kernel_cmdline).
        return f"a ppc64le guest starts warm with at most {PSERIES_FDT_WINDOW_MIB} MiB"
    version = qemu_version_cached(qemu) if qemu else ""
    if version_tuple(version) < PPC_DECR_MIGRATED:
        this = version.split(" ", 1)[0] or "unknown"
        return (f"ppc64le starts warm on QEMU 8.2 or later (QEMU {this} does not restore "
                "the decrementer)")
    return ""


def version_tuple(version: str) -> tuple[int, ...]:
    """(MAJOR, MINOR) of a QEMU version string ("7.2.22 (Debian ...)"); () if none."""
    head = version.split(" ", 1)[0].split(".")[:2]
    return tuple(int(part) for part in head) if all(p.isdigit() for p in head) else ()


def shape_of(plan: BootPlan, qemu: str, guest: Guest, *, tty: bool) -> Shape:
    """The shape of the machine PLAN boots (its fds aside)."""
    hardware = plan.accel in (Accel.KVM, Accel.HVF)
    return Shape(
        arch=plan.arch.name, accel=str(plan.accel), cpus=plan.cpus,
        memory_mib=plan.memory_mib, share="none" if plan.share is None else str(plan.share.kind),
        volumes=len(plan.volumes), net=plan.net, tty=tty, disk=disk_kind(plan), guest=guest.key,
        kernel=str(plan.kernel), initrd=str(plan.initrd), cmdline=plan.cmdline,
        tsc_khz=tcg_tsc_khz(plan.arch, plan.accel), host_cpu=host_cpu() if hardware else "",
        qemu=qemu, qemu_version=qemu_version_cached(qemu), qemu_identity=binary_identity(qemu),
        sandbox=plan.sandbox,
    )


def disk_kind(plan: BootPlan) -> str:
    """The kind of PLAN's block device (Shape.disk)."""
    if plan.disk is not None:
        return "overlay"
    return "" if plan.root_image is None else "root-image"


def fresh_identity() -> tuple[str, int]:
    """What the first request after a restore carries so that the copy is a machine of its
    own: fresh entropy for the kernel's generator, and the host's time (whole seconds:
    busybox's date takes no fraction, so rounding keeps it within half a second)."""
    return secrets.token_hex(32), round(time.time())
