"""`vmrun test` on a project whose profile has a real test runner: pytest, in a root built
from Debian packages, on x86_64 and aarch64, one test failing on aarch64 only. The JUnit
report is validated against the JUnit schema (tests/data/junit.xsd) and holds the guest's
own test names, per architecture, with the failure's message (2 boots; the roots are the
ones the pytest plugin's tests build, cached)."""

from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.integration.vmtools import run_cli

pytestmark = [pytest.mark.vm, pytest.mark.network]
SCHEMA = Path(__file__).resolve().parents[1] / "data" / "junit.xsd"

PROJECT = """\
[profile.py]
packages = ["python3", "python3-pytest"]
arch = ["x86_64", "aarch64"]
command = ["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml=report.xml",
           "tests"]
collect = ["report.xml"]
junit = ["report.xml"]
timeout = 600
"""

SAMPLE = """\
import platform


def test_adds():
    assert 1 + 1 == 2


def test_machine():
    assert platform.machine() != "aarch64", "broke on aarch64"
"""


def test_a_real_test_runner_in_the_guest(tmp_path: Path) -> None:
    (tmp_path / "vmrun.toml").write_text(PROJECT)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_sample.py").write_text(SAMPLE)
    done = run_cli("test", "--jobs", "1", "--junit", "all.xml", "--json", "all.json",
                   cwd=tmp_path, timeout=3600)
    err = done.stderr.decode()
    assert done.returncode == 1, err  # pytest's own exit status on aarch64
    if shutil.which("xmllint") is not None:
        checked = subprocess.run(["xmllint", "--noout", "--schema", str(SCHEMA),
                                  str(tmp_path / "all.xml")], capture_output=True, text=True,
                                 check=False)
        assert checked.returncode == 0, checked.stderr
    root = ET.parse(tmp_path / "all.xml").getroot()
    cases = {case.get("name"): case for case in root.iter("testcase")}
    for arch in ("x86_64", "aarch64"):
        assert f"test_adds [py/{arch}]" in cases
        assert cases[f"test_adds [py/{arch}]"].find("failure") is None
    assert cases["test_machine [py/x86_64]"].find("failure") is None
    failure = cases["test_machine [py/aarch64]"].find("failure")
    assert failure is not None and "broke on aarch64" in (failure.get("message") or "")
    report = json.loads((tmp_path / "all.json").read_text())
    codes = {run["id"]: run["exit_code"] for run in report["runs"]}
    assert codes == {"py/x86_64": 0, "py/aarch64": 1}
