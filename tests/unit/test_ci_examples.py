"""The CI examples in examples/ (GitHub Actions, GitLab CI): valid YAML, and their planning
steps, run here for real against a sample project, give one job per run, each of which
selects exactly its own run (`--shard I/N` with N the number of runs) and reports JUnit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
PROJECT = """\
[profile.unit]
command = ["sh", "-c", "make check"]
arch = ["x86_64", "aarch64"]

[profile.py]
extends = "unit"
command = ["python3", "-m", "pytest", "--junitxml=report.xml"]
collect = ["report.xml"]
junit = ["report.xml"]
shards = 2
"""
needs_jq = pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")


def load(name: str) -> dict[str, Any]:
    document = yaml.safe_load((EXAMPLES / name).read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A sample project, and a `vmrun` on PATH that is this checkout's."""
    (tmp_path / "vmrun.toml").write_text(PROJECT)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "vmrun"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT / "src"} exec {sys.executable} '
                       '-m vmrun "$@"\n')
    wrapper.chmod(0o755)
    return tmp_path


def env_for(project: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{project / 'bin'}:{os.environ['PATH']}", **extra}


def listed(project: Path, *args: str) -> list[str]:
    done = subprocess.run(["vmrun", "test", "--list", "--json", *args], cwd=project,
                          env=env_for(project), capture_output=True, text=True, check=True)
    return [json.loads(line)["id"] for line in done.stdout.splitlines()]


@needs_jq
def test_github_workflow_plans_one_job_per_run(project: Path) -> None:
    workflow = load("github-actions.yml")
    plan_steps = workflow["jobs"]["plan"]["steps"]
    script = next(step["run"] for step in plan_steps if step.get("id") == "list")
    output = project / "github-output"
    subprocess.run(["bash", "-e", "-c", script], cwd=project, check=True,
                   env=env_for(project, GITHUB_OUTPUT=str(output)))
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    runs = json.loads(outputs["runs"])
    expected = listed(project)
    assert int(outputs["count"]) == len(expected) == 6
    assert [run["id"] for run in runs] == expected
    assert [run["index"] for run in runs] == list(range(1, len(expected) + 1))
    test_job = workflow["jobs"]["test"]
    assert test_job["strategy"]["matrix"]["run"] == "${{ fromJSON(needs.plan.outputs.runs) }}"
    command = next(step["run"] for step in test_job["steps"]
                   if str(step.get("run", "")).startswith("vmrun test"))
    assert command == ("vmrun test --shard ${{ matrix.run.index }}/"
                       "${{ needs.plan.outputs.count }} --junit junit.xml")
    for run in runs:  # each job's slice is exactly its own run
        assert listed(project, "--shard", f"{run['index']}/{len(runs)}") == [run["id"]]


@needs_jq
def test_gitlab_child_pipeline_has_one_job_per_run(project: Path) -> None:
    pipeline = load("gitlab-ci.yml")
    script = pipeline["vmrun-plan"]["script"]
    planning = [line for line in script if not line.startswith(("apt-get", "pipx"))]
    subprocess.run(["bash", "-e", "-c", "\n".join(planning)], cwd=project, check=True,
                   env=env_for(project))
    child = yaml.safe_load((project / "runs.yml").read_text())
    expected = listed(project)
    jobs = {name: job for name, job in child.items() if name != "default"}
    assert list(jobs) == expected
    for index, (name, job) in enumerate(jobs.items(), start=1):
        shard = f"--shard {index}/{len(expected)} --junit junit.xml"
        assert job["script"] == [f"$HOME/.local/bin/vmrun test {shard}"]
        assert job["artifacts"]["reports"]["junit"] == "junit.xml"
        assert listed(project, "--shard", f"{index}/{len(expected)}") == [name]
    assert pipeline["vmrun-runs"]["trigger"]["include"] == [
        {"artifact": "runs.yml", "job": "vmrun-plan"}]
