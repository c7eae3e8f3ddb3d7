"""A Slurm cluster on this host for tests: munged, slurmctld and three slurmd nodes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# Each node's features: n3 lacks s390x, so a placement check has something to refuse;
# none has kvm (no usable KVM here).
NODES = {
    "n1": "arch-x86_64,arch-i386,arch-aarch64,arch-s390x",
    "n2": "arch-x86_64,arch-i386,arch-aarch64,arch-s390x",
    "n3": "arch-x86_64,arch-i386,arch-aarch64",
}
NODE_CPUS = 2
NODE_MEMORY_MIB = 4096
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "tini", "unshare")
START_TIMEOUT = 60.0


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def slurm_conf(root: Path, ports: list[int]) -> str:
    # SlurmdTimeout=10 and cred_expire=10: a lost node is declared failed in about
    # 25 s here instead of minutes (measured: issue 16). No accounting database:
    # results come back through files, and MinJobAge keeps the tasks' states readable.
    lines = [
        "ClusterName=vmruntest", "SlurmctldHost=localhost", f"SlurmctldPort={ports[0]}",
        "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge/sock,cred_expire=10",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/spool/%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log", f"SlurmdLogFile={root}/log/%n.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
        "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none", "MpiDefault=none", "SwitchType=switch/none",
        "SlurmdTimeout=10", "ReturnToService=2", "KillWait=5", "MinJobAge=600",
        "SlurmdParameters=config_overrides",
    ]
    for (name, features), port in zip(NODES.items(), ports[1:], strict=True):
        lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                     f"CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MIB} Features={features} "
                     "State=UNKNOWN")
    lines.append(f"PartitionName=vmrun Nodes={','.join(NODES)} Default=YES "
                 "MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def _wait_until(check: str, what: str, env: dict[str, str], *argv: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        done = subprocess.run(list(argv), capture_output=True, text=True, env=env, check=False)
        if done.returncode == 0 and check in done.stdout:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the test Slurm cluster: {what} not ready in {START_TIMEOUT:.0f} s")


@contextmanager
def daemon(argv: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, env=env)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(word) for word in text.split()]


def descendants(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    nodes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_node(self, name: str) -> None:
        # Each node in its own PID namespace (killing its init kills the node: slurmd,
        # its steps and their QEMU), under tini: slurmd as PID 1 leaves defunct steps.
        argv = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
                "tini", "-s", "--", "slurmd", "-D", "-N", name]
        with open(self.root / "log" / f"{name}.out", "ab") as out:
            self.nodes[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                                stderr=subprocess.STDOUT, env=self.env)

    def node_processes(self, name: str) -> list[int]:
        """Host PIDs of every process of node NAME (its namespace's init and below)."""
        return descendants(self.nodes[name].pid)

    def kill_node(self, name: str) -> None:
        """The node dies at once: SIGKILL to its namespace's init takes every process in
        it (slurmd, the job step, vmrun, QEMU) with it."""
        process = self.nodes[name]
        for init in children(process.pid):
            os.kill(init, signal.SIGKILL)
        process.wait(timeout=30)

    def stop_node(self, name: str) -> None:
        process = self.nodes.pop(name)
        if process.poll() is None:
            for init in children(process.pid):
                os.kill(init, signal.SIGKILL)
            process.wait(timeout=30)

    def stop_all(self) -> None:
        for name in list(self.nodes):
            self.stop_node(name)

    def wait_idle(self, count: int = len(NODES)) -> None:
        _wait_until(f"{count} idle", f"{count} idle nodes", self.env,
                    "sinfo", "-h", "-t", "idle", "-o", "%D idle")


@contextmanager
def slurm_cluster() -> Iterator[Cluster]:
    """munged, slurmctld and the NODES, configured in a fresh temporary directory; SLURM_CONF
    points at its slurm.conf in os.environ while it runs. Every daemon is stopped at the end."""
    root = Path(tempfile.mkdtemp(prefix="vmrun-slurm-test-"))
    saved = os.environ.get("SLURM_CONF")
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)
        for sub in ("munge", "state", "log", *(f"spool/{n}" for n in NODES)):
            (root / sub).mkdir(parents=True)
        os.chmod(root, 0o755)
        key = root / "munge" / "key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        conf = root / "slurm.conf"
        conf.write_text(slurm_conf(root, free_ports(1 + len(NODES))))
        env = {**os.environ, "SLURM_CONF": str(conf)}
        stack.enter_context(daemon(
            ["munged", "-F", "-f", f"--socket={root}/munge/sock", f"--key-file={key}",
             f"--log-file={root}/log/munged.log", f"--pid-file={root}/munge/pid",
             f"--seed-file={root}/munge/seed"], root / "log" / "munged.out", env))
        deadline = time.monotonic() + START_TIMEOUT
        while not (root / "munge" / "sock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        stack.enter_context(daemon(["slurmctld", "-D", "-i"], root / "log" / "ctld.out", env))
        _wait_until("is UP", "slurmctld", env, "scontrol", "ping")
        cluster = Cluster(root=root, env=env)
        stack.callback(cluster.stop_all)
        for name in NODES:
            cluster.start_node(name)
        cluster.wait_idle()
        os.environ["SLURM_CONF"] = str(conf)
        try:
            yield cluster
        finally:
            if saved is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = saved
