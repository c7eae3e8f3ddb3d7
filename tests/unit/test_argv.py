from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vmrun.errors import UsageError
from vmrun.qemu.arch import ARCHES, Arch, lookup_arch
from vmrun.qemu.argv import (
    PORTS,
    SHARE_TAG,
    BootPlan,
    ShareDevice,
    ShareKind,
    build_argv,
    kernel_cmdline,
)
from vmrun.spec import Accel

X86 = ARCHES["x86_64"]
ARM = ARCHES["aarch64"]

FDS = {
    "qmp": 10, "serial": 11,
    "control": 12, "status": 13, "stdout": 14, "stderr": 15, "stdin": 16,
}
KERNEL = Path("/cache/vmlinuz")
INITRD = Path("/cache/initrd.cpio")
SANDBOX = ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny"]


def plan(arch: Arch, accel: Accel, **changes: object) -> BootPlan:
    base = BootPlan(
        arch=arch, accel=accel, cpus=2, memory_mib=1024, kernel=KERNEL, initrd=INITRD,
        cmdline="console=X quiet", fds=dict(FDS),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def channel_args(ports: int = 6) -> list[str]:
    """The part of every argv that wires the fds: identical for every arch and accel."""
    return [
        "-chardev", "socket,id=qmp,fd=10", "-mon", "chardev=qmp,mode=control",
        "-chardev", "socket,id=serial,fd=11", "-serial", "chardev:serial",
        "-device", f"virtio-serial-device,max_ports={ports}",
        "-chardev", "socket,id=control,fd=12",
        "-device", "virtserialport,chardev=control,name=vmrun.control",
        "-chardev", "socket,id=status,fd=13",
        "-device", "virtserialport,chardev=status,name=vmrun.status",
        "-chardev", "socket,id=stdout,fd=14",
        "-device", "virtserialport,chardev=stdout,name=vmrun.stdout",
        "-chardev", "socket,id=stderr,fd=15",
        "-device", "virtserialport,chardev=stderr,name=vmrun.stderr",
        "-chardev", "socket,id=stdin,fd=16",
        "-device", "virtserialport,chardev=stdin,name=vmrun.stdin",
    ]


TAIL = [
    "-netdev", "user,id=net0", "-device", "virtio-net-device,netdev=net0",
]


def head(binary: str, machine: str, accel: list[str]) -> list[str]:
    return [
        binary, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        *SANDBOX,
        "-machine", machine,
        "-global", "virtio-mmio.force-legacy=false",
        *accel,
        "-smp", "2", "-m", "1024M",
        "-kernel", "/cache/vmlinuz", "-initrd", "/cache/initrd.cpio",
        "-append", "console=X quiet",
    ]


SNAPSHOTS: dict[tuple[str, Accel], list[str]] = {
    ("x86_64", Accel.KVM): [
        *head("qemu-system-x86_64", "microvm,isa-serial=on,rtc=on",
              ["-accel", "kvm", "-cpu", "host"]),
        *channel_args(), *TAIL,
    ],
    ("x86_64", Accel.TCG): [
        *head("qemu-system-x86_64", "microvm,isa-serial=on,rtc=on",
              ["-accel", "tcg", "-cpu", "max"]),
        *channel_args(), *TAIL,
    ],
    ("aarch64", Accel.KVM): [
        *head("qemu-system-aarch64", "virt,gic-version=host", ["-accel", "kvm", "-cpu", "host"]),
        *channel_args(), *TAIL,
    ],
    ("aarch64", Accel.HVF): [
        *head("qemu-system-aarch64", "virt", ["-accel", "hvf", "-cpu", "host"]),
        *channel_args(), *TAIL,
    ],
    ("aarch64", Accel.TCG): [
        *head("qemu-system-aarch64", "virt", ["-accel", "tcg", "-cpu", "cortex-a57"]),
        *channel_args(), *TAIL,
    ],
}


@pytest.mark.parametrize(("arch_name", "accel"), list(SNAPSHOTS))
def test_argv_snapshot(arch_name: str, accel: Accel) -> None:
    assert build_argv(plan(ARCHES[arch_name], accel)) == SNAPSHOTS[(arch_name, accel)]


def test_argv_snapshot_x86_64_kvm_9p_ro_tty_no_net_no_sandbox() -> None:
    argv = build_argv(
        plan(
            X86, Accel.KVM, fds={**FDS, "tty": 17}, net=False, sandbox=False,
            share=ShareDevice(ShareKind.NINEP, Path("/home/me/project"), readonly=True),
        ),
        qemu="/opt/qemu/bin/qemu-system-x86_64",
    )
    assert argv == [
        "/opt/qemu/bin/qemu-system-x86_64",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", "microvm,isa-serial=on,rtc=on",
        "-global", "virtio-mmio.force-legacy=false",
        "-accel", "kvm", "-cpu", "host",
        "-smp", "2", "-m", "1024M",
        "-kernel", "/cache/vmlinuz", "-initrd", "/cache/initrd.cpio",
        "-append", "console=X quiet",
        *channel_args(7),
        "-chardev", "socket,id=tty,fd=17",
        "-device", "virtconsole,chardev=tty,name=vmrun.tty",
        "-fsdev",
        "local,id=share0,path=/home/me/project,security_model=none,multidevs=remap,readonly=on",
        "-device", "virtio-9p-device,fsdev=share0,mount_tag=vmrun0",
    ]


def test_argv_snapshot_aarch64_tcg_virtiofs() -> None:
    argv = build_argv(
        plan(
            ARM, Accel.TCG, memory_mib=2048,
            share=ShareDevice(ShareKind.VIRTIOFS, Path("/src"), readonly=False,
                              socket=Path("/run/vmrun-1/virtiofs.sock")),
        )
    )
    assert argv == [
        "qemu-system-aarch64",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", *SANDBOX,
        "-machine", "virt,memory-backend=mem",
        "-global", "virtio-mmio.force-legacy=false",
        "-accel", "tcg", "-cpu", "cortex-a57",
        "-smp", "2", "-m", "2048M",
        "-kernel", "/cache/vmlinuz", "-initrd", "/cache/initrd.cpio",
        "-append", "console=X quiet",
        *channel_args(), *TAIL,
        "-object", "memory-backend-memfd,id=mem,size=2048M,share=on",
        "-chardev", "socket,id=vfs0,path=/run/vmrun-1/virtiofs.sock",
        "-device", "vhost-user-fs-device,chardev=vfs0,tag=vmrun0",
    ]


# --- targeted properties, over every combination ------------------------------------

ALL_PLANS = [
    plan(arch, accel, fds=fds, net=net, share=share)
    for arch in (X86, ARM)
    for accel in (Accel.KVM, Accel.HVF, Accel.TCG)
    for fds in (dict(FDS), {**FDS, "tty": 17})
    for net in (True, False)
    for share in (
        None,
        ShareDevice(ShareKind.NINEP, Path("/p"), readonly=False),
        ShareDevice(ShareKind.NINEP, Path("/p"), readonly=True),
        ShareDevice(ShareKind.VIRTIOFS, Path("/p"), readonly=False, socket=Path("/s.sock")),
    )
]


def values_of(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == option]


@pytest.mark.parametrize("boot", ALL_PLANS)
def test_fd_chardevs_are_sockets_passed_as_fds(boot: BootPlan) -> None:
    argv = build_argv(boot)
    chardevs = values_of(argv, "-chardev")
    by_id = {}
    for chardev in chardevs:
        assert chardev.startswith("socket,id=")
        fields = dict(part.split("=", 1) for part in chardev.split(",")[1:])
        by_id[fields["id"]] = fields
    for name, fd in boot.fds.items():
        assert by_id[name] == {"id": name, "fd": str(fd)}
    # The only chardev not handed over as an fd is virtiofsd's socket, which it creates.
    others = set(by_id) - set(boot.fds)
    assert others == ({"vfs0"} if boot.share and boot.share.kind == ShareKind.VIRTIOFS
                      else set())


@pytest.mark.parametrize("boot", ALL_PLANS)
def test_hardening_flags_always_present(boot: BootPlan) -> None:
    argv = build_argv(boot)
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert argv.count(flag) == 1
    assert values_of(argv, "-sandbox") == [SANDBOX[1]]
    assert values_of(argv, "-display") == ["none"]
    assert "-drive" not in argv
    assert not any("file=" in word and "format=" not in word for word in argv)


def test_sandbox_can_be_left_out() -> None:
    assert "-sandbox" not in build_argv(plan(X86, Accel.TCG, sandbox=False))


@pytest.mark.parametrize(
    ("accel", "expected"),
    [
        (Accel.KVM, ["-accel", "kvm", "-cpu", "host"]),
        (Accel.HVF, ["-accel", "hvf", "-cpu", "host"]),
        (Accel.TCG, ["-accel", "tcg", "-cpu", "TCG-CPU"]),
    ],
)
@pytest.mark.parametrize("arch", [X86, ARM], ids=lambda a: a.name)
def test_accel_and_cpu(arch: Arch, accel: Accel, expected: list[str]) -> None:
    expected = [arch.cpu_tcg if word == "TCG-CPU" else word for word in expected]
    argv = build_argv(plan(arch, accel))
    start = argv.index("-accel")
    assert argv[start : start + 4] == expected
    assert argv.count("-accel") == 1 and argv.count("-cpu") == 1


@pytest.mark.parametrize("readonly", [True, False])
@pytest.mark.parametrize("arch", [X86, ARM], ids=lambda a: a.name)
def test_9p_share(arch: Arch, readonly: bool) -> None:
    share = ShareDevice(ShareKind.NINEP, Path("/work/dir"), readonly=readonly)
    argv = build_argv(plan(arch, Accel.TCG, share=share))
    [fsdev] = values_of(argv, "-fsdev")
    fields = fsdev.split(",")
    assert fields[0] == "local"
    assert "path=/work/dir" in fields
    assert "security_model=none" in fields
    assert ("readonly=on" in fields) is readonly
    assert f"mount_tag={SHARE_TAG}" in values_of(argv, "-device")[-1].split(",")
    assert "virtio-9p-device,fsdev=share0,mount_tag=vmrun0" in values_of(argv, "-device")
    assert not any("memory-backend" in word for word in argv)


def test_9p_share_path_with_comma_is_escaped() -> None:
    share = ShareDevice(ShareKind.NINEP, Path("/home/me/a,readonly=off"), readonly=True)
    [fsdev] = values_of(build_argv(plan(X86, Accel.TCG, share=share)), "-fsdev")
    assert "path=/home/me/a,,readonly=off," in fsdev


@pytest.mark.parametrize("arch", [X86, ARM], ids=lambda a: a.name)
def test_virtiofs_share(arch: Arch) -> None:
    share = ShareDevice(ShareKind.VIRTIOFS, Path("/work/dir"), readonly=False,
                        socket=Path("/run/v.sock"))
    argv = build_argv(plan(arch, Accel.KVM, memory_mib=768, share=share))
    assert "memory-backend-memfd,id=mem,size=768M,share=on" in values_of(argv, "-object")
    [machine] = values_of(argv, "-machine")
    assert machine.endswith(",memory-backend=mem")
    assert values_of(argv, "-m") == ["768M"]
    assert "vhost-user-fs-device,chardev=vfs0,tag=vmrun0" in values_of(argv, "-device")
    assert "socket,id=vfs0,path=/run/v.sock" in values_of(argv, "-chardev")
    assert "-fsdev" not in argv


@pytest.mark.parametrize("boot", ALL_PLANS)
def test_net_only_when_asked(boot: BootPlan) -> None:
    argv = build_argv(boot)
    assert ("-netdev" in argv) is boot.net
    assert (values_of(argv, "-netdev") == ["user,id=net0"]) is boot.net
    assert any(d.startswith("virtio-net") for d in values_of(argv, "-device")) is boot.net


@pytest.mark.parametrize("boot", ALL_PLANS)
def test_tty_console_only_with_tty_fd(boot: BootPlan) -> None:
    devices = values_of(build_argv(boot), "-device")
    has_tty = "tty" in boot.fds
    assert ("virtconsole,chardev=tty,name=vmrun.tty" in devices) is has_tty
    assert sum(d.startswith("virtserialport,") for d in devices) == len(PORTS)


@pytest.mark.parametrize("boot", ALL_PLANS)
def test_share_presence(boot: BootPlan) -> None:
    argv = build_argv(boot)
    kind = boot.share.kind if boot.share else None
    assert ("-fsdev" in argv) is (kind == ShareKind.NINEP)
    assert any(w.startswith("vhost-user-fs") for w in argv) is (kind == ShareKind.VIRTIOFS)
    assert any("memory-backend" in w for w in argv) is (kind == ShareKind.VIRTIOFS)


# --- kernel command line ------------------------------------------------------------


@pytest.mark.parametrize(("arch", "console"), [(X86, "ttyS0"), (ARM, "ttyAMA0")])
def test_kernel_cmdline_console(arch: Arch, console: str) -> None:
    for show in (True, False):
        words = kernel_cmdline(arch, console=show).split()
        assert f"console={console}" in words
        assert ("quiet" in words) is not show
        assert "vmrun.probe" not in words
        assert "rdinit=/init" in words
        assert "panic=-1" in words


def test_kernel_cmdline_probe() -> None:
    words = kernel_cmdline(X86, console=False, probe=True).split()
    assert words.count("vmrun.probe") == 1
    assert "quiet" in words


def test_kernel_cmdline_snapshot() -> None:
    assert kernel_cmdline(X86, console=False) == (
        "console=ttyS0 panic=-1 rdinit=/init quiet loglevel=1 "
        "tsc=reliable no_timer_check random.trust_cpu=on"
    )
    assert kernel_cmdline(ARM, console=True, probe=True) == (
        "console=ttyAMA0 panic=-1 rdinit=/init loglevel=4 vmrun.probe"
    )


# --- architecture table -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("x86_64", "x86_64"), ("amd64", "x86_64"), ("x86-64", "x86_64"), ("AMD64", "x86_64"),
        ("aarch64", "aarch64"), ("arm64", "aarch64"), ("ARM64", "aarch64"),
    ],
)
def test_lookup_arch_aliases(name: str, expected: str) -> None:
    assert lookup_arch(name) is ARCHES[expected]


