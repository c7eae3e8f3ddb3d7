from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmrun import doctor
from vmrun.qemu import accel as accellib
from vmrun.qemu.arch import ARCHES, host_arch

SRC = str(Path(__file__).resolve().parents[2] / "src")


def vmrun_doctor(*args: str, env: dict[str, str] | None = None
                 ) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    return subprocess.run([sys.executable, "-m", "vmrun", "doctor", *args], env=environ,
                          capture_output=True, text=True, timeout=120, check=False)


def path_without(tmp_path: Path, left_out: str) -> str:
    """A PATH of one directory with links to every command on PATH but LEFT_OUT."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            target = bin_dir / entry.name
            if entry.name != left_out and not target.exists() and os.access(entry.path, os.X_OK):
                target.symlink_to(entry.path)
    return str(bin_dir)


def test_doctor_checks_everything_and_fetches_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    done = vmrun_doctor("--json", env={"VMRUN_CACHE_DIR": str(cache)})
    report = json.loads(done.stdout)
    assert done.returncode == (0 if report["ok"] else 1), done.stderr
    names = [check["name"] for check in report["checks"]]
    for arch in ARCHES:
        assert f"qemu {arch}" in names and f"firmware {arch}" in names
    for name in ("config", "virtiofsd", "signature check", "debian keys", "qemu-img",
                 "tar2sqfs", "cache"):
        assert name in names
    host = {check["name"]: check for check in report["checks"]}[f"qemu {host_arch()}"]
    assert host["required"] and host["status"] == ("ok" if shutil.which(
        ARCHES[host_arch()].qemu_binary) else "fail")
    assert not cache.exists()  # nothing downloaded, nothing created
    text = vmrun_doctor(env={"VMRUN_CACHE_DIR": str(cache)})
    assert text.returncode == done.returncode
    last = text.stdout.splitlines()[-1]
    assert last == "ready: everything needed is here" if report["ok"] else \
        last.startswith("not ready: ")


@pytest.mark.skipif(shutil.which("qemu-system-s390x") is None,
                    reason="the test leaves out an installed qemu-system-s390x")
def test_a_missing_qemu_is_named_with_its_package(tmp_path: Path) -> None:
    env = {"PATH": path_without(tmp_path, "qemu-system-s390x")}
    done = vmrun_doctor("--arch", "s390x", env=env)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    [at] = [i for i, line in enumerate(lines) if line.startswith("FAIL  qemu s390x")]
    assert lines[at].endswith("qemu-system-s390x not found")
    assert lines[at + 1].strip() == "fix: sudo apt-get install qemu-system-misc"
    assert lines[-1] == "not ready: qemu s390x"
    # Without --arch, a foreign architecture is shown but does not fail the host's runs.
    full = vmrun_doctor("--json", env=env)
    checks = {check["name"]: check for check in json.loads(full.stdout)["checks"]}
    assert checks["qemu s390x"]["status"] == "fail" and not checks["qemu s390x"]["required"]
    assert full.returncode == vmrun_doctor("--json").returncode


def test_a_bad_config_file_fails_doctor(tmp_path: Path) -> None:
    bad = tmp_path / "config.toml"
    bad.write_text("cpus = \"many\"\n")
    done = vmrun_doctor("--arch", host_arch(), env={"VMRUN_CONFIG": str(bad)})
    assert done.returncode == 1
    assert "FAIL  config" in done.stdout
    assert f"{bad}:1: cpus must be an integer, not a string" in done.stdout


def test_an_unknown_arch_is_a_usage_error() -> None:
    done = vmrun_doctor("--arch", "vax")
    assert done.returncode == 125 and "unknown architecture 'vax'" in done.stderr


def test_a_cache_that_cannot_be_made_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    check = doctor.check_cache(blocker / "cache")
    assert check.status == doctor.Status.FAIL and check.required
    assert "VMRUN_CACHE_DIR" in check.fix
    assert doctor.check_cache(tmp_path / "new" / "cache").status in (doctor.Status.OK,
                                                                    doctor.Status.WARN)


@pytest.mark.skipif(not (sys.platform == "linux" and os.access("/dev/kvm", os.R_OK | os.W_OK)
                         and shutil.which(ARCHES[host_arch()].qemu_binary)),
                    reason="needs an accessible /dev/kvm and QEMU")
def test_kvm_is_told_from_the_remembered_probe(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    arch = ARCHES[host_arch()]
    check = doctor.check_accel(arch, tmp_path)
    assert check.status == doctor.Status.UNKNOWN and "not probed yet" in check.detail
    monkeypatch.setattr(accellib, "probe_kvm", lambda *args: "a test boot failed (oops)")
    qemu = shutil.which(arch.qemu_binary)
    assert qemu is not None
    accellib.kvm_usable(qemu, "9.0", tmp_path / "k", tmp_path / "i", "", arch.machine,
                        tmp_path)
    check = doctor.check_accel(arch, tmp_path)
    assert check.status == doctor.Status.WARN
    assert check.detail == ("/dev/kvm is present but unusable: a test boot failed (oops); "
                            "runs use TCG (slower)")
