"""Cold `vmrun -- true` against plain QEMU booting the same kernel to an init that powers off.

    python bench/boot.py [--runs N]

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
from vmrun.guest.cpio import CpioWriter  # noqa: E402
from vmrun.qemu import accel as accellib  # noqa: E402
from vmrun.qemu import process  # noqa: E402
from vmrun.qemu.arch import Transport, host_arch, lookup_arch  # noqa: E402
from vmrun.qemu.argv import BootPlan, accel_args, kernel_cmdline, machine_args  # noqa: E402
from vmrun.spec import Accel, MachineSpec  # noqa: E402

TARGET = 1.15
POWEROFF_INIT = b"#!/bin/busybox sh\n/bin/busybox poweroff -f\n"


def cpio_member(archive: bytes, wanted: str) -> bytes:
    """One file out of a newc cpio archive (vmrun's initramfs is uncompressed newc)."""
    offset = 0
    while archive[offset:offset + 6] == b"070701":
        fields = [int(archive[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        size, name_size = fields[6], fields[11]
        name_end = offset + 110 + name_size
        name = archive[offset + 110:name_end - 1].decode()
        data = name_end + (-name_end % 4)
        if name == wanted:
            return archive[data:data + size]
        if name == "TRAILER!!!":
            break
        offset = data + size + (-(data + size) % 4)
    raise SystemExit(f"boot.py: no {wanted} in the guest's initramfs")


def baseline_argv(workdir: Path) -> tuple[list[str], accellib.AccelChoice]:
    """QEMU's argv for the baseline boot, and the accelerator vmrun would choose."""
    arch = lookup_arch(host_arch())
    guest = ensure_guest(arch, notice=lambda m: print(f"vmrun: {m}", file=sys.stderr))
    qemu = process.find_qemu(arch)
    initrd = workdir / "poweroff.cpio"
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
    argv += ["-serial", f"file:{workdir / 'serial.log'}"]
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


def main() -> None:
    parser = argparse.ArgumentParser(description="cold vmrun -- true against plain QEMU")
    parser.add_argument("--runs", type=int, default=5, help="runs of each (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmrun-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "cwd").mkdir()
        qemu_argv, choice = baseline_argv(workdir)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
        vmrun_argv = [sys.executable, "-m", "vmrun", "--", "true"]
        cases: dict[str, Callable[[], float]] = {
            "vmrun -- true": lambda: timed(vmrun_argv, cwd=workdir / "cwd", env=env),
            "qemu, init powers off": lambda: timed(qemu_argv, cwd=workdir / "cwd"),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, case in cases.items():
                times[name].append(case())

    print(f"boot: {host_arch()} host, {args.runs} runs each, alternated")
    print(f"accel {choice.accel}: {choice.reason}")
    print(f"{'':<24}{'median':>9}{'min':>9}")
    for name, values in times.items():
        print(f"{name:<24}{statistics.median(values):>8.3f}s{min(values):>8.3f}s")
    vm, base = times.values()
    ratio_median = statistics.median(vm) / statistics.median(base)
    ratio_min = min(vm) / min(base)
    print(f"{'ratio vmrun/baseline':<24}{ratio_median:>8.2f}x{ratio_min:>8.2f}x"
          f"   (target <= {TARGET:.2f}x)")


if __name__ == "__main__":
    main()
