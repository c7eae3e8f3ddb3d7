from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmrun.errors import UsageError
from vmrun.qemu import accel as accellib
from vmrun.qemu.accel import AccelChoice, choose_accel, kvm_usable
from vmrun.qemu.arch import ARCHES, Arch
from vmrun.spec import Accel

X86 = ARCHES["x86_64"]
ARM = ARCHES["aarch64"]


@dataclass
class Host:
    """The host as choose_accel sees it; installed into vmrun.qemu.accel's names."""

    system: str = "Linux"
    arch: str = "x86_64"
    kvm_exists: bool = True
    kvm_access: bool = True


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Host:
    state = Host()
    real_exists = os.path.exists
    real_access = os.access

    def exists(path: object) -> bool:
        if path == "/dev/kvm":
            return state.kvm_exists
        return real_exists(path)  # type: ignore[arg-type]

    def access(path: object, mode: int, **kwargs: object) -> bool:
        if path == "/dev/kvm":
            return state.kvm_exists and state.kvm_access
        return real_access(path, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("vmrun.qemu.accel.platform.system", lambda: state.system)
    monkeypatch.setattr("vmrun.qemu.accel.os.path.exists", exists)
    monkeypatch.setattr("vmrun.qemu.accel.os.access", access)
    monkeypatch.setattr(accellib, "host_arch", lambda: state.arch)
    return state


@dataclass
class Probe:
    problem: str | None = None
    calls: list[None] = field(default_factory=list)

    def __call__(self) -> str | None:
        self.calls.append(None)
        return self.problem


def never_probe() -> str | None:
    raise AssertionError("the KVM probe must not run here")


def test_tcg_requested(host: Host) -> None:
    for system in ("Linux", "Darwin", "FreeBSD"):
        host.system = system
        choice = choose_accel(Accel.TCG, X86, kvm_problem=never_probe)
        assert choice == AccelChoice(Accel.TCG, "TCG requested")


def test_tcg_requested_for_foreign_arch(host: Host) -> None:
    assert choose_accel(Accel.TCG, ARM, kvm_problem=never_probe).accel == Accel.TCG


def test_hvf_auto_on_darwin(host: Host) -> None:
    host.system, host.arch = "Darwin", "aarch64"
    choice = choose_accel(Accel.AUTO, ARM, kvm_problem=never_probe)
    assert choice.accel == Accel.HVF
    assert not choice.fell_back


def test_hvf_requested_on_darwin(host: Host) -> None:
    host.system, host.arch = "Darwin", "aarch64"
    assert choose_accel(Accel.HVF, ARM, kvm_problem=never_probe) == AccelChoice(
        Accel.HVF, "HVF requested"
    )


def test_hvf_requested_on_linux_is_a_usage_error(host: Host) -> None:
    with pytest.raises(UsageError, match="hvf"):
        choose_accel(Accel.HVF, X86, kvm_problem=never_probe)


def test_hvf_requested_for_foreign_arch_is_a_usage_error(host: Host) -> None:
    host.system, host.arch = "Darwin", "aarch64"
    with pytest.raises(UsageError):
        choose_accel(Accel.HVF, X86, kvm_problem=never_probe)


def test_kvm_requested_and_available(host: Host) -> None:
    # An explicit request trusts the user: no probe.
    assert choose_accel(Accel.KVM, X86, kvm_problem=never_probe) == AccelChoice(
        Accel.KVM, "KVM requested"
    )


def test_kvm_requested_without_dev_kvm(host: Host) -> None:
    host.kvm_exists = False
    with pytest.raises(UsageError, match="/dev/kvm") as info:
        choose_accel(Accel.KVM, X86, kvm_problem=never_probe)
    assert info.value.hint is not None and "--accel tcg" in info.value.hint


def test_kvm_requested_without_access(host: Host) -> None:
    host.kvm_access = False
    with pytest.raises(UsageError, match="/dev/kvm"):
        choose_accel(Accel.KVM, X86, kvm_problem=never_probe)


@pytest.mark.parametrize(("system", "arch"), [("Darwin", "x86_64"), ("Linux", "aarch64")])
def test_kvm_requested_on_wrong_host(host: Host, system: str, arch: str) -> None:
    host.system, host.arch = system, arch
    with pytest.raises(UsageError, match="kvm"):
        choose_accel(Accel.KVM, X86, kvm_problem=never_probe)


def test_auto_without_dev_kvm_falls_back(host: Host) -> None:
    host.kvm_exists = False
    choice = choose_accel(Accel.AUTO, X86, kvm_problem=never_probe)
    assert choice == AccelChoice(Accel.TCG, "no /dev/kvm", fell_back=True)


def test_auto_without_access_falls_back(host: Host) -> None:
    host.kvm_access = False
    choice = choose_accel(Accel.AUTO, X86, kvm_problem=never_probe)
    assert choice.accel == Accel.TCG and choice.fell_back
    assert "not accessible" in choice.reason


def test_auto_with_failing_probe_falls_back_with_the_problem(host: Host) -> None:
    probe = Probe("a test boot under KVM did not finish within 1.5s")
    choice = choose_accel(Accel.AUTO, X86, kvm_problem=probe)
    assert choice.accel == Accel.TCG
    assert choice.fell_back
    assert "a test boot under KVM did not finish within 1.5s" in choice.reason
    assert len(probe.calls) == 1


def test_auto_with_working_probe_uses_kvm(host: Host) -> None:
    probe = Probe(None)
    choice = choose_accel(Accel.AUTO, X86, kvm_problem=probe)
    assert choice == AccelChoice(Accel.KVM, "/dev/kvm works")
    assert len(probe.calls) == 1


def test_auto_aarch64_on_aarch64_linux_probes(host: Host) -> None:
    host.arch = "aarch64"
    probe = Probe(None)
    assert choose_accel(Accel.AUTO, ARM, kvm_problem=probe).accel == Accel.KVM
    assert len(probe.calls) == 1


@pytest.mark.parametrize(
    ("system", "host_arch", "guest"),
    [("Linux", "x86_64", ARM), ("Linux", "aarch64", X86), ("Darwin", "aarch64", X86)],
)
def test_auto_foreign_arch_is_tcg_without_fall_back(
    host: Host, system: str, host_arch: str, guest: Arch
) -> None:
    host.system, host.arch = system, host_arch
    choice = choose_accel(Accel.AUTO, guest, kvm_problem=never_probe)
    assert choice.accel == Accel.TCG
    assert not choice.fell_back
    assert "emulated" in choice.reason


def test_auto_on_unknown_os_falls_back(host: Host) -> None:
    host.system = "FreeBSD"
    choice = choose_accel(Accel.AUTO, X86, kvm_problem=never_probe)
    assert choice.accel == Accel.TCG and choice.fell_back
    assert "FreeBSD" in choice.reason


# --- kvm_usable memo -----------------------------------------------------------------


Args = dict[str, object]


@pytest.fixture
def counted_probe(monkeypatch: pytest.MonkeyPatch) -> Callable[[str | None], list[Args]]:
    def install(problem: str | None) -> list[Args]:
        calls: list[Args] = []

        def fake(qemu: str, kernel: Path, initrd: Path, cmdline: str, machine: str) -> str | None:
            calls.append({"qemu": qemu, "kernel": kernel, "initrd": initrd,
                          "cmdline": cmdline, "machine": machine})
            return problem

        monkeypatch.setattr(accellib, "probe_kvm", fake)
        return calls

    monkeypatch.setattr(accellib, "_boot_id", lambda: "boot-1")
    return install


def usable(cache: Path, **changes: str) -> str | None:
    args = {"qemu": "/usr/bin/qemu-system-x86_64", "qemu_version": "8.2.2",
            "kernel": "/c/vmlinuz", "initrd": "/c/initrd", "machine": "microvm", **changes}
    return kvm_usable(args["qemu"], args["qemu_version"], Path(args["kernel"]),
                      Path(args["initrd"]), "console=ttyS0 vmrun.probe", args["machine"], cache)


@pytest.mark.parametrize("problem", [None, "a test boot under KVM failed (oops)"])
def test_kvm_usable_memoises(
    tmp_path: Path, counted_probe: Callable[[str | None], list[Args]], problem: str | None
) -> None:
    calls = counted_probe(problem)
    assert usable(tmp_path) == problem
    assert len(calls) == 1
    assert calls[0]["cmdline"] == "console=ttyS0 vmrun.probe"
    assert usable(tmp_path) == problem
    assert len(calls) == 1
    memos = list((tmp_path / "accel").glob("*.json"))
    assert len(memos) == 1 and memos[0].name.startswith("kvm-")


@pytest.mark.parametrize(
    "change",
    [{"qemu": "/opt/qemu"}, {"qemu_version": "9.0.0"}, {"kernel": "/c/other"},
     {"initrd": "/c/other"}, {"machine": "q35"}],
)
def test_kvm_usable_probes_again_for_other_inputs(
    tmp_path: Path, counted_probe: Callable[[str | None], list[Args]], change: dict[str, str]
) -> None:
    calls = counted_probe(None)
    usable(tmp_path)
    usable(tmp_path, **change)
    assert len(calls) == 2
    usable(tmp_path, **change)
    assert len(calls) == 2


def test_kvm_usable_probes_again_after_reboot(
    tmp_path: Path, counted_probe: Callable[[str | None], list[Args]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = counted_probe(None)
    usable(tmp_path)
    monkeypatch.setattr(accellib, "_boot_id", lambda: "boot-2")
    usable(tmp_path)
    assert len(calls) == 2


def test_kvm_usable_ignores_a_corrupt_memo(
    tmp_path: Path, counted_probe: Callable[[str | None], list[Args]]
) -> None:
    calls = counted_probe("broken")
    usable(tmp_path)
    [memo] = (tmp_path / "accel").glob("*.json")
    memo.write_text("{not json")
    assert usable(tmp_path) == "broken"
    assert len(calls) == 2
    assert usable(tmp_path) == "broken"
    assert len(calls) == 2
    assert not list((tmp_path / "accel").glob(".*.part"))


def test_kvm_usable_probes_once_for_many_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Processes starting together wait for one probe instead of each booting their own.
    monkeypatch.setattr(accellib, "_boot_id", lambda: "boot-1")
    log = tmp_path / "probes"

    def slow_probe(qemu: str, kernel: Path, initrd: Path, cmdline: str, machine: str) -> None:
        with open(log, "a") as f:
            f.write("probe\n")
        time.sleep(0.5)

    monkeypatch.setattr(accellib, "probe_kvm", slow_probe)
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            try:
                usable(tmp_path)
            finally:
                os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    assert log.read_text() == "probe\n"


def test_the_fall_back_is_news_once_per_boot_and_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accellib, "_boot_id", lambda: "boot-1")
    fell = AccelChoice(Accel.TCG, "/dev/kvm is present but unusable: x", fell_back=True)
    assert accellib.fallback_news(fell, tmp_path)
    assert not accellib.fallback_news(fell, tmp_path)
    other = AccelChoice(Accel.TCG, "no /dev/kvm", fell_back=True)
    assert accellib.fallback_news(other, tmp_path)
    assert not accellib.fallback_news(AccelChoice(Accel.TCG, "TCG requested"), tmp_path)
    monkeypatch.setattr(accellib, "_boot_id", lambda: "boot-2")
    assert accellib.fallback_news(fell, tmp_path)


# --- the fall-back notice: whole words, once, then with -v -----------------------------------

ASSERTION = ("qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: "
             "Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed. " + "and more words " * 12)


def test_a_failed_probe_is_told_in_whole_words(tmp_path: Path) -> None:
    qemu = tmp_path / "qemu-system-x86_64"
    (tmp_path / "message").write_text(ASSERTION + "\n")
    qemu.write_text(f"#!/bin/sh\ncat {tmp_path / 'message'} >&2\nexit 134\n")
    qemu.chmod(0o755)
    problem = accellib.probe_kvm(str(qemu), tmp_path / "k", tmp_path / "i", "", "microvm")
    assert problem is not None and problem.startswith("a test boot under KVM failed (qemu-")
    detail = problem.removeprefix("a test boot under KVM failed (").removesuffix(")")
    assert detail.endswith(" ...") and len(detail) <= accellib.DETAIL_WIDTH
    assert ASSERTION.startswith(detail.removesuffix(" ...") + " ")
    assert "failed." in detail  # QEMU's own message is whole; only the tail is left out


@pytest.mark.parametrize(
    ("text", "width", "clipped"),
    [("short", 10, "short"), ("one two three four", 12, "one two ..."),
     ("unbreakable" * 3, 10, "unbreakable" * 3)],
)
def test_clip_cuts_between_words(text: str, width: int, clipped: str) -> None:
    assert accellib.clip(text, width) == clipped


def test_the_fall_back_notice_once_then_only_verbose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accellib, "_boot_id", lambda: "boot-1")
    reason = f"/dev/kvm is present but unusable: a test boot under KVM failed ({ASSERTION})"
    fell = AccelChoice(Accel.TCG, reason, fell_back=True)
    first = accellib.fallback_notice(fell, verbose=False, cache=tmp_path)
    assert first == f"{reason}; using TCG (slower)"
    assert accellib.fallback_notice(fell, verbose=False, cache=tmp_path) is None
    assert accellib.fallback_notice(fell, verbose=True, cache=tmp_path) == first
    kvm = AccelChoice(Accel.KVM, "/dev/kvm works")
    assert accellib.fallback_notice(kvm, verbose=True, cache=tmp_path) is None


def test_remembered_kvm_reads_this_boots_answer_without_probing(
    tmp_path: Path, counted_probe: Callable[[str | None], list[Args]],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    qemu = "/usr/bin/qemu-system-x86_64"
    assert accellib.remembered_kvm(qemu, "microvm", tmp_path) is None
    calls = counted_probe("a test boot under KVM failed (oops)")
    usable(tmp_path)
    assert accellib.remembered_kvm(qemu, "microvm", tmp_path) == (
        "a test boot under KVM failed (oops)",)
    assert accellib.remembered_kvm(qemu, "q35", tmp_path) is None
    assert accellib.remembered_kvm("/opt/qemu", "microvm", tmp_path) is None
    monkeypatch.setattr(accellib, "_boot_id", lambda: "boot-2")
    assert accellib.remembered_kvm(qemu, "microvm", tmp_path) is None
    assert len(calls) == 1
