"""`vmrun test` on a small real project: two profiles, x86_64 and aarch64, two shards, a
failing command, a JUnit file written in the guest merged into the report (4 boots); and
SIGTERM in the middle of a run (1 boot)."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.integration.vmtools import run_cli, vmrun_argv, vmrun_env

pytestmark = pytest.mark.vm

PROJECT = """\
[profile.unit]
command = ["sh", "check.sh"]
arch = ["x86_64", "aarch64"]
timeout = 300
env = { GREETING = "hello" }
collect = ["report.xml"]
junit = ["report.xml"]

[profile.split]
extends = "unit"
arch = ["x86_64"]
shards = 2
command = ["sh", "-c", '''mkdir -p out; echo $VMRUN_SHARD/$VMRUN_SHARDS > out/shard.txt
             echo $GREETING from shard $VMRUN_SHARD with $0''']
collect = ["out/*.txt"]
junit = []
"""

# Runs in the guest (the default busybox guest): a JUnit file whose test_arch fails on
# aarch64 only, as does the command.
CHECK = """\
arch=$(uname -m)
verdict=''
code=0
if [ "$arch" = aarch64 ]; then
    verdict='<failure message="test_arch broke on aarch64">expected 1, got 2</failure>'
    code=1
fi
{
    printf '<?xml version="1.0"?>\\n<testsuite name="guest" tests="2">'
    printf '<testcase classname="guest.checks" name="test_ok" time="0.5"/>'
    printf '<testcase classname="guest.checks" name="test_arch" time="0.1">%s</testcase>' \\
        "$verdict"
    printf '</testsuite>\\n'
} > report.xml
echo "$GREETING from $arch with $*"
exit $code
"""


def test_vmrun_test_runs_profiles_arches_and_shards(tmp_path: Path) -> None:
    (tmp_path / "vmrun.toml").write_text(textwrap.dedent(PROJECT))
    (tmp_path / "check.sh").write_text(CHECK)
    done = run_cli("test", "--jobs", "2", "--junit", "report-all.xml", "--json",
                   "report-all.json", "--", "extra", cwd=tmp_path, timeout=1200)
    out, err = done.stdout.decode(), done.stderr.decode()
    # unit/aarch64 fails (exit 1), the first failure in profile order
    assert done.returncode == 1, err
    ids = ["unit/x86_64", "unit/aarch64", "split/x86_64/1", "split/x86_64/2"]
    width = max(map(len, ids))
    assert f"[{'unit/x86_64':<{width}}] hello from x86_64 with extra" in out
    assert f"[{'unit/aarch64':<{width}}] hello from aarch64 with extra" in out
    assert f"[{'split/x86_64/2':<{width}}] hello from shard 2 with extra" in out
    rows = {line.split()[0]: line.split() for line in err.splitlines()
            if re.match(r"(unit|split)/\S+ +\d+ ", line)}
    assert list(rows) == ids, err
    assert [rows[i][1] for i in ids] == ["0", "1", "0", "0"]
    assert rows["unit/aarch64"][-2:] == ["1/2", "passed"]

    # each run's files in its own directory; the project itself untouched
    results = tmp_path / ".vmrun" / "results"
    assert (results / "split/x86_64/1/out/shard.txt").read_text() == "1/2\n"
    assert (results / "split/x86_64/2/out/shard.txt").read_text() == "2/2\n"
    assert "test_arch broke" in (results / "unit/aarch64/report.xml").read_text()
    assert "failure" not in (results / "unit/x86_64/report.xml").read_text()
    assert not (tmp_path / "report.xml").exists() and not (tmp_path / "out").exists()
    assert list((tmp_path / ".vmrun" / "work").iterdir()) == []

    root = ET.parse(tmp_path / "report-all.xml").getroot()
    runs = root.find("testsuite[@name='vmrun']")
    assert runs is not None
    assert [case.get("name") for case in runs] == ids
    assert runs.get("tests") == "4" and runs.get("failures") == "1"
    assert runs[1].find("failure") is not None
    guest = root.find("testsuite[@name='unit/aarch64']")
    assert guest is not None and guest.get("failures") == "1"
    failed = guest.find("testcase[@name='test_arch [unit/aarch64]']")
    assert failed is not None and failed.get("classname") == "unit.aarch64.guest.checks"
    assert failed.find("failure").get("message") == "test_arch broke on aarch64"  # type: ignore[union-attr]
    passed = root.find("testsuite[@name='unit/x86_64']/testcase[@name='test_arch "
                       "[unit/x86_64]']")
    assert passed is not None and passed.find("failure") is None

    report = json.loads((tmp_path / "report-all.json").read_text())
    assert report["exit_code"] == 1
    assert [run["outcome"] for run in report["runs"]] == ["passed", "failure", "passed",
                                                          "passed"]
    assert report["runs"][0]["timings"]  # the guest's phases came back


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if entry.name.isdigit() and text in cmdline:
            found.append(cmdline)
    return found


def test_sigterm_ends_every_run_and_leaves_nothing_behind(tmp_path: Path) -> None:
    (tmp_path / "vmrun.toml").write_text(
        '[profile.slow]\ncommand = ["sh", "-c", "echo started; sleep 600"]\n')
    process = subprocess.Popen(vmrun_argv("test"), cwd=tmp_path, env=vmrun_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    seen, deadline = b"", time.monotonic() + 300
    while b"started" not in seen and time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 5)[0]:
            seen += os.read(process.stdout.fileno(), 4096)
    assert b"[slow/" in seen and b"started" in seen
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 143, err.decode()
    assert processes_mentioning(str(tmp_path)) == []
    assert list((tmp_path / ".vmrun" / "work").iterdir()) == []
