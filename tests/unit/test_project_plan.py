"""The runs a project makes: order, shards, --shard slices, --list JSON, run argv."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from vmrun.cli import main
from vmrun.cli.run import run_parser, split_command
from vmrun.errors import UsageError
from vmrun.project import RunUnit, parse_shard, plan, read_project

PROJECT = """\
[profile.unit]
command = ["sh", "-c", "make check"]
arch = ["x86_64", "s390x"]
timeout = 600
env = { GREETING = "hi" }

[profile.py]
extends = "unit"
image = "docker://python:3.12-slim"
command = ["python", "-m", "pytest"]
arch = ["aarch64"]
shards = 3
collect = ["out/*.xml"]
junit = ["out/report.xml"]
"""


@pytest.fixture
def project_file(tmp_path: Path) -> Path:
    path = tmp_path / "vmrun.toml"
    path.write_text(textwrap.dedent(PROJECT))
    return path


def test_plan_is_profiles_then_arches_then_shards(project_file: Path) -> None:
    units = plan(read_project(project_file))
    assert [u.id for u in units] == ["unit/x86_64", "unit/s390x", "py/aarch64/1",
                                     "py/aarch64/2", "py/aarch64/3"]
    assert [u.id for u in plan(read_project(project_file), ["py", "unit", "py"])][0] == \
        "py/aarch64/1"
    assert len({u.results for u in units}) == len(units)  # parallel runs never share one
    assert units[3].results == ".vmrun/results/py/aarch64/2"


def test_a_runs_argv_is_a_valid_vmrun_run_command_line(project_file: Path) -> None:
    unit = plan(read_project(project_file), ["py"], extra=["-k", "x"])[1]
    assert unit.run_argv[0] == "run"
    options, command = split_command(unit.run_argv[1:])
    args = run_parser().parse_args(options)
    assert (args.arch, args.image, args.timeout) == ("aarch64", "docker://python:3.12-slim",
                                                      600.0)
    assert {"GREETING=hi", "VMRUN_SHARD=2", "VMRUN_SHARDS=3"} <= set(args.env)
    assert command == ["python", "-m", "pytest", "-k", "x"]
    assert unit.argv[-5:] == ("--unit", "py/aarch64/2", "--", "-k", "x")


def test_shard_slices_cover_every_run_exactly_once(project_file: Path) -> None:
    project = read_project(project_file)
    everything = [u.id for u in plan(project)]
    for count in range(1, 8):
        slices = [[u.id for u in plan(project, shard=(i, count))] for i in range(1, count + 1)]
        assert [ident for part in slices for ident in part] == everything
        assert max(map(len, slices)) - min(map(len, slices)) <= 1


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0", "-1/2"])
def test_bad_shard_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="bad --shard"):
        parse_shard(text)


def test_unknown_profile_is_refused(project_file: Path) -> None:
    with pytest.raises(UsageError, match="no profile 'nope'"):
        plan(read_project(project_file), ["nope"])


def test_list_json_is_one_object_per_run_and_round_trips(
        project_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test", "--project", str(project_file), "--list", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    units = [RunUnit.from_json(json.loads(line)) for line in lines]
    assert units == plan(read_project(project_file))
    first = json.loads(lines[0])
    assert {"id", "profile", "arch", "shard", "shards", "argv"} <= set(first)
    assert main(["test", "--project", str(project_file), "--list", "--shard", "2/2"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == ["py/aarch64/1", "py/aarch64/2", "py/aarch64/3"]


def test_unknown_unit_is_a_usage_error(project_file: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["test", "--project", str(project_file), "--unit", "py/vax"]) == 125
    assert "no run 'py/vax'" in capsys.readouterr().err


def test_list_json_to_a_file_and_report_files_checked_before_running(
        project_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = project_file.parent / "matrix.jsonl"
    assert main(["test", "--project", str(project_file), "--list", "--json", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 5
    missing = project_file.parent / "no" / "such" / "r.xml"
    assert main(["test", "--project", str(project_file), "--junit", str(missing)]) == 125
    assert "is not a directory" in capsys.readouterr().err


def test_an_empty_slice_still_writes_its_reports(tmp_path: Path) -> None:
    (tmp_path / "vmrun.toml").write_text('[profile.a]\ncommand = ["true"]\n')
    report = tmp_path / "r.xml"
    argv = ["test", "--project", str(tmp_path / "vmrun.toml"), "--shard", "2/3"]
    assert main([*argv, "--junit", str(report), "--json", str(tmp_path / "r.json")]) == 0
    assert b'tests="0"' in report.read_bytes()
    assert json.loads((tmp_path / "r.json").read_text()) == {"exit_code": 0, "runs": []}


def test_a_relative_project_path_becomes_absolute_in_the_argv(
        project_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(project_file.parent)
    from vmrun.project import load

    unit = plan(load(file=Path("vmrun.toml")))[0]
    assert unit.argv[unit.argv.index("--project") + 1] == str(project_file.resolve())
