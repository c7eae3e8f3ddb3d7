"""QEMU's argv as a pure function of a boot plan: no I/O, so every line is unit-testable."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from vmrun.qemu.arch import Arch, Transport
from vmrun.spec import Accel, Publish

# The chardevs vmrun connects to the guest agent's virtio-serial ports, in this order.
PORTS = ("control", "status", "stdout", "stderr", "stdin")
SHARE_TAG = "vmrun0"
# QEMU's seccomp filter; process.sandbox_supported probes for it (a build may lack seccomp).
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny"


class ShareKind(StrEnum):
    NINEP = "9p"
    VIRTIOFS = "virtiofs"


def volume_tag(index: int) -> str:
    """The mount tag of volume INDEX (from 1): SHARE_TAG is the working directory's."""
    return f"vmrun{index}"


@dataclass(frozen=True)
class ShareDevice:
    kind: ShareKind
    path: Path
    readonly: bool
    socket: Path | None = None  # virtiofs: virtiofsd's vhost-user socket
    tag: str = SHARE_TAG  # the working directory's; volumes (-v) are vmrun1, vmrun2, ...


@dataclass(frozen=True)
class BootPlan:
    arch: Arch
    accel: Accel  # resolved: never AUTO
    cpus: int
    memory_mib: int
    kernel: Path
    initrd: Path
    cmdline: str
    fds: dict[str, int]  # chardev id -> fd QEMU inherits: PORTS, "tty", "serial", "qmp"
    share: ShareDevice | None = None
    net: bool = True
    disk: Path | None = None  # the run's own qcow2 overlay, attached as a virtio disk
    root_image: Path | None = None  # instead of DISK: a raw image attached read-only (OCI)
    sandbox: bool = True  # -sandbox needs QEMU built with seccomp
    ram: RamFile | None = None  # guest RAM in a file: a warm-start template's (vmrun.warm)
    incoming: bool = False  # wait for the device state to restore (migrate-incoming)
    volumes: tuple[ShareDevice, ...] = ()  # more shared directories (-v), after SHARE
    forwards: tuple[Publish, ...] = ()  # host ports forwarded to the guest (-p)

    @property
    def shares(self) -> tuple[ShareDevice, ...]:
        """Every shared directory: the working directory's first."""
        return (*(() if self.share is None else (self.share,)), *self.volumes)

    def uses_virtiofs(self) -> bool:
        return any(s.kind == ShareKind.VIRTIOFS for s in self.shares)


@dataclass(frozen=True)
class RamFile:
    """Guest RAM in a file: written through by the run that makes a template (shared), a
    copy-on-write view of it for the runs restored from it (never written)."""

    path: Path
    shared: bool


# A pseries machine writes its device tree (FDT_MAX_SIZE, at most 2 MiB, below the top of
# its RMA: the top of memory, up to 2 GiB) into guest RAM at every reset, a restored copy's
# included, over what the guest keeps there (its paca and stacks: a panic). A guest that
# may become a template is told to leave its top PSERIES_FDT_RESERVE_MIB alone (mem=).
PSERIES_FDT_WINDOW_MIB = 2048
PSERIES_FDT_RESERVE_MIB = 4


def kernel_cmdline(arch: Arch, *, console: bool, probe: bool = False, extra: str = "",
                   tsc_khz: int | None = None, warm: bool = False,
                   memory_mib: int = 0) -> str:
    words = [f"console={arch.console}", "panic=-1", "rdinit=/init"]
    if tsc_khz:
        # Under TCG the guest's TSC runs at the host's rate, and calibrating it against the
        # emulated PIT fails now and then on a busy host (the boot then hangs): say it.
        words.append(f"tsc_early_khz={tsc_khz}")
    # Quiet boots are faster under TCG: every console byte is an emulated UART write.
    words += ["loglevel=4"] if console else ["quiet", "loglevel=1"]
    words += arch.kernel_args
    if probe:
        words.append("vmrun.probe")
    if warm:
        # The agent readies before "ready" what a restored copy would otherwise do after
        # restore, where TCG translates every code path afresh (see vmrun.warm).
        words.append("vmrun.warm")
        if arch.name == "ppc64le" and memory_mib:
            words.append(f"mem={memory_mib - PSERIES_FDT_RESERVE_MIB}M")
    if extra:
        words.append(extra)  # last, so it overrides: a debugging aid (VMRUN_KERNEL_APPEND)
    return " ".join(words)


def accel_args(plan: BootPlan | FullBootPlan) -> list[str]:
    match plan.accel:
        case Accel.KVM:
            return ["-accel", "kvm", "-cpu", "host"]
        case Accel.HVF:
            return ["-accel", "hvf", "-cpu", "host"]
        case _:
            return ["-accel", "tcg", "-cpu", plan.arch.cpu_tcg]


