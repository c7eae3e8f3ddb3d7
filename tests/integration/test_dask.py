"""vmrun on a real Dask cluster: a scheduler and three workers, each in its own PID and UTS
namespace standing for a node (loopback only); nodes killed mid-run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.clusterproject import check_project_run, run_project
from tests.integration.vmtools import alive, vmrun_argv, vmrun_env
from vmrun.guest.build import Guest

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(os.geteuid() != 0, reason="PID namespaces need root")]
COMMAND = ("sh", "-c", "sleep 10; echo $((6*7))")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def processes() -> dict[int, tuple[int, str]]:
    """Every process: pid -> (parent pid, comm)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat:
            comm = stat[stat.index("(") + 1: stat.rindex(")")]
            found[int(entry.name)] = (int(stat[stat.rindex(")") + 2:].split()[1]), comm)
    return found


def descendants(pid: int) -> list[int]:
    table = processes()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (ppid, _) in table.items() if ppid == parent]
        found += children
        frontier += children
    return found


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


@dataclass
class Node:
    name: str
    unshare: subprocess.Popen[bytes]

    def init(self) -> int:
        """The namespace's PID 1 (tini), as this namespace sees it."""
        return next(p for p in descendants(self.unshare.pid)
                    if processes().get(p, (0, ""))[1] == "tini")

    def worker(self) -> int:
        return next(p for p in descendants(self.unshare.pid)
                    if b"worker" in Path(f"/proc/{p}/cmdline").read_bytes()
                    and processes().get(p, (0, ""))[1].startswith("python"))

    def qemus(self) -> list[int]:
        ns = pid_namespace(self.init())
        return [p for p, (_, comm) in processes().items()
                if comm.startswith("qemu-system") and pid_namespace(p) == ns]


@dataclass
class Cluster:
    url: str
    nodes: list[Node]


def start_node(name: str, worker: list[str], log: Path) -> Node:
    # tini reaps; the worker runs under sh so that killing only the worker leaves the node
    # (its namespace) standing: what its runs do then is the worker's doing alone.
    script = f'hostname {name} && "$@" & wait; exec sleep 100000'
    argv = ["unshare", "--pid", "--fork", "--mount-proc", "--uts", "--kill-child",
            "tini", "-s", "--", "sh", "-c", script, "sh", *worker]
    with log.open("wb") as out:
        return Node(name, subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, env=vmrun_env()))


@pytest.fixture
def cluster(tmp_path: Path, guest: Guest) -> Iterator[Cluster]:
    port = free_port()
    url = f"dask://127.0.0.1:{port}"
    with (tmp_path / "scheduler.log").open("wb") as log:
        scheduler = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", str(port), "--no-dashboard"], stdout=log, stderr=subprocess.STDOUT,
            env=vmrun_env())  # Dask unpickles tasks there: vmrun must be importable
    nodes: list[Node] = []
    try:
        for name in ("node1", "node2"):
            nodes.append(start_node(name, vmrun_argv("cluster", "worker", url, "--slots", "1",
                                                     "--memory", "2G", "--name", name),
                                    tmp_path / f"{name}.log"))
        # A plain `dask worker` with the documented resource names takes runs as well.
        nodes.append(start_node("node3", [
            sys.executable, "-m", "distributed.cli.dask_worker", f"tcp://127.0.0.1:{port}",
            "--no-nanny", "--nthreads", "1", "--name", "node3", "--no-dashboard",
            "--resources", "arch-x86_64=1 arch-i386=1 memory_mib=2048"],
            tmp_path / "node3.log"))
        with distributed.Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(3, timeout=120)
        yield Cluster(url, nodes)
    finally:
        for node in nodes:
            with_init = [p for p in descendants(node.unshare.pid)
                         if processes().get(p, (0, ""))[1] == "tini"]
            for pid in with_init:
                os.kill(pid, signal.SIGKILL)  # the whole namespace goes with its init
            node.unshare.wait(timeout=30)
        scheduler.terminate()
        scheduler.wait(timeout=30)


def start_matrix(url: str, *more: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(vmrun_argv("--cluster", url, "--arch", "x86_64,i386", *more,
                                       "--", *COMMAND),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=vmrun_env())


def busy_node(cluster: Cluster, matrix: subprocess.Popen[bytes], seconds: float = 240
              ) -> tuple[Node, list[int], str]:
    """A node in the middle of a run: its QEMUs, and the architecture of the first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if matrix.poll() is not None:
            raise AssertionError(f"the matrix ended first: {matrix.communicate()}")
        for node in cluster.nodes:
            qemus = node.qemus()
            arches = [arch_of(p) for p in qemus]
            if qemus and arches[0]:
                time.sleep(1)  # booting, or running the command
                if all(alive(p) for p in qemus):
                    return node, qemus, arches[0]
        time.sleep(0.2)
    raise AssertionError("no QEMU started on any node")


def arch_of(qemu: int) -> str:
    """QEMU's guest architecture ("" if it is gone); its comm holds 15 characters."""
    comm = processes().get(qemu, (0, ""))[1]
    return {"qemu-system-i38": "i386", "qemu-system-x86": "x86_64"}.get(comm, "")


def finished(matrix: subprocess.Popen[bytes]) -> tuple[int, list[str], list[list[str]]]:
    out, err = matrix.communicate(timeout=300)
    lines = err.decode().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("arch "))
    return matrix.returncode, out.decode().splitlines(), [line.split()
                                                          for line in lines[header:]]


