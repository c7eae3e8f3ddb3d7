"""Reports of a project run: JUnit XML for CI test views, JSON, and the summary table."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.parsers import expat

from vmrun.cluster import RunResult
from vmrun.matrix import placement_cells, table, timing_cells
from vmrun.project.plan import RunUnit

MAX_GUEST_XML = 16 << 20  # bytes of one guest JUnit file
MAX_DEPTH = 64  # nesting of its elements
MAX_CASES = 100_000  # test cases from one file
MAX_TEXT = 64 * 1024  # characters of a message, output or failure text kept
VMRUN_CODES = range(117, 126)  # vmrun's own failures (vmrun.errors): an <error>, not a failure

# XML 1.0 cannot hold most control characters, nor lone surrogates
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class GuestJUnitError(Exception):
    """A collected JUnit file that cannot be read safely; its message says why."""


@dataclass(frozen=True)
class Case:
    """One test case from a guest's JUnit file."""

    name: str
    classname: str
    time: float
    outcome: str  # passed, failure, error, skipped
    message: str = ""
    text: str = ""  # the failure's or error's body
    stdout: str = ""
    stderr: str = ""


def clean(text: str, limit: int = MAX_TEXT) -> str:
    """TEXT without terminal escapes and characters XML cannot hold, its tail at most LIMIT."""
    text = _NOT_XML.sub("\ufffd", _ANSI.sub("", text))
    return text if len(text) <= limit else "...\n" + text[-limit:]


# ---- reading guest JUnit files defensively ------------------------------------------------

def _vet(data: bytes) -> None:
    """Refuse DATA before ElementTree reads it: too big, a DTD or entity declaration (as
    defusedxml's forbid_dtd: expansion bombs and external entities live there, in any
    encoding), nesting too deep (checked while expat streams, so it stops early)."""
    if len(data) > MAX_GUEST_XML:
        raise GuestJUnitError(f"larger than {MAX_GUEST_XML >> 20} MiB")
    parser = expat.ParserCreate()
    depth = 0

    def start(name: str, attributes: dict[str, str]) -> None:
        nonlocal depth
        depth += 1
        if depth > MAX_DEPTH:
            raise GuestJUnitError(f"nested deeper than {MAX_DEPTH} elements")

    def end(name: str) -> None:
        nonlocal depth
        depth -= 1

    def refuse(*_: object) -> None:
        raise GuestJUnitError("has a DTD or entity declaration, which is refused")

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise GuestJUnitError(f"not valid XML: {exc}") from None


def parse_guest_junit(data: bytes) -> list[Case]:
    """The test cases of a JUnit XML document DATA; GuestJUnitError when it is too big,
    too deep, holds a DTD, or is not XML with <testsuites> or <testsuite> at its root."""
    _vet(data)
    root = ET.fromstring(data)
    if root.tag not in ("testsuites", "testsuite"):
        raise GuestJUnitError(f"the root element is <{clean(str(root.tag), 40)}>, not "
                              "<testsuites> or <testsuite>")
    cases: list[Case] = []
    for element in root.iter("testcase"):
        if len(cases) >= MAX_CASES:
            raise GuestJUnitError(f"more than {MAX_CASES} test cases")
        cases.append(_case(element))
    return cases


def _seconds(text: str | None) -> float:
    try:
        value = float(text or 0)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) and value >= 0 else 0.0


def _case(element: ET.Element) -> Case:
    outcome, message, body = "passed", "", ""
    for kind in ("failure", "error", "skipped"):
        found = element.find(kind)
        if found is not None:
            outcome, message, body = kind, found.get("message", ""), found.text or ""
            break
    out, err = element.find("system-out"), element.find("system-err")
    return Case(name=clean(element.get("name", "?"), 1000),
                classname=clean(element.get("classname", ""), 1000),
                time=_seconds(element.get("time")), outcome=outcome,
                message=clean(message, 4000), text=clean(body),
                stdout=clean(out.text or "") if out is not None else "",
                stderr=clean(err.text or "") if err is not None else "")


@dataclass(frozen=True)
class GuestReport:
    """The test cases of one collected JUnit file of one run (or why it could not be read)."""

    file: str  # relative to the run's results directory
    cases: tuple[Case, ...] = ()
    problem: str = ""


def guest_reports(unit: RunUnit) -> list[GuestReport]:
    """UNIT's collected JUnit files, read (a missing or bad file is a report's problem)."""
    results = Path(unit.root) / unit.results
    reports = []
    for relative in unit.junit:
        path = results / relative
        try:
            if path.is_symlink() or not path.is_file():
                raise GuestJUnitError("was not collected (the command did not write it?)")
            with path.open("rb") as file:
                data = file.read(MAX_GUEST_XML + 1)
            reports.append(GuestReport(relative, tuple(parse_guest_junit(data))))
        except (GuestJUnitError, OSError) as exc:
            reports.append(GuestReport(relative, problem=str(exc)))
    return reports


# ---- writing --------------------------------------------------------------------------

def outcome(result: RunResult) -> str:
    if result.exit_code == 0:
        return "passed"
    return "error" if result.exit_code in VMRUN_CODES else "failure"


def _sub(parent: ET.Element, tag: str, text: str = "", **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, tag, {k: clean(v, 4000) for k, v in attributes.items()})
    if text:
        element.text = clean(text)
    return element