@pytest.mark.parametrize("name", ["sparc64", "", "mips", "x86_65"])
def test_lookup_unknown_arch(name: str) -> None:
    with pytest.raises(UsageError) as info:
        lookup_arch(name)
    assert info.value.hint is not None
    assert "aarch64" in info.value.hint and "x86_64" in info.value.hint


def test_device_names_follow_transport() -> None:
    assert X86.device("net") == "virtio-net-device"
    assert ARM.device("9p") == "virtio-9p-device"


@pytest.mark.parametrize(
    ("name", "machine", "console", "device"),
    [
        ("armv7", "virt,highmem=off", "ttyAMA0", "virtio-serial-device"),
        ("i386", "microvm,isa-serial=on,rtc=on", "ttyS0", "virtio-serial-device"),
        ("s390x", "s390-ccw-virtio", "ttysclp0", "virtio-serial-ccw"),
        ("ppc64le", "pseries,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,"
         "cap-ccf-assist=off", "hvc0", "virtio-serial-pci"),
        ("riscv64", "virt", "ttyS0", "virtio-serial-device"),
    ],
)
def test_foreign_arches_use_their_machine_console_and_transport(
    name: str, machine: str, console: str, device: str
) -> None:
    arch = ARCHES[name]
    argv = build_argv(plan(arch, Accel.TCG))
    assert argv[0] == arch.qemu_binary
    assert argv[argv.index("-machine") + 1] == machine
    assert f"console={console}" in kernel_cmdline(arch, console=False)
    assert f"{device},max_ports=6" in argv
    assert ("-global" in argv) == (arch.transport == "mmio")


