from __future__ import annotations

import pytest

from vmrun.cluster import ClusterSpec, Kind, RunResult, RunUnit, engine_for, parse_cluster
from vmrun.cluster.dask import check_placement, needs
from vmrun.cluster.local import LocalEngine
from vmrun.errors import UsageError, VmrunError

# --- --cluster URLs ------------------------------------------------------------------------


def test_cluster_urls_parse() -> None:
    assert parse_cluster("local") == ClusterSpec(Kind.LOCAL)
    dask = parse_cluster("dask://10.0.0.5:9000")
    assert (dask.kind, dask.host, dask.port, dask.address) == (
        Kind.DASK, "10.0.0.5", 9000, "tcp://10.0.0.5:9000")
    assert parse_cluster("dask://sched").port == 8786
    assert parse_cluster("slurm://") == ClusterSpec(Kind.SLURM)
    assert parse_cluster("slurm://gpu-a100") == ClusterSpec(Kind.SLURM, partition="gpu-a100")
    assert str(parse_cluster("dask://h:1")) == "dask://h:1"


@pytest.mark.parametrize(("url", "problem"), [
    ("kubernetes://x", "unknown kind of cluster"),
    ("dask:/h:1", "unknown kind of cluster"),
    ("dask://h:port", "Port could not be cast"),
    ("dask://:8786", "no scheduler host"),
    ("dask://h:1/path", "nothing may follow the address"),
    ("slurm://a b", "is not a partition name"),
    ("slurm://p?x=1", "nothing may follow the partition"),
])
def test_bad_cluster_urls_say_what_is_wrong_in_one_line(url: str, problem: str) -> None:
    with pytest.raises(UsageError, match=problem) as caught:
        parse_cluster(url)
    assert "\n" not in str(caught.value)
    assert caught.value.hint is not None and "dask://HOST:PORT" in caught.value.hint


def test_local_is_the_local_engine() -> None:
    assert isinstance(engine_for(parse_cluster("local")), LocalEngine)


# --- units and results travel as JSON ----------------------------------------------------


def test_units_and_results_round_trip_through_json() -> None:
    unit = RunUnit(id="unit/x86_64/0", argv=("--arch", "x86_64", "--", "true"),
                   arch="x86_64", memory_mib=768, kvm=True, blobs=("sha256:" + "a" * 64,))
    assert RunUnit.from_json(unit.to_json()) == unit
    result = RunResult(id="u", exit_code=3, seconds=1.5, stdout_tail="x", node="n2",
                       attempts=2, timings={"boot": 1.25}, collected=("a.xml",))
    assert RunResult.from_json(result.to_json()) == result


# --- placement -----------------------------------------------------------------------------


def test_a_unit_asks_for_its_arch_memory_and_kvm() -> None:
    assert needs(RunUnit(id="a", argv=(), arch="s390x", memory_mib=512)) == {
        "arch-s390x": 1, "memory_mib": 512}
    assert needs(RunUnit(id="a", argv=(), arch="x86_64", kvm=True))["kvm"] == 1


def test_a_unit_no_worker_can_take_is_refused_before_anything_runs() -> None:
    x86 = RunUnit(id="x86_64", argv=(), arch="x86_64", memory_mib=1024)
    big = RunUnit(id="big", argv=(), arch="x86_64", memory_mib=64 * 1024)
    s390x = RunUnit(id="s390x", argv=(), arch="s390x")
    workers = [{"arch-x86_64": 2, "memory_mib": 4096}, {"arch-i386": 1, "memory_mib": 2048}]
    check_placement([x86], workers, "dask://h:1")
    for unit in (big, s390x):
        with pytest.raises(VmrunError, match=f"can run '{unit.id}': it needs arch-") as e:
            check_placement([x86, unit], workers, "dask://h:1")
        assert "arch-x86_64=2 memory_mib=4096" in str(e.value)
    with pytest.raises(VmrunError, match="no Dask worker is connected to dask://h:1"):
        check_placement([x86], [], "dask://h:1")


# --- the local engine ----------------------------------------------------------------------


def test_the_local_engine_runs_each_unit_once_and_passes_its_output() -> None:
    """Real vmrun processes that stop at their usage errors: no VM boots."""
    units = [RunUnit(id=f"bad{i}", argv=("--arch", f"nosuch{i}", "--", "true"),
                     arch="x86_64") for i in range(3)]
    seen: list[tuple[str, int, bytes]] = []
    results = LocalEngine().run(units, 2, lambda *line: seen.append(line))
    assert [r.id for r in results] == ["bad0", "bad1", "bad2"]
    assert {r.exit_code for r in results} == {125}
    assert all(r.attempts == 1 and r.node for r in results)
    for i in range(3):
        assert any(unit == f"bad{i}" and fd == 2 and f"nosuch{i}".encode() in line
                   for unit, fd, line in seen), seen
    assert "unknown architecture 'nosuch1'" in results[1].stderr_tail
