"""Helpers the VM tests share: running vmrun as a user would, private runs directories."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmrun.guest.build import Guest, ensure_guest
from vmrun.qemu.arch import host_arch, lookup_arch

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="session")
def guest() -> Guest:
    """The default guest, fetched or built once for the whole session."""
    arch = lookup_arch(host_arch())
    if shutil.which(arch.qemu_binary) is None:
        pytest.fail(f"{arch.qemu_binary} is missing: run scripts/setup --dev")
    return ensure_guest(arch)


def vmrun_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmrun", *args]


def vmrun_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def qemu_children(pid: int) -> list[int]:
    """PIDs of QEMU processes whose parent is PID."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        if ppid == pid and comm.startswith("qemu-system"):
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


@pytest.fixture
def private_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A runs directory of the test's own (VMRUN_RUNS_DIR, for vmrun in this process and
    in the ones it starts): other vmrun processes on a busy host cannot blur a check of
    what a run left behind. Short, under /tmp: it holds UNIX sockets."""
    root = Path(tempfile.mkdtemp(prefix="vmrun-runs-"))
    monkeypatch.setenv("VMRUN_RUNS_DIR", str(root))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A fresh directory to share with the guest."""
    yield tmp_path


def run_cli(*args: str, cwd: Path, input: bytes | None = None, timeout: float = 180,
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**vmrun_env(), **(env_extra or {})}
    return subprocess.run(vmrun_argv(*args), cwd=cwd, env=env, input=input,
                          capture_output=True, timeout=timeout, check=False)
