"""Reports: JUnit XML (structure, parsed back), guest JUnit merged per run, hostile guest
files refused, JSON, the summary table; collecting files without following links."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmrun.project import RunResult, RunUnit
from vmrun.project.report import (
    MAX_DEPTH,
    MAX_GUEST_XML,
    GuestJUnitError,
    json_report,
    junit_xml,
    parse_guest_junit,
    summary,
)
from vmrun.project.runner import collect, private_copy

GUEST = b"""<?xml version="1.0" encoding="UTF-8"?>
<testsuites><testsuite name="pytest" tests="3">
  <testcase classname="tests.test_math" name="test_add" time="0.01"/>
  <testcase classname="tests.test_math" name="test_div" time="0.02">
    <failure message="ZeroDivisionError: division by zero">Traceback...</failure>
    <system-out>printed</system-out>
  </testcase>
  <testcase classname="tests.test_math" name="test_later" time="0"><skipped/></testcase>
</testsuite></testsuites>
"""


def unit(root: Path, profile: str, arch: str, junit: tuple[str, ...] = ()) -> RunUnit:
    return RunUnit(id=f"{profile}/{arch}", profile=profile, arch=arch, shard=1, shards=1,
                   root=str(root), results=f".vmrun/results/{profile}/{arch}",
                   argv=("vmrun",), run_argv=("run", "--", "true"), collect=junit,
                   junit=junit)


def guest_file(u: RunUnit, name: str, data: bytes) -> None:
    path = Path(u.root) / u.results / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def check_junit_structure(root: ET.Element) -> None:
    """What Jenkins', GitLab's and GitHub's readers need: testsuites > testsuite >
    testcase, counts that add up, names and times on every case."""
    assert root.tag == "testsuites"
    for suite in root:
        assert suite.tag == "testsuite" and suite.get("name")
        cases = suite.findall("testcase")
        assert int(suite.get("tests", "-1")) == len(cases)
        for kind in ("failure", "error", "skipped"):
            counted = sum(case.find(kind) is not None for case in cases)
            assert int(suite.get(kind + "s" if kind != "skipped" else kind, "-1")) == counted
        for case in cases:
            assert case.get("name") and case.get("classname") is not None
            float(case.get("time", "x"))
            assert set(child.tag for child in case) <= {"failure", "error", "skipped",
                                                         "system-out", "system-err",
                                                         "properties"}
    assert int(root.get("tests", "-1")) == sum(int(s.get("tests", "0")) for s in root)


def test_junit_has_a_case_per_run_and_the_guests_cases_per_arch(tmp_path: Path) -> None:
    units = [unit(tmp_path, "py", "x86_64", ("report.xml",)),
             unit(tmp_path, "py", "s390x", ("report.xml",)),
             unit(tmp_path, "sh", "x86_64")]
    for u in units[:2]:
        guest_file(u, "report.xml", GUEST)
    results = [RunResult("py/x86_64", 1, 12.5, "out\x1b[31m red\x00", "Traceback tail"),
               RunResult("py/s390x", 0, 30.0, node="node2", attempts=2),
               RunResult("sh/x86_64", 122, 99.0, "", "vmrun: error: no boot")]
    root = ET.fromstring(junit_xml(units, results))
    check_junit_structure(root)
    runs = root.find("testsuite[@name='vmrun']")
    assert runs is not None
    cases = {case.get("name"): case for case in runs.findall("testcase")}
    assert list(cases) == ["py/x86_64", "py/s390x", "sh/x86_64"]
    failure = cases["py/x86_64"].find("failure")
    assert failure is not None and "exit code 1 on x86_64" in failure.get("message", "")
    assert cases["py/x86_64"].findtext("system-out") == "out red\ufffd"  # no escapes, no NUL
    assert cases["sh/x86_64"].find("error") is not None  # vmrun's own failure: an error
    assert cases["py/s390x"].find("failure") is None
    assert cases["py/s390x"].get("time") == "30.000"
    assert {p.get("name"): p.get("value") for p in cases["py/s390x"].iter("property")} == {
        "vmrun.node": "node2", "vmrun.attempts": "2"}  # where it ran, after how many tries
    s390x = root.find("testsuite[@name='py/s390x']")
    assert s390x is not None
    names = [case.get("name") for case in s390x.findall("testcase")]
    assert names == ["test_add [py/s390x]", "test_div [py/s390x]", "test_later [py/s390x]"]
    div = s390x.findall("testcase")[1]
    assert div.get("classname") == "py.s390x.tests.test_math"
    assert div.find("failure") is not None
    assert div.find("failure").get("message") == "ZeroDivisionError: division by zero"  # type: ignore[union-attr]
    assert div.findtext("system-out") == "printed"
    assert s390x.findall("testcase")[2].find("skipped") is not None
    assert root.find("testsuite[@name='sh/x86_64']") is None  # collects no JUnit
    # the same test on two architectures stays two tests
    every = [(c.get("classname"), c.get("name")) for c in root.iter("testcase")]
    assert len(every) == len(set(every)) == 3 + 6


def test_a_missing_or_hostile_guest_file_becomes_an_error_case(tmp_path: Path) -> None:
    u = unit(tmp_path, "py", "x86_64", ("report.xml", "other.xml"))
    guest_file(u, "report.xml", b"<html>not junit</html>")
    root = ET.fromstring(junit_xml([u], [RunResult(u.id, 0, 1.0)]))
    check_junit_structure(root)
    suite = root.find("testsuite[@name='py/x86_64']")
    assert suite is not None
    messages = [str(case.find("error").get("message")) for case in suite]  # type: ignore[union-attr]
    assert "report.xml: the root element is <html>" in messages[0]
    assert "other.xml: was not collected" in messages[1]


def test_a_guest_symlink_is_not_read(tmp_path: Path) -> None:
    u = unit(tmp_path, "py", "x86_64", ("report.xml",))
    secret = tmp_path / "secret.xml"
    secret.write_bytes(GUEST)
    (Path(u.root) / u.results).mkdir(parents=True)
    (Path(u.root) / u.results / "report.xml").symlink_to(secret)
    root = ET.fromstring(junit_xml([u], [RunResult(u.id, 0, 1.0)]))
    assert "test_add" not in ET.tostring(root).decode()


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;">]>
<testsuite><testcase name="&lol2;"/></testsuite>"""
EXTERNAL = b"""<?xml version="1.0"?>
<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>
<testsuite><testcase name="&e;"/></testsuite>"""


