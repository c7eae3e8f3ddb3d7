"""Everyday use: -q (notices go, errors stay) and run defaults from the config file and
the environment, in a real run."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from tests.integration.vmtools import run_cli
from vmrun.guest.build import Guest

# The insecure-guest warning is a notice that every such run prints; --accel hvf then
# fails on Linux after the guest is ready, before anything boots.
ARGV = ("--insecure-unverified-guest", "--accel", "hvf", "--", "true")
WARNING = "vmrun: WARNING: --insecure-unverified-guest"
ERROR = "vmrun: error: --accel hvf needs macOS"

pytestmark = pytest.mark.vm


@pytest.mark.skipif(platform.system() == "Darwin", reason="HVF works there")
def test_quiet_drops_the_notice_and_keeps_the_error(guest: Guest, workdir: Path) -> None:
    loud = run_cli(*ARGV, cwd=workdir)
    assert loud.returncode == 125
    lines = loud.stderr.decode().splitlines()
    assert any(line.startswith(WARNING) for line in lines), lines
    assert any(line.startswith(ERROR) for line in lines), lines
    quiet = run_cli("-q", *ARGV, cwd=workdir)
    assert quiet.returncode == 125
    lines = quiet.stderr.decode().splitlines()
    assert not any(WARNING in line for line in lines), lines
    assert lines[0].startswith(ERROR), lines
    assert quiet.stdout == b""


@pytest.mark.skipif(platform.system() == "Darwin", reason="HVF works there")
def test_quiet_matrix_keeps_the_errors_only(guest: Guest, workdir: Path) -> None:
    argv = ("--arch", "x86_64,i386", *ARGV)
    loud = run_cli(*argv, cwd=workdir)
    assert any(WARNING in line for line in loud.stderr.decode().splitlines())
    assert "arch" in loud.stderr.decode().splitlines()[-3]  # the summary's header
    quiet = run_cli("-q", *argv, cwd=workdir)
    assert quiet.returncode == 125
    lines = quiet.stderr.decode().splitlines()
    assert not any(WARNING in line for line in lines), lines
    assert not any(line.startswith("arch ") for line in lines), lines  # no summary
    for arch in ("x86_64", "i386"):
        assert any(line.startswith(f"[{arch:<6}] vmrun: error: --accel hvf")
                   for line in lines), lines


def test_defaults_reach_the_guest_in_their_order(guest: Guest, workdir: Path) -> None:
    # One boot shows each layer: the option beats the file (share rw, so the write
    # works), the environment beats the file (3 CPUs), the file beats the built-in (512M).
    config = workdir / "config.toml"
    config.write_text('cpus = 2\nmemory = "512M"\nshare = "ro"\naccel = "tcg"\n')
    done = run_cli("--share", "rw", "--", "sh", "-c",
                   "nproc; grep MemTotal /proc/meminfo; echo ok > written", cwd=workdir,
                   env_extra={"VMRUN_CONFIG": str(config), "VMRUN_CPUS": "3"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines[0] == "3"
    mem_kib = int(lines[1].split()[1])
    assert 300 * 1024 < mem_kib <= 512 * 1024
    assert (workdir / "written").read_text() == "ok\n"
