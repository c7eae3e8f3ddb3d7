"""The local engine with real processes (no VM): merged prefixed lines, tails, exit codes,
records read back, bakes run once; the bake a profile asks for."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from vmrun.cli.run import run_parser, split_command
from vmrun.cli.test import writer
from vmrun.matrix import first_failure
from vmrun.project import LocalEngine, RunUnit, plan, read_project
from vmrun.project.runner import RECORD


def shell_unit(root: Path, ident: str, script: str, bake: tuple[str, ...] = ()) -> RunUnit:
    return RunUnit(id=ident, profile=ident.split("/")[0], arch="x86_64", shard=1, shards=1,
                   root=str(root), results=f".vmrun/results/{ident}",
                   argv=("sh", "-c", script), run_argv=("run",), bake=bake)


def test_local_engine_runs_in_parallel_and_keeps_each_runs_output(tmp_path: Path) -> None:
    record = {"exit_code": 0, "timings": {"boot": 1.25, "command": 0.5, "bad": "x"},
              "collected": ["/x/report.xml"], "node": "here"}
    units = [
        shell_unit(tmp_path, "a/x86_64", "echo one; echo err >&2; printf 'no newline'"),
        shell_unit(tmp_path, "b/x86_64", "mkdir -p .vmrun/results/b/x86_64 && echo '"
                   + json.dumps(record) + "' > .vmrun/results/b/x86_64/" + RECORD
                   + "; exit 7"),
        shell_unit(tmp_path, "c/x86_64", "exit 3"),
    ]
    lines: list[tuple[str, int, bytes]] = []
    results = LocalEngine().run(units, 2, lambda i, fd, line: lines.append((i, fd, line)))
    assert [r.id for r in results] == ["a/x86_64", "b/x86_64", "c/x86_64"]
    assert [r.exit_code for r in results] == [0, 7, 3]
    assert first_failure([r.exit_code for r in results]) == 7
    assert ("a/x86_64", 1, b"one") in lines and ("a/x86_64", 2, b"err") in lines
    assert ("a/x86_64", 1, b"no newline") in lines
    assert results[0].stdout_tail == "one\nno newline\n" and results[0].stderr_tail == "err\n"
    assert results[1].timings == {"boot": 1.25, "command": 0.5}
    assert results[1].collected == ("/x/report.xml",) and results[1].node == "here"
    assert all(r.seconds >= 0 for r in results)


def test_a_stale_record_is_not_read_as_this_runs(tmp_path: Path) -> None:
    unit = shell_unit(tmp_path, "a/x86_64", "exit 0")
    stale = tmp_path / unit.results / RECORD
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"timings": {"boot": 9.0}}))
    [result] = LocalEngine().run([unit], 1, lambda *_: None)
    assert result.timings == {}


def test_each_bake_runs_once_and_a_failed_bake_fails_its_runs(tmp_path: Path) -> None:
    log = tmp_path / "bakes"
    ok = ("sh", "-c", f"echo ok >> {log}", "--name", "good")
    bad = ("sh", "-c", f"echo bad >> {log}; exit 117", "--name", "bad")
    units = [shell_unit(tmp_path, "a/x86_64/1", "exit 0", ok),
             shell_unit(tmp_path, "a/x86_64/2", "exit 0", ok),
             shell_unit(tmp_path, "b/x86_64", "exit 0", bad)]
    lines: list[tuple[str, int, bytes]] = []
    results = LocalEngine().run(units, 2, lambda i, fd, line: lines.append((i, fd, line)))
    assert sorted(log.read_text().split()) == ["bad", "ok"]
    assert [r.exit_code for r in results] == [0, 0, 117]
    assert results[2].stderr_tail == "the bake failed"


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