def _suite(parent: ET.Element, name: str, cases: Sequence[tuple[ET.Element, str, float]],
           hostname: str, timestamp: str) -> None:
    counts = [outcome for _, outcome, _ in cases]
    suite = _sub(parent, "testsuite", name=name, tests=str(len(cases)),
                 failures=str(counts.count("failure")), errors=str(counts.count("error")),
                 skipped=str(counts.count("skipped")),
                 time=f"{sum(t for _, _, t in cases):.3f}", timestamp=timestamp,
                 hostname=hostname or "localhost")
    suite.extend(case for case, _, _ in cases)


def _run_case(unit: RunUnit, result: RunResult) -> tuple[ET.Element, str, float]:
    case = ET.Element("testcase", {"classname": f"vmrun.{unit.profile}",
                                   "name": unit.id, "time": f"{result.seconds:.3f}"})
    properties = _sub(case, "properties")  # where it ran: the node, and after how many tries
    _sub(properties, "property", name="vmrun.node", value=result.node or "-")
    _sub(properties, "property", name="vmrun.attempts", value=str(result.attempts))
    kind = outcome(result)
    if kind != "passed":
        what = "vmrun failed" if kind == "error" else "the command failed"
        _sub(case, kind, (result.stderr_tail or result.stdout_tail)[-4000:],
             message=f"{what}: exit code {result.exit_code} on {unit.arch}",
             type=f"exit {result.exit_code}")
    if result.stdout_tail:
        _sub(case, "system-out", result.stdout_tail)
    if result.stderr_tail:
        _sub(case, "system-err", result.stderr_tail)
    return case, kind, result.seconds


def _guest_case(unit: RunUnit, case: Case) -> tuple[ET.Element, str, float]:
    """CASE renamed so that the same test on two architectures stays two tests."""
    where = unit.id.replace("/", ".")
    element = ET.Element("testcase", {
        "classname": clean(f"{where}.{case.classname}" if case.classname else where, 1000),
        "name": clean(f"{case.name} [{unit.id}]", 1000), "time": f"{case.time:.3f}"})
    if case.outcome != "passed":
        attributes = {"message": case.message} if case.message else {}
        _sub(element, case.outcome, case.text, **attributes)
    if case.stdout:
        _sub(element, "system-out", case.stdout)
    if case.stderr:
        _sub(element, "system-err", case.stderr)
    return element, case.outcome, case.time


def _problem_case(unit: RunUnit, report: GuestReport) -> tuple[ET.Element, str, float]:
    element = ET.Element("testcase", {"classname": unit.id.replace("/", "."),
                                      "name": f"{report.file} [{unit.id}]", "time": "0"})
    _sub(element, "error", message=f"guest JUnit file {report.file}: {report.problem}",
         type="junit")
    return element, "error", 0.0


def pairs(units: Sequence[RunUnit], results: Sequence[RunResult]
          ) -> Iterator[tuple[RunUnit, RunResult]]:
    by_id = {result.id: result for result in results}
    return ((unit, by_id[unit.id]) for unit in units if unit.id in by_id)


def junit_xml(units: Sequence[RunUnit], results: Sequence[RunResult]) -> bytes:
    """The JUnit XML of a project run: a suite "vmrun" with one case per run, then a suite
    per run holding the test cases of the JUnit files it collected."""
    timestamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    root = ET.Element("testsuites", {"name": "vmrun test"})
    done = list(pairs(units, results))
    node = next((result.node for _, result in done if result.node), "")
    _suite(root, "vmrun", [_run_case(u, r) for u, r in done], node, timestamp)
    for unit, result in done:
        cases = []
        for report in guest_reports(unit):
            cases += [_guest_case(unit, case) for case in report.cases]
            if report.problem:
                cases.append(_problem_case(unit, report))
        if unit.junit:
            _suite(root, unit.id, cases, result.node, timestamp)
    suites = root.findall("testsuite")
    for total in ("tests", "failures", "errors", "skipped"):
        root.set(total, str(sum(int(s.get(total, "0")) for s in suites)))
    root.set("time", f"{sum(r.seconds for _, r in done):.3f}")
    ET.indent(root)
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


def json_report(units: Sequence[RunUnit], results: Sequence[RunResult], exit_code: int
                ) -> dict[str, Any]:
    """The same as junit_xml, as JSON: every run with its unit, result and guest tests."""
    runs = []
    for unit, result in pairs(units, results):
        tests = [{"file": report.file, "problem": report.problem,
                  "cases": [case.__dict__ for case in report.cases]}
                 for report in guest_reports(unit)]
        runs.append({**unit.as_json(), **result.as_json(), "outcome": outcome(result),
                     "junit": tests})
    return {"exit_code": exit_code, "runs": runs}


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def summary(units: Sequence[RunUnit], results: Sequence[RunResult], *,
            placement: bool = False) -> str:
    """The table closing a project run: one row per run; PLACEMENT adds the node that ran
    each and its attempts (as a matrix run's table on a cluster)."""
    rows = [("run", "exit", "start", "command", "total", "tests",
             *(("node", "attempts") if placement else ()))]
    for unit, result in pairs(units, results):
        rows.append((unit.id, str(result.exit_code), *timing_cells(result.timings),
                     f"{result.seconds:.2f}s", _tests_cell(unit),
                     *(placement_cells(result) if placement else ())))
    return table(rows)


def _tests_cell(unit: RunUnit) -> str:
    if not unit.junit:
        return "-"
    cases = [case for report in guest_reports(unit) for case in report.cases]
    failed = sum(case.outcome in ("failure", "error") for case in cases)
    return f"{len(cases) - failed}/{len(cases)} passed"
