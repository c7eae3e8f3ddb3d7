"""The Slurm engine on a real Slurm cluster of this host: munged, slurmctld, three slurmd."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.vmtools import SRC, alive, vmrun_env
from tests.slurmtools import NODES, Cluster, missing_tools, slurm_cluster
from vmrun.cluster.slurm import (
    SlurmEngine,
    SlurmError,
    TaskResult,
    check_placement,
    needs_of,
    query_nodes,
)

pytestmark = pytest.mark.vm

OPTIONS = ("--net", "none", "-q")


@dataclass(frozen=True)
class Unit:
    id: str
    argv: tuple[str, ...]
    root: str


def unit(ident: str, arch: str, script: str, root: Path) -> Unit:
    return Unit(ident, (sys.executable, "-m", "vmrun", "--arch", arch, *OPTIONS, "--",
                        "sh", "-c", script), str(root))


@pytest.fixture(scope="session")
def slurm() -> Iterator[Cluster]:
    missing = missing_tools()
    if missing:
        pytest.skip(f"no Slurm here ({', '.join(missing)} missing): scripts/setup --dev "
                    "installs slurm-wlm, munge and tini")
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster needs root (slurmd, PID namespaces)")
    with slurm_cluster() as cluster:
        yield cluster


@pytest.fixture
def engine(slurm: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SlurmEngine:
    # The array tasks inherit this environment (sbatch --export=ALL): vmrun from this
    # checkout, the tests' cache.
    monkeypatch.setenv("PYTHONPATH", SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return SlurmEngine(partition="vmrun", directory=tmp_path / "shared")


class Lines:
    def __init__(self) -> None:
        self.lines: list[tuple[str, int, bytes]] = []
        self.lock = threading.Lock()

    def __call__(self, unit_id: str, fd: int, line: bytes) -> None:
        with self.lock:
            self.lines.append((unit_id, fd, line))

    def of(self, unit_id: str, fd: int) -> list[bytes]:
        return [line for u, f, line in self.lines if (u, f) == (unit_id, fd)]


def squeue() -> str:
    return subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True).stdout


def test_a_matrix_gives_what_the_local_run_gives(engine: SlurmEngine, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    units = [
        unit("x86_64/ok", "x86_64", "echo hello from $(uname -m); echo x > from-x86_64", work),
        unit("i386/fail", "i386", "uname -m; echo oops >&2; exit 3", work),
        unit("x86_64/42", "x86_64", "echo forty-two >&2; exit 42", work),
    ]
    output = Lines()
    results = engine.run(units, 3, output)
    assert [r.id for r in results] == [u.id for u in units]
    for u, result in zip(units, results, strict=True):
        local = subprocess.run(u.argv, cwd=work, env=vmrun_env(), capture_output=True,
                               timeout=300, check=False)
        assert result.exit_code == local.returncode, (result, local.stderr)
        assert output.of(u.id, 1) == local.stdout.splitlines(), result
        assert output.of(u.id, 2) == local.stderr.splitlines(), result
        assert result.stdout_tail.encode() == local.stdout
        assert result.node in NODES and result.attempts == 1
        # each task has its own Slurm log, naming the node and attempt
        assert f"{u.id} attempt 1 on {result.node}" in Path(result.log).read_text()
    assert [r.exit_code for r in results] == [0, 3, 42]
    assert output.of("x86_64/ok", 1) == [b"hello from x86_64"]
    assert (work / "from-x86_64").read_text() == "x\n"  # ran in the unit's directory
    assert squeue() == ""


def test_a_run_no_node_can_take_fails_fast(engine: SlurmEngine, tmp_path: Path) -> None:
    nodes = query_nodes("vmrun")
    assert sorted(n.name for n in nodes) == sorted(NODES)
    check_placement([needs_of(unit("s", "s390x", "true", tmp_path).argv)], nodes, "vmrun")
    started = time.monotonic()
    kvm = unit("x86_64/kvm", "x86_64", "true", tmp_path)
    kvm = Unit(kvm.id, (*kvm.argv[:3], "--accel", "kvm", *kvm.argv[3:]), kvm.root)
    with pytest.raises(SlurmError, match=r"no Slurm node in partition vmrun can take a run "
                                         r"needing arch-x86_64, kvm"):
        engine.run([unit("x86_64/ok", "x86_64", "true", tmp_path), kvm], 2)
    big = Unit("big", (*kvm.argv[:3], "--memory", "16G", "--", "true"), str(tmp_path))
    with pytest.raises(SlurmError, match="16896 MiB"):
        engine.run([big], 1)
    with pytest.raises(SlurmError, match="no nodes in partition nowhere"):
        SlurmEngine(partition="nowhere", directory=tmp_path).run([big], 1)
    assert time.monotonic() - started < 30
    assert squeue() == ""  # nothing was submitted


def qemu_of(slurm: Cluster, name: str) -> list[int]:
    found = []
    for pid in slurm.node_processes(name):
        try:
            if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                found.append(pid)
        except OSError:
            continue
    return found


def test_a_run_on_a_lost_node_is_retried_elsewhere_once(engine: SlurmEngine, slurm: Cluster,
                                                         tmp_path: Path) -> None:
    output = Lines()
    results: list[TaskResult] = []
    u = unit("x86_64/slow", "x86_64", "echo started; sleep 8; echo survived", tmp_path)
    runner = threading.Thread(target=lambda: results.extend(engine.run([u], 1, output)))
    runner.start()
    deadline = time.monotonic() + 120
    lost, qemu = "", list[int]()
    while not qemu and time.monotonic() < deadline:
        time.sleep(0.5)
        lost, qemu = next(((n, q) for n in list(slurm.nodes) if (q := qemu_of(slurm, n))),
                          ("", []))
    assert qemu, "the run's QEMU never started on a node"
    time.sleep(2)
    slurm.kill_node(lost)  # slurmd, its step, vmrun and QEMU at once
    time.sleep(5)
    assert not [pid for pid in qemu if alive(pid)]
    runner.join(timeout=240)
    assert not runner.is_alive()
    slurm.start_node(lost)
    [result] = results
    assert result.exit_code == 0, result
    assert result.attempts == 2 and result.node != lost and result.node in NODES
    assert output.of(u.id, 1) == [b"started", b"survived"]  # reported once: the retry's
    assert "attempt 2" in Path(result.log).read_text()
    slurm.wait_idle()
