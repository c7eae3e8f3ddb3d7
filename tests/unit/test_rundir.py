"""Run directories: a live run's directory survives other runs' cleanup; dead ones go."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmrun.rundir import live_runs, remove_dead_runs, run_directory

SRC = str(Path(__file__).resolve().parents[2] / "src")
# A run in another process: it prints its directory, then holds it until stdin closes.
HOLDER = """
import sys
from vmrun.rundir import run_directory
with run_directory(keep=lambda: False, notice=print) as path:
    print(path, flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    runs = tmp_path / "runs"
    monkeypatch.setenv("VMRUN_RUNS_DIR", str(runs))
    return runs


@pytest.fixture
def holders(root: Path) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def hold_run(root: Path, holders: list[subprocess.Popen[str]]) -> tuple[Path,
                                                                        subprocess.Popen[str]]:
    env = {**os.environ, "VMRUN_RUNS_DIR": str(root), "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    holders.append(proc)
    assert proc.stdout is not None
    path = Path(proc.stdout.readline().strip())
    assert path.is_dir(), path
    return path, proc


def test_a_live_runs_directory_survives_another_runs_cleanup(
        root: Path, holders: list[subprocess.Popen[str]]) -> None:
    live, _ = hold_run(root, holders)
    (live / "overlay.qcow2").write_bytes(b"in use")
    dead, killed = hold_run(root, holders)
    killed.send_signal(signal.SIGKILL)  # dies holding its lock: the kernel frees it
    killed.wait()
    assert dead.is_dir() and dead.with_suffix(".lock").exists()
    assert live_runs(root) == [live]
    with run_directory(keep=lambda: False, notice=print) as mine:
        assert (live / "overlay.qcow2").read_bytes() == b"in use"
        assert not dead.exists() and not dead.with_suffix(".lock").exists()
        assert sorted(live_runs(root)) == sorted([live, mine])
    assert not mine.exists() and not mine.with_suffix(".lock").exists()
    assert live_runs(root) == [live]


def test_a_run_that_ends_removes_its_directory_and_lock(
        root: Path, holders: list[subprocess.Popen[str]]) -> None:
    path, proc = hold_run(root, holders)
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    assert not path.exists() and not path.with_suffix(".lock").exists()
    assert list(root.iterdir()) == []


def test_a_kept_directory_is_never_removed(root: Path) -> None:
    notices: list[str] = []
    with run_directory(keep=lambda: True, notice=notices.append) as kept:
        (kept / "serial.log").write_text("boot\n")
    assert (kept / "kept").exists() and "kept the run directory" in notices[0]
    remove_dead_runs(root)
    with run_directory(keep=lambda: False, notice=notices.append):
        pass
    assert (kept / "serial.log").read_text() == "boot\n"


def test_run_directories_are_private(root: Path) -> None:
    with run_directory(keep=lambda: False, notice=print) as path:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.with_suffix(".lock").stat().st_mode) == 0o600


def test_a_lock_file_without_a_holder_is_dead_even_without_a_directory(root: Path) -> None:
    root.mkdir(mode=0o700)
    (root / "run-orphan.lock").touch()
    assert live_runs(root) == []
    remove_dead_runs(root)
    assert list(root.iterdir()) == []
