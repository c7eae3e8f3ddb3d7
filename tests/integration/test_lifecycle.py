"""Real VMs: a paused VM, a guest whose agent never starts, and how QEMU runs (no core
dumps, a private run directory)."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration.vmtools import alive, qemu_children, vmrun_argv, vmrun_env
from vmrun import Command, Machine, MachineSpec, Share
from vmrun.console import PAUSE_GRACE
from vmrun.errors import QemuError
from vmrun.guest.build import Guest

pytestmark = pytest.mark.vm


def core_limit(pid: int) -> list[str]:
    """The soft and hard limits on a core file's size of process PID."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return line.split()[4:6]
    raise AssertionError(f"no core limit for {pid}")


def seccomp_filters(pid: int) -> int:
    """How many seccomp filters process PID runs under."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Seccomp_filters:"):
            return int(line.split()[1])
    raise AssertionError(f"no seccomp information for {pid}")


def test_a_paused_vm_ends_the_run_promptly(guest: Guest, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMRUN_RUNS_DIR", str(tmp_path / "runs"))
    stopped: list[float] = []
    with pytest.raises(QemuError) as info, Machine(MachineSpec(share=Share.NONE)) as vm:
        assert vm.qemu is not None and vm.qmp is not None and vm.rundir is not None
        pid, rundir = vm.qemu.process.pid, vm.rundir
        # QEMU runs without core dumps (a core holds guest RAM), in a private directory.
        assert core_limit(pid) == ["0", "0"]
        assert stat.S_IMODE(rundir.stat().st_mode) == 0o700
        assert stat.S_IMODE(rundir.parent.stat().st_mode) == 0o700
        # Where QEMU takes -sandbox (the probe said so), its seccomp filter is in force.
        if "-sandbox" in vm.argv:
            assert seccomp_filters(pid) > seccomp_filters(os.getpid())
        qmp = vm.qmp

        def stop() -> None:
            stopped.append(time.monotonic())
            qmp.send("stop")  # as an I/O error with werror=stop or a pause action would

        timer = threading.Timer(2.0, stop)
        timer.start()
        try:
            vm.run(Command(("sleep", "600"), timeout=300))
        finally:
            timer.cancel()
    ended = time.monotonic()
    assert "paused the VM" in str(info.value) and "did not resume" in str(info.value)
    assert info.value.exit_code == 123
    # Ended by the pause, not the command's timeout: the grace and a generous margin.
    assert stopped and ended - stopped[0] < PAUSE_GRACE + 30
    print(f"\nSTOP to the end of the run (QEMU stopped, cleaned up): "
          f"{ended - stopped[0]:.2f}s (grace {PAUSE_GRACE:.0f}s)")
    assert not alive(pid)
    assert not rundir.exists() and list((tmp_path / "runs").iterdir()) == []


def test_an_agent_that_never_starts_is_a_boot_timeout(guest: Guest, tmp_path: Path) -> None:
    # The kernel starts a shell as PID 1 instead of the agent: it waits on the console
    # for ever, and the agent never says "ready".
    runs = tmp_path / "runs"
    env = {**vmrun_env(), "VMRUN_RUNS_DIR": str(runs), "VMRUN_KERNEL_APPEND": "rdinit=/bin/sh"}
    boot_timeout = 15
    started = time.monotonic()
    proc = subprocess.Popen(vmrun_argv("--boot-timeout", str(boot_timeout), "--share", "none",
                                       "--", "true"),
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    qemu: list[int] = []
    while proc.poll() is None and not qemu and time.monotonic() - started < 120:
        qemu = qemu_children(proc.pid)
        time.sleep(0.1)
    out, err = proc.communicate(timeout=300)
    took = time.monotonic() - started
    assert proc.returncode == 122, err
    assert b"not ready within 15s (--boot-timeout)" in err
    assert len(qemu) == 1 and not alive(qemu[0])
    assert list(runs.iterdir()) == []
    assert took >= boot_timeout
    print(f"\nboot timeout {boot_timeout}s: vmrun exited 122 after {took:.1f}s")


def test_a_live_vms_directory_survives_another_runs_start(guest: Guest, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setenv("VMRUN_RUNS_DIR", str(tmp_path / "runs"))
    dead = tmp_path / "runs" / "run-deadbeef0000"
    dead.mkdir(parents=True)
    dead.with_suffix(".lock").touch()  # nobody holds it: a dead run's leftovers
    with Machine(MachineSpec(share=Share.NONE)) as first:
        assert first.rundir is not None and not dead.exists()
        env = {**vmrun_env(), "VMRUN_RUNS_DIR": str(tmp_path / "runs")}
        second = subprocess.run(vmrun_argv("--share", "none", "--", "true"), cwd=tmp_path,
                                env=env, capture_output=True, timeout=300, check=False)
        assert second.returncode == 0, second.stderr
        # The second run cleaned up dead runs at its start, and left the live one alone.
        assert (first.rundir / "qemu.argv").exists()
        assert first.run(Command(("true",))).exit_code == 0
        assert sorted(os.listdir(tmp_path / "runs")) == [first.rundir.name,
                                                         first.rundir.name + ".lock"]
    assert os.listdir(tmp_path / "runs") == []
