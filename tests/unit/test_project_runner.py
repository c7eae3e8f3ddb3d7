"""The project layer over the engines (real processes, no VM): bakes run once first,
results directories cleared, records read back into the engine's results; the bake a
profile asks for."""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest

from vmrun import cluster
from vmrun.cli.run import run_parser, split_command
from vmrun.cli.test import writer
from vmrun.cluster import OnOutput, RunResult
from vmrun.matrix import first_failure
from vmrun.project import RunUnit, plan, read_project, run_units
from vmrun.project.plan import VMRUN
from vmrun.project.runner import RECORD, cluster_unit


class ShellEngine:
    """Runs each unit's argv as a command here, as node "node1" after 2 attempts: the
    project layer's tests need no VM (the real engines are tested in test_cluster)."""

    def __init__(self) -> None:
        self.units: list[cluster.RunUnit] = []

    def run(self, units: Sequence[cluster.RunUnit], jobs: int, on_output: OnOutput
            ) -> list[RunResult]:
        results = []
        for unit in units:
            self.units.append(unit)
            done = subprocess.run(unit.argv, capture_output=True, check=False)
            for fd, data in ((1, done.stdout), (2, done.stderr)):
                for line in data.splitlines():
                    on_output(unit.id, fd, line)
            results.append(RunResult(id=unit.id, exit_code=done.returncode, seconds=0.5,
                                     stdout_tail=done.stdout.decode(),
                                     stderr_tail=done.stderr.decode(),
                                     node="node1", attempts=2, timings={"boot": 1.5}))
        return results


def shell_unit(root: Path, ident: str, script: str, bake: tuple[str, ...] = ()) -> RunUnit:
    return RunUnit(id=ident, profile=ident.split("/")[0], arch="x86_64", shard=1, shards=1,
                   root=str(root), results=f".vmrun/results/{ident}",
                   argv=(*VMRUN, "sh", "-c", script), run_argv=("run",),
                   bake=(*VMRUN, *bake) if bake else (), memory_mib=2048)


def test_runs_go_to_the_engine_and_come_back_with_their_records(tmp_path: Path) -> None:
    record = {"exit_code": 0, "timings": {"boot": 1.25},
              "collected": ["/x/report.xml"], "node": "here"}
    results_b = tmp_path / ".vmrun/results/b/x86_64"
    units = [
        shell_unit(tmp_path, "a/x86_64", "echo one; echo err >&2"),
        shell_unit(tmp_path, "b/x86_64", f"mkdir -p {results_b} && echo '"
                   + json.dumps(record) + f"' > {results_b / RECORD}; exit 7"),
        shell_unit(tmp_path, "c/x86_64", "exit 3"),
    ]
    lines: list[tuple[str, int, bytes]] = []
    engine = ShellEngine()
    results = run_units(units, 2, lambda i, fd, line: lines.append((i, fd, line)), engine)
    assert [r.id for r in results] == ["a/x86_64", "b/x86_64", "c/x86_64"]
    assert [r.exit_code for r in results] == [0, 7, 3]
    assert first_failure([r.exit_code for r in results]) == 7
    assert ("a/x86_64", 1, b"one") in lines and ("a/x86_64", 2, b"err") in lines
    assert results[0].stdout_tail == "one\n" and results[0].stderr_tail == "err\n"
    assert results[1].collected == ("/x/report.xml",)  # the record's
    assert all(r.node == "node1" and r.attempts == 2 and r.timings == {"boot": 1.5}
               for r in results)  # the engine's
    assert [(u.arch, u.memory_mib) for u in engine.units] == [("x86_64", 2048)] * 3


def test_a_unit_runs_as_vmrun_test_unit_on_its_arch_and_memory(tmp_path: Path) -> None:
    (tmp_path / "vmrun.toml").write_text(textwrap.dedent("""\
        [profile.py]
        arch = ["aarch64"]
        memory = "3G"
        cpus = 2
        command = ["true"]
        """))
    [unit] = plan(read_project(tmp_path / "vmrun.toml"))
    assert cluster_unit(unit) == cluster.RunUnit(
        id="py/aarch64", arch="aarch64", memory_mib=3072, cpus=2,
        argv=("test", "--project", str((tmp_path / "vmrun.toml").resolve()),
              "--unit", "py/aarch64"))


def test_a_stale_record_is_not_read_as_this_runs(tmp_path: Path) -> None:
    unit = shell_unit(tmp_path, "a/x86_64", "exit 0")
    stale = tmp_path / unit.results / RECORD
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"collected": ["/old/report.xml"]}))
    [result] = run_units([unit], 1, lambda *_: None, ShellEngine())
    assert result.collected == ()


def test_each_bake_runs_once_and_a_failed_bake_fails_its_runs(tmp_path: Path) -> None:
    log = tmp_path / "bakes"
    ok = ("sh", "-c", f"echo ok >> {log}", "--name", "good")
    bad = ("sh", "-c", f"echo bad >> {log}; exit 117", "--name", "bad")
    units = [shell_unit(tmp_path, "a/x86_64/1", "exit 0", ok),
             shell_unit(tmp_path, "a/x86_64/2", "exit 0", ok),
             shell_unit(tmp_path, "b/x86_64", "exit 0", bad)]
    engine = ShellEngine()
    results = run_units(units, 2, lambda *_: None, engine)
    assert sorted(log.read_text().split()) == ["bad", "ok"]
    assert [r.exit_code for r in results] == [0, 0, 117]
    assert results[2].stderr_tail == "the bake failed"
    assert [u.id for u in engine.units] == ["bake good", "bake bad", "a/x86_64/1",
                                            "a/x86_64/2"]


def test_prefixed_writer_pads_to_the_longest_id(tmp_path: Path,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    write = writer([shell_unit(tmp_path, "a/x", ""), shell_unit(tmp_path, "long/x86_64", "")])
    write("a/x", 1, b"hello")
    write("a/x", 2, b"oops")
    out, err = capfd.readouterr()
    assert out == "[a/x        ] hello\n" and err == "[a/x        ] oops\n"


def test_a_bake_profile_runs_its_baked_image(tmp_path: Path) -> None:
    (tmp_path / "setup.sh").write_text("#!/bin/sh\napt-get install -y make\n")
    (tmp_path / "vmrun.toml").write_text(textwrap.dedent("""\
        [profile.ci]
        image = "debian:12"
        bake = "setup.sh"
        boot = "full"
        arch = ["x86_64", "aarch64"]
        command = ["make", "check"]
        collect = ["out/*.xml"]
        sync = ["+ src/***", "- *"]
        """))
    units = plan(read_project(tmp_path / "vmrun.toml"))
    assert units[0].bake[3:] == ("image", "bake", "debian:12", "--user-data",
                                 str(tmp_path.resolve() / "setup.sh"), "--name",
                                 units[0].bake[9], "--arch", "x86_64", "--quiet")
    assert units[0].bake[9] != units[1].bake[9]  # one baked image per architecture
    options, command = split_command(units[0].run_argv[1:])
    args = run_parser().parse_args(options)
    assert args.image == units[0].bake[9] and args.boot == "full"
    assert args.collect == ["out/*.xml"]
    assert args.rules == [("include", "src/***"), ("exclude", "*")]
    assert command == ["make", "check"]