def machine_args(plan: BootPlan) -> list[str]:
    machine = plan.arch.machine
    if machine.startswith("microvm"):
        # The PIT stays: without it (and with no HPET) the kernel cannot calibrate the TSC.
        machine += ",isa-serial=on,rtc=on"
    if plan.arch.name == "aarch64" and plan.accel == Accel.KVM:
        machine += ",gic-version=host"
    if plan.ram is not None or plan.uses_virtiofs():
        machine += ",memory-backend=mem"
    return ["-machine", machine]


def option_value(value: object) -> str:
    """Quote VALUE for QEMU's comma-separated options: a literal comma is written twice."""
    return str(value).replace(",", ",,")


def share_args(plan: BootPlan) -> list[str]:
    argv: list[str] = []
    if plan.uses_virtiofs():
        argv += ["-object", f"memory-backend-memfd,id=mem,size={plan.memory_mib}M,share=on"]
    for index, share in enumerate(plan.shares):
        argv += share_device_args(plan.arch, share, index)
    return argv


def share_device_args(arch: Arch, share: ShareDevice, index: int) -> list[str]:
    if share.kind == ShareKind.NINEP:
        fsdev = f"local,id=share{index},path={option_value(share.path)}"
        fsdev += ",security_model=none,multidevs=remap"
        if share.readonly:
            fsdev += ",readonly=on"
        return [
            "-fsdev", fsdev,
            "-device", f"{arch.device('9p')},fsdev=share{index},mount_tag={share.tag}",
        ]
    assert share.socket is not None
    return [
        "-chardev", f"socket,id=vfs{index},path={option_value(share.socket)}",
        "-device", f"vhost-user-fs-{arch.device_suffix},chardev=vfs{index},tag={share.tag}",
    ]


def warm_args(plan: BootPlan) -> list[str]:
    """RAM in a template's file, and the device state to restore (see vmrun.warm)."""
    if plan.ram is None:
        return []
    if plan.uses_virtiofs():
        raise ValueError("a RAM file and virtiofs (vhost-user-fs) cannot go together")
    share = "on" if plan.ram.shared else "off"
    argv = ["-object", f"memory-backend-file,id=mem,size={plan.memory_mib}M,"
            f"mem-path={option_value(plan.ram.path)},share={share}"]
    if plan.incoming:
        # Deferred: the x-ignore-shared capability (the state leaves the RAM out, the file
        # holds it) can only be set over QMP on QEMU 7.2, before migrate-incoming.
        argv += ["-incoming", "defer"]
    return argv


def build_argv(plan: BootPlan, qemu: str | None = None) -> list[str]:
    """The complete argv that boots PLAN."""
    arch = plan.arch
    argv = [qemu or arch.qemu_binary]
    argv += ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    if plan.sandbox:
        argv += ["-sandbox", SANDBOX]
    argv += machine_args(plan)
    if arch.transport == Transport.MMIO:
        # QEMU's virtio-mmio defaults to the legacy interface, which vhost-user
        # back ends (virtiofsd) refuse.
        argv += ["-global", "virtio-mmio.force-legacy=false"]
    argv += accel_args(plan)
    argv += ["-smp", str(plan.cpus), "-m", f"{plan.memory_mib}M"]
    argv += warm_args(plan)
    argv += ["-kernel", str(plan.kernel), "-initrd", str(plan.initrd), "-append", plan.cmdline]
    # Every chardev is a socket vmrun created and handed over as an fd: no path races.
    argv += ["-chardev", f"socket,id=qmp,fd={plan.fds['qmp']}", "-mon", "chardev=qmp,mode=control"]
    argv += ["-chardev", f"socket,id=serial,fd={plan.fds['serial']}", "-serial", "chardev:serial"]
    # Port number 0 is kept for a console, so the count is one more than the ports.
    ports = len(PORTS) + (1 if "tty" in plan.fds else 0) + 1
    argv += ["-device", f"{arch.device('serial')},max_ports={ports}"]
    for port in PORTS:
        argv += [
            "-chardev", f"socket,id={port},fd={plan.fds[port]}",
            "-device", f"virtserialport,chardev={port},name=vmrun.{port}",
        ]
    if "tty" in plan.fds:
        argv += ["-chardev", f"socket,id=tty,fd={plan.fds['tty']}"]
        argv += ["-device", "virtconsole,chardev=tty,name=vmrun.tty"]
    if plan.net:
        netdev = "user,id=net0" + "".join(
            f",hostfwd=tcp:{rule.address}:{rule.host_port}-:{rule.guest_port}"
            for rule in plan.forwards)
        argv += ["-netdev", netdev, "-device", f"{arch.device('net')},netdev=net0"]
    argv += share_args(plan)
    if plan.disk is not None:
        # The format is always named (never probed), and a failed write is reported to
        # the guest instead of pausing the VM, so a full host disk ends the run.
        argv += [
            "-drive", f"file={option_value(plan.disk)},format=qcow2,if=none,id=disk0,"
            "werror=report,rerror=report,discard=unmap",
            "-device", f"virtio-blk-{arch.device_suffix},drive=disk0,serial=vmrun-disk",
        ]
    elif plan.root_image is not None:
        # Shared by every run of the image: QEMU never writes it (the guest's overlay
        # takes the writes), so many VMs can stand on one file at once.
        argv += [
            "-drive", f"file={option_value(plan.root_image)},format=raw,if=none,id=disk0,"
            "readonly=on",
            "-device", f"virtio-blk-{arch.device_suffix},drive=disk0,serial=vmrun-root",
        ]
    return argv