@pytest.mark.parametrize(("data", "words"), [
    (BOMB, "DTD"),
    (EXTERNAL, "DTD"),
    (BOMB.decode().encode("utf-16"), "DTD"),
    (b"<testsuite>" + b"<a>" * (MAX_DEPTH + 5) + b"</a>" * (MAX_DEPTH + 5) + b"</testsuite>",
     "nested deeper"),
    (b"<testsuite>" + b" " * MAX_GUEST_XML + b"</testsuite>", "larger than"),
    (b"<testsuite><testcase name='a'>", "not valid XML"),
    (b"", "not valid XML"),
    (b"\xff\xfe\x00garbage", "not valid XML"),
    (b"<junk/>", "root element is <junk>"),
])
def test_hostile_guest_junit_is_refused(data: bytes, words: str) -> None:
    with pytest.raises(GuestJUnitError, match=words):
        parse_guest_junit(data)


def test_guest_junit_odd_values_are_tamed() -> None:
    cases = parse_guest_junit(b"<testsuite><testcase name='a' time='nan'/>"
                              b"<testcase time='-3'/><testcase name='b' time='inf'>"
                              b"<error message='m'>body</error></testcase></testsuite>")
    assert [(c.name, c.time, c.outcome) for c in cases] == [
        ("a", 0.0, "passed"), ("?", 0.0, "passed"), ("b", 0.0, "error")]


def test_json_report_holds_the_same(tmp_path: Path) -> None:
    u = unit(tmp_path, "py", "aarch64", ("report.xml",))
    guest_file(u, "report.xml", GUEST)
    result = RunResult(u.id, 1, 2.0, node="node3", attempts=2)
    report = json.loads(json.dumps(json_report([u], [result], 1)))
    assert report["exit_code"] == 1
    run = report["runs"][0]
    assert (run["id"], run["arch"], run["outcome"], run["exit_code"]) == (
        "py/aarch64", "aarch64", "failure", 1)
    assert (run["node"], run["attempts"]) == ("node3", 2)
    cases = run["junit"][0]["cases"]
    assert [c["outcome"] for c in cases] == ["passed", "failure", "skipped"]


