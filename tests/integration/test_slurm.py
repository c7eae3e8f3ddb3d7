"""The Slurm engine on a real Slurm cluster of this host: munged, slurmctld, three slurmd."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.clusterproject import check_project_run, run_project
from tests.integration.vmtools import SRC, alive, run_cli
from tests.slurmtools import NODES, Cluster, missing_tools, slurm_cluster
from vmrun.cluster import ClusterSpec, Kind, RunResult, RunUnit
from vmrun.cluster.slurm import SlurmEngine, SlurmError, check_placement, needs_of, query_nodes

pytestmark = pytest.mark.vm

OPTIONS = ("--net", "none", "-q")


def unit(ident: str, arch: str, script: str, *options: str, memory_mib: int = 1024,
         kvm: bool = False) -> RunUnit:
    return RunUnit(id=ident, argv=("--arch", arch, *OPTIONS, *options, "--", "sh", "-c", script),
                   arch=arch, memory_mib=memory_mib, kvm=kvm)


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
    return SlurmEngine(ClusterSpec(Kind.SLURM, partition="vmrun"),
                       directory=tmp_path / "shared")


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


def test_a_matrix_of_runs_through_slurm(engine: SlurmEngine, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the directory shared with the guests, on every node
    units = [
        unit("x86_64/ok", "x86_64", "echo hello from $(uname -m); echo x > from-x86_64"),
        unit("i386/fail", "i386", "uname -m; echo oops >&2; exit 3"),
        unit("x86_64/42", "x86_64", "echo forty-two >&2; exit 42"),
    ]
    on_slurm = Lines()
    results = engine.run(units, 3, on_slurm)
    assert [r.id for r in results] == [u.id for u in units]
    assert [r.exit_code for r in results] == [0, 3, 42]
    job = engine.last_job
    assert job is not None
    for index, (u, result) in enumerate(zip(units, results, strict=True)):
        for fd, tail in ((1, result.stdout_tail), (2, result.stderr_tail)):
            assert on_slurm.of(u.id, fd) == tail.encode().splitlines()
        assert result.node in NODES and result.attempts == 1
        assert "boot" in result.timings or "restore" in result.timings, result.timings
        # each task has its own Slurm log, naming the node and attempt
        assert f"{u.id} attempt 1 on {result.node}" in job.log(index, 1).read_text()
    assert on_slurm.of("x86_64/ok", 1) == [b"hello from x86_64"]
    assert on_slurm.of("i386/fail", 1) == [b"i686"]
    assert on_slurm.of("i386/fail", 2) == [b"oops"]
    assert (work / "from-x86_64").read_text() == "x\n"  # ran in the caller's directory
    assert squeue() == ""


def test_the_same_invocation_gives_the_same_output_and_status(slurm: Cluster,
                                                             tmp_path: Path) -> None:
    """`vmrun --arch A,B --cluster slurm://vmrun` against `--cluster local`: the same lines,
    the same exit status; the summary names each run's node and attempts."""
    script = "uname -m; echo to-stderr >&2; [ $(uname -m) = i686 ] && exit 7; exit 0"
    env = {"VMRUN_CLUSTER_DIR": str(tmp_path / "shared")}
    done = {where: run_cli("--arch", "x86_64,i386", "--cluster", where, "--net", "none",
                           "--jobs", "2", "--", "sh", "-c", script, cwd=tmp_path,
                           timeout=600, env_extra=env)
            for where in ("slurm://vmrun", "local")}
    slurm_run, local_run = done["slurm://vmrun"], done["local"]
    assert slurm_run.returncode == local_run.returncode == 7, slurm_run.stderr
    assert sorted(slurm_run.stdout.splitlines()) == sorted(local_run.stdout.splitlines())
    assert b"[i386  ] i686" in slurm_run.stdout.splitlines()
    lines = [line.split() for line in slurm_run.stderr.decode().splitlines()]
    assert ["arch", "exit", "start", "command", "node", "attempts"] in lines
    rows = {row[0]: row for row in lines if row and row[0] in ("x86_64", "i386")}
    assert rows["x86_64"][1] == "0" and rows["i386"][1] == "7"
    assert {rows[a][4] for a in rows} <= set(NODES) and {rows[a][5] for a in rows} == {"1"}
    assert [b"[i386  ] to-stderr"] == [
        line for line in slurm_run.stderr.splitlines() if line.startswith(b"[i386")]


