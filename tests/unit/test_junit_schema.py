"""vmrun test's JUnit report against the JUnit schema (tests/data/junit.xsd, the format
Jenkins, GitLab and GitHub read), checked by xmllint: runs of every outcome, with the test
cases of a guest's own JUnit file merged in."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.unit.test_project_report import GUEST, guest_file, unit
from vmrun.project import RunResult
from vmrun.project.report import junit_xml

SCHEMA = Path(__file__).resolve().parents[1] / "data" / "junit.xsd"
needs_xmllint = pytest.mark.skipif(shutil.which("xmllint") is None,
                                   reason="xmllint (libxml2-utils) is not installed")


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["xmllint", "--noout", "--schema", str(SCHEMA), str(path)],
                          capture_output=True, text=True, check=False)


@needs_xmllint
def test_the_report_is_valid_junit(tmp_path: Path) -> None:
    units = [unit(tmp_path, "py", "x86_64", ("report.xml",)),
             unit(tmp_path, "py", "s390x", ("report.xml",)),
             unit(tmp_path, "sh", "x86_64"),
             unit(tmp_path, "sh", "aarch64", ("missing.xml",))]
    for u in units[:2]:
        guest_file(u, "report.xml", GUEST)
    results = [RunResult("py/x86_64", 1, 12.5, "out\x1b[31m red\x00", "Traceback tail"),
               RunResult("py/s390x", 0, 30.0, node="node2", attempts=2),
               RunResult("sh/x86_64", 122, 99.0, "", "vmrun: error: no boot", node="n1"),
               RunResult("sh/aarch64", 0, 3.0)]
    report = tmp_path / "junit.xml"
    report.write_bytes(junit_xml(units, results))
    checked = validate(report)
    assert checked.returncode == 0, checked.stderr
    root = ET.parse(report).getroot()
    names = {case.get("name") for case in root.iter("testcase")}
    assert "test_div [py/s390x]" in names and "test_div [py/x86_64]" in names
    failure = next(case for case in root.iter("testcase")
                   if case.get("name") == "test_div [py/s390x]").find("failure")
    assert failure is not None and "ZeroDivisionError" in (failure.get("message") or "")


@needs_xmllint
def test_the_schema_refuses_what_readers_would_not_take(tmp_path: Path) -> None:
    for bad in ('<testsuites><testsuite tests="1"><testcase name="a" classname="c"/>'
                '</testsuite></testsuites>',  # a suite without a name
                '<testsuites><testsuite name="s" tests="1"><testcase classname="c"/>'
                '</testsuite></testsuites>',  # a case without a name
                '<testsuites><testsuite name="s" tests="1"><testcase name="a" '
                'classname="c" time="-1"/></testsuite></testsuites>',  # negative time
                '<testsuites><testsuite name="s" tests="1"><testcase name="a" '
                'classname="c"><oops/></testcase></testsuite></testsuites>'):
        path = tmp_path / "bad.xml"
        path.write_text(bad)
        assert validate(path).returncode != 0, bad
