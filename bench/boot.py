"""Cold `vmrun -- true` against plain QEMU booting the same kernel to an init that powers off.

    python bench/boot.py [--runs N] [--arch ARCH[,ARCH...]]

The two are alternated (A B A B ...) so that drift on the host hits both alike. The
baseline uses vmrun's own machine, accelerator, CPU, memory and kernel command line; what
is left between the two is vmrun's overhead: Python start-up, the agent, the virtio
devices and modules, the channel and the shutdown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))  # benchmark this checkout, installed or not

from vmrun.guest.build import ensure_guest  # noqa: E402
from vmrun.guest.cpio import CpioWriter, read_newc  # noqa: E402
from vmrun.qemu import accel as accellib  # noqa: E402
from vmrun.qemu import process  # noqa: E402
from vmrun.qemu.arch import Transport, host_arch, lookup_arch  # noqa: E402
from vmrun.qemu.argv import BootPlan, accel_args, kernel_cmdline, machine_args  # noqa: E402
from vmrun.spec import Accel, MachineSpec  # noqa: E402

TARGET = 1.15
POWEROFF_INIT = b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n"


def cpio_member(archive: bytes, wanted: str) -> bytes:
    """One file out of a newc cpio archive (vmrun's initramfs is uncompressed newc)."""
    member = read_newc(archive).get(wanted)
    if member is None:
        raise SystemExit(f"boot.py: no {wanted} in the guest's initramfs")
    return member


def baseline_argv(workdir: Path, arch_name: str) -> tuple[list[str], accellib.AccelChoice]:
    """QEMU's argv for the baseline boot, and the accelerator vmrun would choose."""
    arch = lookup_arch(arch_name)
    guest = ensure_guest(arch, notice=lambda m: print(f"vmrun: {m}", file=sys.stderr))
    qemu = process.find_qemu(arch)
    initrd = workdir / f"poweroff-{arch.name}.cpio"
    with open(initrd, "wb") as out:
        cpio = CpioWriter(out)
        cpio.directory("bin")
        cpio.directory("dev")
        cpio.char_device("dev/console", 5, 1)
        # The very busybox vmrun boots: taken from its initramfs.
        cpio.file("bin/busybox", cpio_member(guest.initrd.read_bytes(), "bin/busybox"), 0o755)
        cpio.file("init", POWEROFF_INIT, mode=0o755)
        cpio.finish()

    choice = accellib.choose_for_guest(Accel.AUTO, arch, guest.kernel, guest.initrd)
    spec = MachineSpec()
    plan = BootPlan(
        arch=arch, accel=choice.accel, cpus=spec.cpus, memory_mib=spec.memory_mib,
        kernel=guest.kernel, initrd=initrd,
        cmdline=kernel_cmdline(arch, console=False,
                               tsc_khz=accellib.tcg_tsc_khz(arch, choice.accel)),
        fds={}, net=False,
    )
    argv = [qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
    argv += machine_args(plan)
    if arch.transport == Transport.MMIO:
        argv += ["-global", "virtio-mmio.force-legacy=false"]
    argv += accel_args(plan)
    argv += ["-smp", str(plan.cpus), "-m", f"{plan.memory_mib}M"]
    argv += ["-kernel", str(plan.kernel), "-initrd", str(initrd), "-append", plan.cmdline]
    argv += ["-serial", f"file:{workdir / f'serial-{arch.name}.log'}"]
    return argv, choice


def timed(argv: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    done = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=120, check=False)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip()[-2000:]
        raise SystemExit(f"boot.py: {argv[0]} exited with {done.returncode}\n{tail}")
    return elapsed


def measure(arch: str, runs: int, workdir: Path) -> tuple[list[float], list[float], str]:
    """Alternate vmrun and the baseline RUNS times; their times and the accel line."""
    qemu_argv, choice = baseline_argv(workdir, arch)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    vmrun_argv = [sys.executable, "-m", "vmrun", "--arch", arch, "--", "true"]
    cases: list[Callable[[], float]] = [
        lambda: timed(vmrun_argv, cwd=workdir / "cwd", env=env),
        lambda: timed(qemu_argv, cwd=workdir / "cwd"),
    ]
    times: list[list[float]] = [[], []]
    for _ in range(runs):
        for index, case in enumerate(cases):
            times[index].append(case())
    return times[0], times[1], f"accel {choice.accel}: {choice.reason}"


def main() -> None:
    parser = argparse.ArgumentParser(description="cold vmrun -- true against plain QEMU")
    parser.add_argument("--runs", type=int, default=5, help="runs of each (default 5)")
    parser.add_argument("--arch", default=host_arch(),
                        help="guest architectures, comma-separated (default: the host's)")
    args = parser.parse_args()
    arches = [lookup_arch(a).name for a in args.arch.split(",") if a]
    print(f"boot: {host_arch()} host, {args.runs} runs each, alternated; medians (min)")
    print(f"{'arch':<9}{'vmrun -- true':>18}{'qemu + poweroff init':>24}{'ratio':>16}")
    for arch in arches:
        with tempfile.TemporaryDirectory(prefix="vmrun-bench-") as tmp:
            workdir = Path(tmp)
            (workdir / "cwd").mkdir()
            vm, base, accel = measure(arch, args.runs, workdir)
        ratio = statistics.median(vm) / statistics.median(base)
        print(f"{arch:<9}{statistics.median(vm):>9.2f}s ({min(vm):.2f}s)"
              f"{statistics.median(base):>15.2f}s ({min(base):.2f}s)"
              f"{ratio:>9.2f}x ({min(vm) / min(base):.2f}x)   {accel[:60]}", flush=True)
    print(f"target for the host's architecture: <= {TARGET:.2f}x")


if __name__ == "__main__":
    main()