def test_debian_names_are_accepted() -> None:
    for debian, name in [("amd64", "x86_64"), ("arm64", "aarch64"), ("armhf", "armv7"),
                         ("ppc64el", "ppc64le"), ("i386", "i386"), ("s390x", "s390x")]:
        assert lookup_arch(debian).name == name
        assert ARCHES[name].debian_arch == debian


def test_share_kind_per_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmrun import share as runlib
    from vmrun.errors import UsageError as Usage
    from vmrun.spec import Share

    monkeypatch.setattr(runlib, "find_virtiofsd", lambda: "/usr/bin/virtiofsd")
    assert runlib.choose_share_kind(Share.RW, "auto", ARCHES["aarch64"]) == "virtiofs"
    assert runlib.choose_share_kind(Share.RO, "auto", ARCHES["aarch64"]) == "9p"
    for name in ("s390x", "ppc64le"):
        assert runlib.choose_share_kind(Share.RW, "auto", ARCHES[name]) == "9p"
        with pytest.raises(Usage):
            runlib.choose_share_kind(Share.RW, "virtiofs", ARCHES[name])
    monkeypatch.setattr(runlib, "find_virtiofsd", lambda: None)
    assert runlib.choose_share_kind(Share.RW, "auto", ARCHES["x86_64"]) == "9p"


def test_disk_overlay_names_its_format_and_reports_errors() -> None:
    argv = build_argv(plan(X86, Accel.TCG, disk=Path("/run/x,y/disk.qcow2")))
    drive = argv[argv.index("-drive") + 1]
    assert drive.startswith("file=/run/x,,y/disk.qcow2,format=qcow2,")
    assert "werror=report" in drive and "rerror=report" in drive
    assert "virtio-blk-device,drive=disk0,serial=vmrun-disk" in argv
    assert "-drive" not in build_argv(plan(X86, Accel.TCG))
    s390 = build_argv(plan(ARCHES["s390x"], Accel.TCG, disk=Path("/d.qcow2")))
    assert "virtio-blk-ccw,drive=disk0,serial=vmrun-disk" in s390
