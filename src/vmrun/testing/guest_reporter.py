"""Loaded by pytest in the guest (-p vmrun_guest_reporter): each report as a JSON line.

Standalone on purpose (pytest and the standard library only): the guest has no vmrun.
With --vmrun-report=DIR it runs only the tests DIR/selected names (one node id a line),
in that order, and appends a line per report to DIR/reports.jsonl as it comes.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any

import pytest

SELECTED = "selected"
REPORTS = "reports.jsonl"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--vmrun-report", metavar="DIR", default=None,
                     help="vmrun: the tests to run, and where their reports go")


def pytest_configure(config: pytest.Config) -> None:
    directory = config.getoption("vmrun_report")
    if directory:
        config.pluginmanager.register(Reporter(config, directory), "vmrun-guest-reporter")


class Reporter:
    """Selects the host's tests and writes their reports for the host's session."""

    def __init__(self, config: pytest.Config, directory: str) -> None:
        self.config = config
        with open(os.path.join(directory, SELECTED), encoding="utf-8") as names:
            self.order = {line.rstrip("\n"): at for at, line in enumerate(names) if line.strip()}
        self.out: IO[str] = open(os.path.join(directory, REPORTS), "a", encoding="utf-8")

    def pytest_collection_modifyitems(self, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        chosen = sorted((item for item in items if item.nodeid in self.order),
                        key=lambda item: self.order[item.nodeid])
        others = [item for item in items if item.nodeid not in self.order]
        if others:
            config.hook.pytest_deselected(items=others)
        items[:] = chosen

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._write({"collect_error": report.nodeid, "text": str(report.longrepr)})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config,
                                                              report=report)
        self._write({"report": data, "text": report.longreprtext})

    def pytest_unconfigure(self) -> None:
        self.out.close()

    def _write(self, line: dict[str, Any]) -> None:
        self.out.write(json.dumps(line, default=str) + "\n")
        self.out.flush()
