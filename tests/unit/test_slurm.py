from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from vmrun.cluster import ClusterSpec, Kind, RunResult, RunUnit, engine_for, parse_cluster
from vmrun.cluster.slurm import (
    SINFO_FORMAT,
    JobDir,
    Needs,
    Node,
    SlurmEngine,
    SlurmError,
    Verdict,
    array_spec,
    check_placement,
    is_final,
    needs_of,
    offers,
    parse_sinfo,
    run_task,
    sbatch_argv,
    verdict,
    write_job_dir,
)

SRC = str(Path(__file__).resolve().parents[2] / "src")


SINFO = """\
n1|vmrun*|arch-x86_64,arch-s390x|4096|2
n1|other|arch-x86_64,arch-s390x|4096|2
n2|vmrun*|arch-x86_64,kvm|8000+|4
n3|other|(null)|1000|1
"""


def test_array_spec_folds_consecutive_indices() -> None:
    assert array_spec([0, 1, 2, 3]) == "0-3"
    assert array_spec([9, 0, 1, 7, 10, 3]) == "0-1,3,7,9-10"
    assert array_spec([5]) == "5"


def test_sinfo_nodes_of_the_default_or_a_named_partition() -> None:
    assert [n.name for n in parse_sinfo(SINFO, None)] == ["n1", "n2"]
    default = {n.name: n for n in parse_sinfo(SINFO, None)}
    assert default["n2"].features == {"arch-x86_64", "kvm"}
    assert default["n2"].mem_mib == 8000 and default["n2"].cpus == 4
    other = parse_sinfo(SINFO, "other")
    assert [(n.name, n.features) for n in other] == [
        ("n1", frozenset({"arch-x86_64", "arch-s390x"})), ("n3", frozenset())]
    assert SINFO_FORMAT.count("|") == 4


def test_needs_come_from_the_unit() -> None:
    unit = RunUnit(id="u", argv=("--arch", "s390x", "--cpus", "2", "--", "true"),
                   arch="s390x", memory_mib=2048, cpus=2)
    assert needs_of(unit) == Needs(("arch-s390x",), 2048 + 512, 2)
    # an alias names the same feature; kvm is asked for by name
    assert needs_of(RunUnit(id="u", argv=("--", "x"), arch="arm64", kvm=True)) == Needs(
        ("arch-aarch64", "kvm"), 1024 + 512, 1)


def test_placement_refuses_a_run_no_node_can_take() -> None:
    nodes = parse_sinfo(SINFO, None)
    check_placement([Needs(("arch-s390x",), 1024, 1), Needs(("kvm",), 8000, 4)], nodes, None)
    with pytest.raises(SlurmError, match=r"needing arch-s390x, kvm.*n1: arch-s390x,arch-x86_64, "
                                         r"4096 MiB, 2 CPU; n2: arch-x86_64,kvm"):
        check_placement([Needs(("arch-s390x", "kvm"), 1024, 1)], nodes, None)
    with pytest.raises(SlurmError, match="needing arch-x86_64, 9000 MiB"):
        check_placement([Needs(("arch-x86_64",), 9000, 1)], nodes, None)
    with pytest.raises(SlurmError, match="no nodes in partition gone"):
        check_placement([Needs((), 1, 1)], [], "gone")


def test_offers_group_alike_nodes() -> None:
    nodes = [Node(f"n{i}", frozenset({"arch-x86_64"}), 2048, 2) for i in range(5)]
    nodes.append(Node("big", frozenset(), 9000, 8))
    assert offers(nodes) == ("n0, n1, n2 and 2 more: arch-x86_64, 2048 MiB, 2 CPU; "
                             "big: -, 9000 MiB, 8 CPU")


def test_node_takes_only_what_it_has() -> None:
    node = Node("n1", frozenset({"arch-x86_64"}), 2048, 2)
    assert node.takes(Needs(("arch-x86_64",), 2048, 2))
    assert not node.takes(Needs(("arch-x86_64",), 2049, 2))
    assert not node.takes(Needs(("arch-x86_64",), 1024, 3))
    assert not node.takes(Needs(("arch-i386",), 1024, 1))