def test_a_run_no_node_can_take_fails_fast(engine: SlurmEngine, tmp_path: Path) -> None:
    nodes = query_nodes("vmrun")
    assert sorted(n.name for n in nodes) == sorted(NODES)
    check_placement([needs_of(unit("s", "s390x", "true"))], nodes, "vmrun")
    started = time.monotonic()
    with pytest.raises(SlurmError, match=r"no Slurm node in partition vmrun can take a run "
                                         r"needing arch-x86_64, kvm"):
        engine.run([unit("x86_64/ok", "x86_64", "true"),
                    unit("x86_64/kvm", "x86_64", "true", "--accel", "kvm", kvm=True)], 2)
    big = unit("big", "x86_64", "true", "--memory", "16G", memory_mib=16384)
    with pytest.raises(SlurmError, match="16896 MiB"):
        engine.run([big], 1)
    with pytest.raises(SlurmError, match="no nodes in partition nowhere"):
        SlurmEngine(ClusterSpec(Kind.SLURM, partition="nowhere"), directory=tmp_path).run(
            [big], 1)
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


def test_vmruns_infrastructure_failures_are_tried_again(
        engine: SlurmEngine, slurm: Cluster, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit 123 (QEMU missing: the tasks get a PATH with Slurm's tools and no QEMU) is
    vmrun's own failure: tried on every attempt, the last one's output reported once (a
    command's own failures, in the matrix test, are tried once)."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("sbatch", "scontrol", "sinfo", "scancel", "squeue"):
        found = shutil.which(tool)
        assert found is not None
        (tools / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(tools))  # sbatch passes it on to the tasks
    monkeypatch.chdir(tmp_path)
    output = Lines()
    [result] = engine.run([unit("x86_64/no-qemu", "x86_64", "true")], 2, output)
    assert (result.exit_code, result.attempts) == (123, 3)
    assert [line for line in output.of("x86_64/no-qemu", 2) if b"not installed" in line] == [
        b"vmrun: error: QEMU for x86_64 is not installed (qemu-system-x86_64 is not on PATH)"]
    assert engine.last_job is not None
    assert all(engine.last_job.read_result(0, n) for n in (1, 2, 3))


def wait_for_qemu(slurm: Cluster, runner: threading.Thread) -> tuple[str, list[int]]:
    """The node where a run's QEMU runs, and its PIDs, once it does."""
    deadline = time.monotonic() + 120
    while runner.is_alive() and time.monotonic() < deadline:
        for name in list(slurm.nodes):
            if qemu := qemu_of(slurm, name):
                return name, qemu
        time.sleep(0.5)
    raise AssertionError("the run's QEMU never started on a node")


def test_a_cancelled_task_takes_its_qemu_along_and_is_not_retried(
        engine: SlurmEngine, slurm: Cluster, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """scancel: slurmstepd kills the task (proctrack/linuxproc); vmrun dies with the task
    and QEMU with vmrun. A cancel is no infrastructure failure: reported, not retried."""
    monkeypatch.chdir(tmp_path)
    results: list[RunResult] = []
    u = unit("x86_64/cancelled", "x86_64", "sleep 60")
    runner = threading.Thread(target=lambda: results.extend(engine.run([u], 1, Lines())))
    runner.start()
    node, qemu = wait_for_qemu(slurm, runner)
    subprocess.run(["scancel", "--name=vmrun"], check=True)
    time.sleep(5)
    assert not [pid for pid in qemu if alive(pid)]
    runner.join(timeout=120)
    assert not runner.is_alive()
    [result] = results
    assert (result.exit_code, result.attempts) == (119, 1)
    assert f"cancelled on {node}" in result.stderr_tail
    assert squeue() == ""


def test_a_run_on_a_lost_node_is_retried_elsewhere_once(
        engine: SlurmEngine, slurm: Cluster, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    output = Lines()
    results: list[RunResult] = []
    u = unit("x86_64/slow", "x86_64", "echo started; sleep 8; echo survived")
    runner = threading.Thread(target=lambda: results.extend(engine.run([u], 1, output)))
    runner.start()
    lost, qemu = wait_for_qemu(slurm, runner)
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
    assert engine.last_job is not None
    assert f"attempt 2 on {result.node}" in engine.last_job.log(0, 2).read_text()
    assert engine.last_job.read_result(0, 1) is None  # the lost attempt left no result
    slurm.wait_idle()


def test_vmrun_test_runs_a_project_on_slurm(slurm: Cluster, tmp_path: Path) -> None:
    """`vmrun test --cluster slurm://vmrun`: each run a `vmrun test --unit ID` array task in
    the project's directory; the output, exit status and reports of a local run, with each
    run's node and attempts."""
    done, project = run_project(tmp_path, "slurm://vmrun",
                                {"VMRUN_CLUSTER_DIR": str(tmp_path / "shared")})
    check_project_run(done, project, NODES)
    assert squeue() == ""