# ---- full boot: the image's own firmware, bootloader, kernel and init ----------------------

READY_PORT = "org.vmrun.ready"
SERIAL_SSH_PORT = "org.vmrun.ssh"
# Guest ports QEMU forwards: the image's own SSH server, and the one vmrun starts early.
SSH_PORT = 22
EARLY_SSH_PORT = 10022


@dataclass(frozen=True)
class FullBootPlan:
    arch: Arch
    accel: Accel  # resolved: never AUTO
    cpus: int
    memory_mib: int
    disk: Path  # the run's qcow2 overlay on the image
    seed: Path  # the NoCloud seed ISO, attached read-only
    fds: dict[str, int]  # chardev id -> fd: "qmp", "serial", "ready"
    uefi_code: Path | None = None  # UEFI: read-only code flash; None: the machine's BIOS
    uefi_vars: Path | None = None  # UEFI: this run's own copy of the variable store
    net_outbound: bool = True  # False: the guest reaches nothing, SSH still comes in
    sandbox: bool = True


def full_boot_argv(plan: FullBootPlan, qemu: str | None = None) -> list[str]:
    """The argv that boots a disk image the way a cloud would, with its seed attached."""
    arch = plan.arch
    suffix = {Transport.PCI: "pci", Transport.CCW: "ccw", Transport.MMIO: "device"}[
        arch.full_transport]
    argv = [qemu or arch.qemu_binary]
    argv += ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    if plan.sandbox:
        argv += ["-sandbox", SANDBOX]
    machine = arch.full_machine or arch.machine
    if arch.name == "aarch64" and plan.accel == Accel.KVM:
        machine += ",gic-version=host"
    argv += ["-machine", machine]
    argv += accel_args(plan)
    argv += ["-smp", str(plan.cpus), "-m", f"{plan.memory_mib}M"]
    if plan.uefi_code is not None:
        assert plan.uefi_vars is not None
        argv += [
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={option_value(plan.uefi_code)}",
            "-drive", f"if=pflash,format=raw,unit=1,file={option_value(plan.uefi_vars)}",
        ]
    if arch.name in ("x86_64", "i386", "aarch64"):
        # cloud-init reads "ds=nocloud" from the SMBIOS serial and looks no further.
        argv += ["-smbios", "type=1,serial=ds=nocloud"]
    argv += ["-chardev", f"socket,id=qmp,fd={plan.fds['qmp']}", "-mon", "chardev=qmp,mode=control"]
    argv += ["-chardev", f"socket,id=serial,fd={plan.fds['serial']}"]
    if arch.name == "s390x":
        argv += ["-device", "sclpconsole,chardev=serial"]
    else:
        argv += ["-serial", "chardev:serial"]
    # The guest says on this port when its SSH server runs: no polling for readiness.
    argv += ["-device", f"virtio-serial-{suffix},max_ports=4"]
    argv += ["-chardev", f"socket,id=ready,fd={plan.fds['ready']}",
             "-device", f"virtserialport,chardev=ready,name={READY_PORT}"]
    # An image baked by vmrun serves SSH on this port, before cloud-init (see runhook).
    argv += ["-chardev", f"socket,id=sshport,fd={plan.fds['ssh']}",
             "-device", f"virtserialport,chardev=sshport,name={SERIAL_SSH_PORT}"]
    # Port 0: the host's kernel picks a free port when QEMU binds it, so no other process
    # can take it between choosing and binding; vmrun reads it back over QMP.
    netdev = "user,id=net0" + "".join(f",hostfwd=tcp:127.0.0.1:0-:{port}"
                                      for port in (SSH_PORT, EARLY_SSH_PORT))
    if not plan.net_outbound:
        netdev += ",restrict=on"
    argv += ["-netdev", netdev, "-device", f"virtio-net-{suffix},netdev=net0"]
    argv += [
        "-drive", f"file={option_value(plan.disk)},format=qcow2,if=none,id=disk0,"
        "werror=report,rerror=report,discard=unmap",
        "-device", f"virtio-blk-{suffix},drive=disk0,bootindex=0",
        "-drive", f"file={option_value(plan.seed)},format=raw,if=none,id=seed,readonly=on",
        "-device", f"virtio-blk-{suffix},drive=seed",
        "-device", f"virtio-rng-{suffix}",
    ]
    return argv