def test_sbatch_argv(tmp_path: Path) -> None:
    job = JobDir(tmp_path)
    argv = sbatch_argv(job, [0, 1, 2, 5], 3, 2, Needs(("arch-s390x", "kvm"), 1536, 1), "vmrun")
    assert argv == [
        "sbatch", "--parsable", "--wait", "--no-requeue", "--job-name=vmrun",
        "--array=0-2,5%3", f"--output={tmp_path}/logs/%a-a2.log", "--partition=vmrun",
        "--mem=1536M", "--cpus-per-task=1", "--constraint=arch-s390x&kvm",
        str(tmp_path / "task.py"), str(tmp_path), "2",
    ]
    assert "--partition" not in " ".join(sbatch_argv(job, [0], 1, 1, Needs((), 1, 1), None))


def test_the_engine_for_a_slurm_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMRUN_CLUSTER_DIR", str(tmp_path))
    engine = engine_for(parse_cluster("slurm://gpu-long"))
    assert isinstance(engine, SlurmEngine)
    assert engine.partition == "gpu-long" and engine.directory == tmp_path
    assert SlurmEngine(ClusterSpec(Kind.SLURM)).partition is None


def test_a_task_runs_its_unit_and_writes_its_result(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The array task's side, without Slurm: the unit chosen by its index runs as `python
    -m vmrun` in the unit's directory; exit code, output and node land in its files."""
    monkeypatch.setenv("PYTHONPATH", SRC)
    work = tmp_path / "work"
    work.mkdir()
    units = [RunUnit(id="a", argv=("--version",), arch="x86_64"),
             RunUnit(id="b", argv=("--no-such-option",), arch="x86_64")]
    job = write_job_dir(tmp_path / "job", units, work, sys.executable)
    assert job.script.read_text().startswith(f"#!{sys.executable}\n")
    first = run_task(job, 0, 1, "n7")
    second = run_task(job, 1, 3, "n8")
    assert (first.exit_code, first.node, first.attempts) == (0, "n7", 1)
    assert first.stdout_tail.startswith("vmrun ")
    assert (second.exit_code, second.node, second.attempts) == (125, "n8", 3)
    assert "--no-such-option" in second.stderr_tail
    assert job.read_result(1, 3) == second and job.read_result(1, 1) is None
    assert job.output(0, 1, 1).read_text() == first.stdout_tail + "\n"
    assert not [p for p in (job.root / "results").iterdir() if p.suffix == ".tmp"]


def test_a_task_refuses_a_directory_the_node_lacks(tmp_path: Path) -> None:
    job = write_job_dir(tmp_path / "job", [RunUnit(id="a", argv=("--version",), arch="i386")],
                        tmp_path / "absent", sys.executable)
    with pytest.raises(SlurmError, match="absent is not on node n1"):
        run_task(job, 0, 1, "n1")
    assert os.listdir(job.root / "results") == []


def test_only_infrastructure_failures_are_tried_again() -> None:
    def result(code: int) -> RunResult:
        return RunResult(id="u", exit_code=code, seconds=1.0, node="n1")

    # the command's own exits, and vmrun's usage and image errors, are the outcome
    for code in (0, 1, 3, 42, 118, 121, 125, 137):
        assert is_final(result(code), last=False)
    # the guest vanished, QEMU died, the node was lost (no result): another attempt
    for lost in (result(119), result(123), None):
        assert not is_final(lost, last=False)
        assert is_final(lost, last=True)


def test_an_attempt_without_a_result_is_decided_by_its_tasks_state() -> None:
    done = RunResult(id="u", exit_code=1, seconds=1.0)
    infra = RunResult(id="u", exit_code=119, seconds=1.0)
    assert verdict(done, "RUNNING", 0, last=False) is Verdict.DONE  # the file decides
    assert verdict(infra, "COMPLETED", 0, last=False) is Verdict.RETRY
    assert verdict(infra, "COMPLETED", 0, last=True) is Verdict.DONE
    for state in (None, "PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
        assert verdict(None, state, 100, last=False) is Verdict.WAIT
    # a lost node: at once
    assert verdict(None, "NODE_FAIL", 0, last=False) is Verdict.RETRY
    assert verdict(None, "NODE_FAIL", 0, last=True) is Verdict.LOST
    # the runner ended without a result: a shared filesystem may be slow to show it
    assert verdict(None, "COMPLETED", 1, last=False) is Verdict.WAIT
    assert verdict(None, "COMPLETED", 60, last=False) is Verdict.RETRY
    assert verdict(None, "GONE", 60, last=False) is Verdict.RETRY
    # cancelled, out of time or memory: not the infrastructure's failure
    for state in ("CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"):
        assert verdict(None, state, 0, last=False) is Verdict.LOST
