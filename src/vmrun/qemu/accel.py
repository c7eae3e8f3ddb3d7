"""Choosing the accelerator: KVM or HVF where they really work, TCG otherwise."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmrun import cache as cachelib
from vmrun.errors import UsageError
from vmrun.qemu import process
from vmrun.qemu.arch import Arch, host_arch, host_tsc_khz
from vmrun.qemu.argv import kernel_cmdline
from vmrun.spec import Accel

PROBE_DEADLINE = 1.5  # seconds a working KVM needs, with room, to boot the guest to init
DETAIL_WIDTH = 160  # of QEMU's last stderr line in a failed probe's answer
MEMO_FORMAT = "2"  # 2: the memo names its boot, QEMU and machine (for vmrun doctor)


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel
    reason: str
    fell_back: bool = False  # auto wanted hardware acceleration but could not have it


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm(qemu: str, kernel: Path, initrd: Path, cmdline: str, machine: str) -> str | None:
    """Boot the guest under KVM with a deadline; None if it reached init, else why not.

    /dev/kvm can exist and open yet be unable to run a stock kernel (nested setups that
    hang or abort on MSR writes), so only a real boot to the agent proves it works.
    """
    with tempfile.TemporaryDirectory(prefix="vmrun-kvm-probe-") as tmp:
        serial = Path(tmp) / "serial"
        argv = [
            qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", machine, "-accel", "kvm", "-cpu", "host", "-m", "256M",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
            "-serial", f"file:{serial}",
        ]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=PROBE_DEADLINE, check=False)
        except subprocess.TimeoutExpired:
            return f"a test boot under KVM did not finish within {PROBE_DEADLINE}s"
        except OSError as exc:
            return f"cannot run {qemu}: {exc.strerror}"
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            detail = lines[-1] if lines else f"exit status {done.returncode}"
            return f"a test boot under KVM failed ({clip(detail, DETAIL_WIDTH)})"
        if b"vmrun-probe-ok" not in serial.read_bytes():
            return "a test boot under KVM did not reach the guest agent"
    return None


def clip(text: str, width: int) -> str:
    """TEXT cut to at most about WIDTH characters at a space, never inside a word."""
    if len(text) <= width:
        return text
    cut = text.rfind(" ", 0, width - 3)
    return text if cut <= 0 else text[:cut].rstrip() + " ..."


def kvm_usable(qemu: str, qemu_version: str, kernel: Path, initrd: Path, cmdline: str,
               machine: str, cache: Path) -> str | None:
    """Like probe_kvm, but remembered for this host boot, QEMU and kernel."""
    key = cachelib.key_of(MEMO_FORMAT, _boot_id(), qemu, qemu_version, str(kernel),
                          str(initrd), machine)
    memo = cache / "accel" / f"kvm-{key}.json"
    # Many runs starting at once probe once; the others wait for its answer.
    with cachelib.locked(memo.with_suffix(".lock")):
        if memo.exists():
            try:
                return json.loads(memo.read_text())["problem"]  # type: ignore[no-any-return]
            except (ValueError, KeyError):
                pass
        problem = probe_kvm(qemu, kernel, initrd, cmdline, machine)
        with cachelib.staged(memo) as tmp:
            tmp.write_text(json.dumps({"problem": problem, "boot_id": _boot_id(),
                                       "qemu": qemu, "machine": machine}))
    return problem


def remembered_kvm(qemu: str, machine: str, cache: Path) -> tuple[str | None] | None:
    """The newest KVM probe answer for QEMU and MACHINE in this host boot, probing
    nothing: (None,) if KVM worked, (problem,) if not, None if no run probed yet."""
    answers: list[tuple[float, str | None]] = []
    for memo in (cache / "accel").glob("kvm-*.json"):
        try:
            data = json.loads(memo.read_text())
            stamp = memo.stat().st_mtime
        except (OSError, ValueError):
            continue
        if (isinstance(data, dict) and data.get("boot_id") == _boot_id()
                and data.get("qemu") == qemu and data.get("machine") == machine):
            answers.append((stamp, data.get("problem")))
    return (max(answers, key=lambda answer: answer[0])[1],) if answers else None


def fallback_news(choice: AccelChoice, cache: Path | None = None) -> bool:
    """Whether CHOICE's fall-back to TCG is news: True once per host boot and reason.

    The notice is worth one line when the fall-back is found, not on every run after.
    """
    if not choice.fell_back:
        return False
    key = cachelib.key_of(_boot_id(), choice.reason)
    marker = (cache or cachelib.cache_dir()) / "accel" / f"told-{key}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    return True


def fallback_notice(choice: AccelChoice, *, verbose: bool, cache: Path | None = None
                    ) -> str | None:
    """The notice for CHOICE's fall-back to TCG: once when it is found out, afterwards
    only when VERBOSE (vmrun doctor reports it too); None when there is nothing to say."""
    if fallback_news(choice, cache) or (choice.fell_back and verbose):
        return f"{choice.reason}; using TCG (slower)"
    return None


def choose_accel(
    requested: Accel, arch: Arch, *, kvm_problem: Callable[[], str | None]
) -> AccelChoice:
    """Decide the accelerator; KVM_PROBLEM is called only when a KVM probe is needed."""
    native = arch.name == host_arch()
    system = platform.system()
    if requested == Accel.TCG:
        return AccelChoice(Accel.TCG, "TCG requested")
    if requested == Accel.HVF:
        if system != "Darwin" or not native:
            raise UsageError("--accel hvf needs macOS and a guest of the host's architecture")
        return AccelChoice(Accel.HVF, "HVF requested")
    if requested == Accel.KVM:
        if system != "Linux" or not native:
            raise UsageError("--accel kvm needs Linux and a guest of the host's architecture")
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise UsageError("--accel kvm: /dev/kvm is missing or not accessible",
                             hint="add yourself to the kvm group, or use --accel tcg")
        return AccelChoice(Accel.KVM, "KVM requested")
    if not native:
        return AccelChoice(Accel.TCG, f"{arch.name} guest on a {host_arch()} host: emulated")
    if system == "Darwin":
        return AccelChoice(Accel.HVF, "macOS: Hypervisor.framework")
    if system != "Linux":
        return AccelChoice(Accel.TCG, f"no accelerator known for {system}", fell_back=True)
    if not os.path.exists("/dev/kvm"):
        return AccelChoice(Accel.TCG, "no /dev/kvm", fell_back=True)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return AccelChoice(Accel.TCG, "/dev/kvm is not accessible to this user", fell_back=True)
    problem = kvm_problem()
    if problem is not None:
        return AccelChoice(Accel.TCG, f"/dev/kvm is present but unusable: {problem}",
                           fell_back=True)
    return AccelChoice(Accel.KVM, "/dev/kvm works")


def tcg_tsc_khz(arch: Arch, accel: Accel) -> int | None:
    """The TSC rate to tell an x86 guest under TCG (see kernel_cmdline), else None."""
    if accel == Accel.TCG and arch.name in ("x86_64", "i386"):
        return host_tsc_khz()
    return None


def choose_for_guest(requested: Accel, arch: Arch, kernel: Path, initrd: Path) -> AccelChoice:
    """choose_accel, probing KVM (when it must) with the guest that will boot."""

    def kvm_problem() -> str | None:
        qemu = process.find_qemu(arch)
        return kvm_usable(qemu, process.qemu_version(qemu), kernel, initrd,
                          kernel_cmdline(arch, console=False, probe=True), arch.machine,
                          cachelib.cache_dir())

    return choose_accel(requested, arch, kvm_problem=kvm_problem)