def test_summary_has_a_row_per_run(tmp_path: Path) -> None:
    u = unit(tmp_path, "py", "aarch64", ("report.xml",))
    guest_file(u, "report.xml", GUEST)
    table = summary([u], [RunResult(u.id, 1, 2.0, timings={"boot": 1.5, "command": 0.25})])
    header, row = table.splitlines()
    assert header.split() == ["run", "exit", "start", "command", "total", "tests"]
    assert row.split() == ["py/aarch64", "1", "1.50s", "0.25s", "2.00s", "2/3", "passed"]


def test_a_cluster_summary_names_each_run_s_node_and_attempts(tmp_path: Path) -> None:
    u = unit(tmp_path, "sh", "s390x")
    table = summary([u], [RunResult(u.id, 0, 2.0, node="node2", attempts=2)],
                    placement=True)
    header, row = table.splitlines()
    assert header.split()[-2:] == ["node", "attempts"]
    assert row.split() == ["sh/s390x", "0", "-", "-", "2.00s", "-", "node2", "2"]


def test_collect_copies_matches_and_never_follows_links(tmp_path: Path) -> None:
    work, results = tmp_path / "work", tmp_path / "results"
    (work / "out" / "deep").mkdir(parents=True)
    (work / "out" / "a.xml").write_text("a")
    (work / "out" / "deep" / "b.txt").write_text("b")
    (tmp_path / "host-secret").write_text("secret")
    (work / "out" / "leak.xml").symlink_to(tmp_path / "host-secret")
    (work / "linked").symlink_to(tmp_path)
    os.mkfifo(work / "out" / "fifo.xml")
    done = collect(work, results, ["out/*.xml", "out/deep", "linked/host-secret",
                                   "missing.xml"])
    assert sorted(p.relative_to(results).as_posix() for p in done.files) == [
        "out/a.xml", "out/deep/b.txt"]
    assert not (results / "out" / "leak.xml").exists()
    assert done.skipped == ["out/leak.xml: a symbolic link",
                            "linked/host-secret: a symbolic link"]


def test_collect_stops_at_its_limits(tmp_path: Path) -> None:
    work, results = tmp_path / "work", tmp_path / "results"
    work.mkdir()
    with (work / "sparse.bin").open("wb") as file:
        file.truncate(1 << 40)  # a terabyte of nothing: refused by its apparent size
    for i in range(5):
        (work / f"f{i}.txt").write_text("x")
    done = collect(work, results, ["*.bin", "*.txt"], most_files=3, most_bytes=1 << 20)
    assert [p.name for p in done.files] == ["f0.txt", "f1.txt", "f2.txt"]
    assert len(done.skipped) == 3 and "sparse.bin: over the limit" in done.skipped[0]
    assert not (results / "sparse.bin").exists()


def test_private_copy_leaves_the_project_alone_and_goes_away(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x").write_text("x")
    (tmp_path / ".vmrun" / "results").mkdir(parents=True)
    with private_copy(tmp_path) as work:
        assert (work / "src" / "x").read_text() == "x"
        assert not (work / ".vmrun").exists()
        (work / "src" / "x").write_text("changed")
        (work / "new").write_text("n")
    assert (tmp_path / "src" / "x").read_text() == "x" and not (tmp_path / "new").exists()
    assert not work.exists() and os.listdir(tmp_path / ".vmrun" / "work") == []


def test_private_copy_of_a_git_work_tree_holds_what_git_shows(tmp_path: Path) -> None:
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / ".gitignore").write_text(".venv/\n*.o\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tracked.c").write_text("t")
    (tmp_path / "src" / "tracked.o").write_text("o")
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "big").write_text("v")
    (tmp_path / "gone").write_text("g")
    (tmp_path / "link").symlink_to("src/tracked.c")
    git("add", "src/tracked.c", ".gitignore", "gone", "link")
    (tmp_path / "gone").unlink()
    (tmp_path / "new.txt").write_text("n")  # untracked, not ignored
    with private_copy(tmp_path) as work:
        files = sorted(p.relative_to(work).as_posix() for p in work.rglob("*")
                       if not p.is_dir() or p.is_symlink())
        assert files == [".gitignore", "link", "new.txt", "src/tracked.c"]
        assert (work / "link").is_symlink()
    with private_copy(tmp_path, "all") as work:
        assert (work / ".venv" / "lib" / "big").exists() and (work / "src/tracked.o").exists()