def check_once_each(code: int, out: list[str], table: list[list[str]]) -> dict[str, list[str]]:
    assert code == 0, (out, table)
    assert sorted(out) == ["[i386  ] 42", "[x86_64] 42"]  # every run reported once
    assert table[0] == ["arch", "exit", "start", "command", "node", "attempts"]
    rows = {row[0]: row for row in table[1:]}
    assert sorted(rows) == ["i386", "x86_64"] and len(table) == 3
    assert all(row[1] == "0" for row in rows.values())
    return rows


def gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_matrix_survives_a_lost_node_and_a_lost_worker(cluster: Cluster) -> None:
    # 1. A whole node (its PID namespace) dies mid-run: its QEMU goes with it, the run is
    # retried on another node, and reported once, with two attempts.
    matrix = start_matrix(cluster.url)
    node, qemus, lost_arch = busy_node(cluster, matrix)
    os.kill(node.init(), signal.SIGKILL)
    assert gone_within(qemus, 5), f"QEMU {qemus} outlived its node"
    code, out, table = finished(matrix)
    rows = check_once_each(code, out, table)
    assert rows[lost_arch][4] != node.name and rows[lost_arch][5] == "2", table
    other = next(arch for arch in rows if arch != lost_arch)
    assert rows[other][5] == "1", table
    assert {row[4] for row in rows.values()} <= {n.name for n in cluster.nodes}
    cluster.nodes.remove(node)
    node.unshare.wait(timeout=30)

    # 2. Only a worker process dies (its node stays up): its run's vmrun and QEMU die with
    # it, not with the node.
    matrix = start_matrix(cluster.url)
    node, qemus, lost_arch = busy_node(cluster, matrix)
    init = node.init()
    os.kill(node.worker(), signal.SIGKILL)
    assert gone_within(qemus, 5), f"QEMU {qemus} outlived its worker"
    assert alive(init)  # the node itself is still there
    code, out, table = finished(matrix)
    rows = check_once_each(code, out, table)
    assert rows[lost_arch][4] != node.name and rows[lost_arch][5] == "2", table


def cluster_run(url: str, *args: str) -> tuple[int, list[str], dict[str, list[str]]]:
    done = subprocess.run(vmrun_argv("--cluster", url, *args), capture_output=True,
                          env=vmrun_env(), timeout=300)
    lines = done.stderr.decode().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("arch "))
    return (done.returncode, done.stdout.decode().splitlines(),
            {row.split()[0]: row.split() for row in lines[header + 1:]})


def test_retries_placement_and_a_vanished_client(cluster: Cluster) -> None:
    # The guest powering itself off is a vanished guest (119): retried, 3 attempts in all.
    code, out, rows = cluster_run(cluster.url, "--arch", "x86_64", "--", "sh", "-c",
                                  "echo try; sleep 1; echo o > /proc/sysrq-trigger; sleep 30")
    assert code == 119 and rows["x86_64"][1] == "119" and rows["x86_64"][5] == "3", rows
    assert out == ["[x86_64] try"]  # the last attempt's output only
    # A command's own failure is its result.
    code, out, rows = cluster_run(cluster.url, "--arch", "x86_64", "--", "sh", "-c",
                                  "echo out; exit 3")
    assert code == 3 and rows["x86_64"][1] == "3" and rows["x86_64"][5] == "1", rows
    assert out == ["[x86_64] out"]
    # A run no worker could take: an error at once, not a wait.
    started = time.monotonic()
    matrix = subprocess.run(vmrun_argv("--cluster", cluster.url, "--arch", "x86_64",
                                       "--memory", "20G", "--", "true"),
                            capture_output=True, env=vmrun_env(), timeout=120)
    assert matrix.returncode == 125
    assert b"no Dask worker at " + cluster.url.encode() + b" can run 'x86_64'" in matrix.stderr
    assert b"memory_mib=20480" in matrix.stderr
    assert time.monotonic() - started < 60
    # The client dies mid-run: the scheduler drops its run, and the worker's task stops
    # vmrun, which stops its VM (Dask alone would let the run go on to its end).
    client = subprocess.Popen(vmrun_argv("--cluster", cluster.url, "--arch", "x86_64", "--",
                                         "sleep", "120"), env=vmrun_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    node, qemus, _ = busy_node(cluster, client)
    client.kill()
    client.wait()
    assert gone_within(qemus, 30), f"QEMU {qemus} outlived the client that wanted it"
    assert alive(node.worker())  # the worker is fine: only the run was stopped


def test_vmrun_test_runs_a_project_on_the_cluster(cluster: Cluster, tmp_path: Path) -> None:
    """`vmrun test --cluster dask://...`: each run a `vmrun test --unit ID` on a worker; the
    output, exit status and reports of a local run, with each run's node and attempts."""
    done, project = run_project(tmp_path, cluster.url)
    check_project_run(done, project, [node.name for node in cluster.nodes])
