"""A missing emulator: one error line, and a hint naming the package for the host's system."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmrun.errors import QemuError
from vmrun.qemu.arch import ARCHES, lookup_arch
from vmrun.qemu.install import (
    System,
    host_system,
    install_hint,
    system_from_os_release,
)
from vmrun.qemu.process import find_qemu

SRC = Path(__file__).resolve().parents[2] / "src"

OS_RELEASES = {
    'ID=debian\nVERSION_ID="12"\n': System.DEBIAN,
    'NAME="Ubuntu"\nID=ubuntu\nID_LIKE=debian\n': System.DEBIAN,
    'ID=linuxmint\nID_LIKE="ubuntu debian"\n': System.DEBIAN,
    'NAME="Fedora Linux"\nID=fedora\nVERSION_ID=41\n': System.FEDORA,
    'ID="rocky"\nID_LIKE="rhel centos fedora"\n': System.FEDORA,
    "ID=arch\nBUILD_ID=rolling\n": System.ARCH,
    "ID=manjaro\nID_LIKE=arch\n": System.ARCH,
    'ID="opensuse-tumbleweed"\nID_LIKE="opensuse suse"\n': System.OTHER,
    "": System.OTHER,
}


@pytest.mark.parametrize(("text", "system"), OS_RELEASES.items())
def test_os_release_names_the_family(text: str, system: System) -> None:
    assert system_from_os_release(text) == system


# The package that holds each emulator, per family (Debian groups s390x and riscv64 in
# -misc; Fedora's -core packages leave out the optional display and audio modules).
PACKAGES = {
    "x86_64": ("qemu-system-x86", "qemu-system-x86-core", "qemu-system-x86"),
    "i386": ("qemu-system-x86", "qemu-system-x86-core", "qemu-system-x86"),
    "aarch64": ("qemu-system-arm", "qemu-system-aarch64-core", "qemu-system-aarch64"),
    "armv7": ("qemu-system-arm", "qemu-system-arm-core", "qemu-system-arm"),
    "s390x": ("qemu-system-misc", "qemu-system-s390x-core", "qemu-system-s390x"),
    "ppc64le": ("qemu-system-ppc", "qemu-system-ppc-core", "qemu-system-ppc"),
    "riscv64": ("qemu-system-misc", "qemu-system-riscv-core", "qemu-system-riscv"),
}


def test_every_architecture_has_its_packages() -> None:
    assert set(PACKAGES) == set(ARCHES)


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_package_per_system(name: str) -> None:
    arch = lookup_arch(name)
    debian, fedora, archlinux = PACKAGES[name]
    assert install_hint(arch, System.DEBIAN) == f"install it: sudo apt-get install {debian}"
    assert install_hint(arch, System.FEDORA) == f"install it: sudo dnf install {fedora}"
    assert install_hint(arch, System.ARCH) == f"install it: sudo pacman -S {archlinux}"
    assert install_hint(arch, System.HOMEBREW) == "install it: brew install qemu"
    other = install_hint(arch, System.OTHER)
    assert arch.qemu_binary in other
    for package in (debian, fedora, archlinux, "Homebrew qemu"):
        assert package in other
    assert "\n" not in other


def test_find_qemu_without_the_emulator_on_path(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    arch = lookup_arch("s390x")
    with pytest.raises(QemuError) as raised:
        find_qemu(arch)
    message = str(raised.value)
    assert message == "QEMU for s390x is not installed (qemu-system-s390x is not on PATH)"
    assert raised.value.hint == install_hint(arch, host_system())
    if host_system() == System.DEBIAN:
        assert raised.value.hint == "install it: sudo apt-get install qemu-system-misc"


def test_find_qemu_takes_the_emulator_from_path(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.which("qemu-system-x86_64")
    if real is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    (tmp_path / "qemu-system-x86_64").symlink_to(real)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_qemu(lookup_arch("x86_64")) == str(tmp_path / "qemu-system-x86_64")


def test_run_for_a_missing_arch_says_so_before_downloading(tmp_path: Path) -> None:
    """`vmrun --arch s390x` on a host without that emulator: exit 123, an error line and
    a hint line, no traceback, and nothing fetched into the cache first."""
    empty = tmp_path / "bin"
    empty.mkdir()
    cache = tmp_path / "cache"
    env = {**os.environ, "PATH": str(empty), "PYTHONPATH": str(SRC),
           "VMRUN_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-m", "vmrun", "--arch", "s390x", "--", "true"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 123, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines == [
        "vmrun: error: QEMU for s390x is not installed (qemu-system-s390x is not on PATH)",
        f"hint: {install_hint(lookup_arch('s390x'), host_system())}",
    ]
    fetched = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert fetched == []
