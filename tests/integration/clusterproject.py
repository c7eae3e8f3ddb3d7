"""A two-run project for `vmrun test --cluster URL` (Dask's and Slurm's tests), and what
its run must show wherever it ran."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Collection
from pathlib import Path

from tests.integration.vmtools import run_cli

# x86_64 passes; i386 (uname -m: i686) fails with 5, the run's exit status
PROJECT = """\
[profile.p]
arch = ["x86_64", "i386"]
net = "none"
collect = ["out.txt"]
command = ["sh", "-c", '''uname -m > out.txt; echo from $(uname -m)
             [ $(uname -m) != i686 ] || exit 5''']
"""


def run_project(tmp_path: Path, url: str, env: dict[str, str] | None = None
                ) -> tuple[subprocess.CompletedProcess[bytes], Path]:
    """`vmrun test --cluster URL --json report.json` on PROJECT, written under TMP_PATH."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "vmrun.toml").write_text(PROJECT)
    done = run_cli("test", "--cluster", url, "--jobs", "2", "--json", "report.json",
                   cwd=project, timeout=900, env_extra=env)
    return done, project


def check_project_run(done: subprocess.CompletedProcess[bytes], project: Path,
                      nodes: Collection[str]) -> None:
    """The same output, exit status and reports as a local run's, and each run's node (one
    of NODES) and attempts in the summary and the JSON report."""
    err = done.stderr.decode()
    assert done.returncode == 5, err
    assert sorted(done.stdout.splitlines()) == [b"[p/i386  ] from i686",
                                                b"[p/x86_64] from x86_64"], err
    lines = [line.split() for line in err.splitlines()]
    assert ["run", "exit", "start", "command", "total", "tests", "node", "attempts"] in lines
    rows = {row[0]: row for row in lines if row and row[0] in ("p/x86_64", "p/i386")}
    assert [rows["p/x86_64"][1], rows["p/i386"][1]] == ["0", "5"], err
    assert {row[-2] for row in rows.values()} <= set(nodes), err
    assert {row[-1] for row in rows.values()} == {"1"}, err
    report = json.loads((project / "report.json").read_text())
    assert report["exit_code"] == 5
    runs = {run["id"]: run for run in report["runs"]}
    assert [runs["p/x86_64"]["exit_code"], runs["p/i386"]["exit_code"]] == [0, 5]
    assert [runs["p/x86_64"]["outcome"], runs["p/i386"]["outcome"]] == ["passed", "failure"]
    for ident, run in runs.items():
        assert run["node"] in nodes and run["attempts"] == 1, run
        assert "boot" in run["timings"] or "restore" in run["timings"], run  # the run's own
        assert run["collected"] == [str(project / ".vmrun/results" / ident / "out.txt")]
    results = project / ".vmrun/results/p"
    assert (results / "x86_64/out.txt").read_text() == "x86_64\n"
    assert (results / "i386/out.txt").read_text() == "i686\n"
