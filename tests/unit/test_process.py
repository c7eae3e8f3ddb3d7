"""QEMU's process: the probe that decides whether runs pass -sandbox."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmrun.qemu.process import sandbox_supported

# A QEMU built without seccomp, as QEMU 7.2 words it; each start is counted in $1.calls.
NO_SECCOMP = """#!/bin/sh
echo x >> "$0.calls"
case " $* " in
  *" -sandbox "*) echo "qemu-system-x86_64: -sandbox on: There is no option group 'sandbox'" >&2
                  exit 1 ;;
esac
echo "QEMU emulator version 7.2.0"
"""
WITH_SECCOMP = """#!/bin/sh
echo x >> "$0.calls"
echo "QEMU emulator version 7.2.0"
"""
BROKEN = """#!/bin/sh
echo x >> "$0.calls"
exit 1
"""


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMRUN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_qemu(tmp_path: Path, script: str) -> str:
    path = tmp_path / "bin" / "qemu-system-x86_64"
    path.parent.mkdir(exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    return str(path)


def calls(qemu: str) -> int:
    try:
        return len(Path(qemu + ".calls").read_text().splitlines())
    except FileNotFoundError:
        return 0


def test_a_qemu_without_seccomp_runs_without_sandbox_and_says_so_once(tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path, NO_SECCOMP)
    notices: list[str] = []
    assert sandbox_supported(qemu, notices.append) is False
    assert notices == [f"{qemu} was built without seccomp: QEMU runs without -sandbox"]
    probes = calls(qemu)
    # Cached: no second probe, no second notice.
    assert sandbox_supported(qemu, notices.append) is False
    assert calls(qemu) == probes and len(notices) == 1


def test_a_qemu_with_seccomp_keeps_the_sandbox(tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path, WITH_SECCOMP)
    notices: list[str] = []
    assert sandbox_supported(qemu, notices.append) is True
    assert sandbox_supported(qemu, notices.append) is True
    assert notices == [] and calls(qemu) == 1


def test_a_replaced_qemu_is_probed_again(tmp_path: Path) -> None:
    qemu = fake_qemu(tmp_path, WITH_SECCOMP)
    assert sandbox_supported(qemu, print) is True
    os.unlink(qemu)
    fake_qemu(tmp_path, NO_SECCOMP + "\n# rebuilt\n")
    assert sandbox_supported(qemu, print) is False


def test_a_qemu_that_cannot_even_print_its_version_keeps_the_sandbox(tmp_path: Path) -> None:
    # No answer: the run keeps -sandbox and QEMU's own start reports what is wrong.
    qemu = fake_qemu(tmp_path, BROKEN)
    notices: list[str] = []
    assert sandbox_supported(qemu, notices.append) is True
    assert notices == []

