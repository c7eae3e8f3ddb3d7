"""pytest --vmrun-profile NAME: the selected tests run by pytest in the profile's VM, each
guest report turned into the host session's report of the same test as it arrives."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import pytest

from vmrun.errors import UsageError, VmrunError
from vmrun.machine import Machine, Result
from vmrun.qemu.arch import host_arch, lookup_arch
from vmrun.spec import Command, MachineSpec, Share, Volume
from vmrun.testing import guest_reporter
from vmrun.testing.pytest_plugin import short_report

GUEST_MODULE = "vmrun_guest_reporter"  # the reporter's name in the guest
POLL_S = 0.2  # how often the host looks for new reports while the guest runs
OUTPUT_LINES = 15  # of the guest pytest's output, when tests did not report


@dataclass(frozen=True)
class GuestRun:
    """Where and how the guest runs pytest: the profile's machine, interpreter, env."""

    profile: str
    spec: MachineSpec
    python: str = "python3"
    env: tuple[tuple[str, str], ...] = ()
    timeout: float | None = None


def guest_run(config: pytest.Config, name: str, arch: str | None) -> GuestRun:
    """Profile NAME of the project pytest runs in (found from its rootdir upwards)."""
    # vmrun.project (the project file's reader) is imported by name until it is merged.
    try:
        projects = importlib.import_module("vmrun.project")
    except ImportError:
        raise UsageError("this vmrun has no project files (vmrun.project)") from None
    project = projects.load(config.rootpath)
    profile = project.profiles.get(name)
    if profile is None:
        known = ", ".join(project.profiles) or "none"
        raise UsageError(f"no profile {name!r} in the project", hint=f"profiles: {known}")
    if getattr(profile, "bake", None) is not None:
        raise UsageError(f"profile {name!r} bakes its image: run it with `vmrun test` "
                         "once, then name the baked image in a profile without bake")
    arches = tuple(profile.arch) or (lookup_arch(host_arch()).name,)
    chosen = lookup_arch(arch).name if arch else arches[0]
    spec = profile.machine_spec(chosen)
    # The guest sees the project at the same path, so node ids and file names match.
    share = Share.RO if spec.share == Share.NONE else spec.share
    spec = replace(spec, share=share, share_dir=config.rootpath)
    command = tuple(profile.command)
    python = command[0] if command and "python" in os.path.basename(command[0]) \
        else "python3"
    return GuestRun(name, spec, python, tuple(profile.env), profile.timeout)


def guest_command(run: GuestRun, config: pytest.Config, reports: Path,
                  paths: list[str]) -> Command:
    """pytest in the guest over the files of the selected tests, with the reporter."""
    argv = [run.python, "-m", "pytest", "-p", GUEST_MODULE, f"--vmrun-report={reports}",
            "-p", "no:cacheprovider", f"--rootdir={config.rootpath}"]
    if config.inipath is not None:
        argv.append(f"--config-file={config.inipath}")
    if config.option.maxfail:
        argv.append(f"--maxfail={config.option.maxfail}")
    if config.option.runxfail:
        argv.append("--runxfail")
    env = dict(run.env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(reports), env.get("PYTHONPATH")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # leave the project's tree as it was
    return Command(tuple(argv + paths), env=tuple(env.items()), cwd=str(config.rootpath),
                   timeout=run.timeout)



@contextlib.contextmanager
def reports_dir(nodeids: list[str]) -> Iterator[Path]:
    """A directory the guest shares: the reporter, the node ids to run, their reports."""
    path = Path(tempfile.mkdtemp(prefix="vmrun-pytest-"))
    try:
        shutil.copyfile(guest_reporter.__file__, path / f"{GUEST_MODULE}.py")
        (path / guest_reporter.SELECTED).write_text("".join(f"{n}\n" for n in nodeids))
        (path / guest_reporter.REPORTS).touch()
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def files_of(items: list[pytest.Item]) -> list[str]:
    """The files of ITEMS' node ids, in order, each once: what the guest collects."""
    return list(dict.fromkeys(item.nodeid.split("::")[0] for item in items))


class Relay:
    """The guest's reports, replayed in the host's session under the same node ids."""

    def __init__(self, session: pytest.Session) -> None:
        self.session = session
        self.items = {item.nodeid: item for item in session.items}
        self.started: set[str] = set()
        self.finished: set[str] = set()
        self.collect_errors: list[str] = []
        self.read = 0

    def poll(self, path: Path) -> None:
        """Replay the complete lines the guest has added to PATH since the last poll."""
        with open(path, "rb") as source:
            source.seek(self.read)
            data = source.read()
        end = data.rfind(b"\n") + 1
        self.read += end
        for line in data[:end].splitlines():
            self.feed(json.loads(line))

    def feed(self, line: dict[str, Any]) -> None:
        if "collect_error" in line:
            self.collect_errors.append(f"{line['collect_error']}: {line['text']}")
            return
        self.report(self._report(line))

    def _report(self, line: dict[str, Any]) -> pytest.TestReport:
        config = self.session.config
        data = line["report"]
        try:
            report = config.hook.pytest_report_from_serializable(config=config, data=data)
        except Exception:  # another pytest's format: keep the outcome and the text
            report = pytest.TestReport(
                nodeid=data["nodeid"], location=tuple(data["location"]),
                keywords=dict(data.get("keywords", {})), outcome=data["outcome"],
                longrepr=line.get("text") or None, when=data["when"],
                sections=[tuple(s) for s in data.get("sections", [])],
                duration=float(data.get("duration", 0.0)))
        assert isinstance(report, pytest.TestReport)
        if isinstance(report.longrepr, list):  # a skip's (path, line, reason), via JSON
            path, line_number, reason = report.longrepr
            report.longrepr = (path, line_number, reason)
        item = self.items.get(report.nodeid)
        if item is not None:
            report.location = item.location
        return report

    def report(self, report: pytest.TestReport) -> None:
        item = self.items.get(report.nodeid)
        hook = item.ihook if item is not None else self.session.ihook
        location = report.location
        if report.nodeid not in self.started:
            self.started.add(report.nodeid)
            hook.pytest_runtest_logstart(nodeid=report.nodeid, location=location)
        hook.pytest_runtest_logreport(report=report)
        if report.when == "teardown":
            self.finished.add(report.nodeid)
            hook.pytest_runtest_logfinish(nodeid=report.nodeid, location=location)

    def fail_missing(self, why: str) -> None:
        """An error for each selected test the guest did not finish, saying WHY; after
        --maxfail stopped the run, only for the test it stopped in."""
        for nodeid, item in self.items.items():
            if nodeid in self.finished:
                continue
            if self.session.shouldfail and nodeid not in self.started:
                continue
            when: Literal["setup", "teardown"] = \
                "teardown" if nodeid in self.started else "setup"
            self.report(pytest.TestReport(
                nodeid=nodeid, location=item.location, keywords={}, outcome="failed",
                longrepr=why, when=when))


def missing_reason(result: Result | None, error: VmrunError | None,
                   machine: Machine | None, relay: Relay) -> str:
    if error is not None:
        return short_report(error, machine)
    assert result is not None
    lines = [f"vmrun: the test did not report from the guest (pytest exited with status "
             f"{result.exit_code})"]
    lines += relay.collect_errors
    output = (result.stdout or b"") + (result.stderr or b"")
    tail = output.decode(errors="replace").strip().splitlines()[-OUTPUT_LINES:]
    if tail:
        lines += ["guest pytest output (last lines):", *tail]
    if result.exit_code in (126, 127) or "No module named pytest" in "\n".join(tail):
        lines.append('hint: the guest needs python3 and pytest: an image with them, or '
                     'packages = ["python3", "python3-pytest"] in the profile')
    return "\n".join(lines)


class GuestPytest:
    """One VM running pytest, in a thread, so the host can replay reports as they come."""

    def __init__(self, run: GuestRun, command: Command, reports: Path,
                 notice: Callable[[str], None]) -> None:
        self.run = run
        self.command = command
        self.reports = reports
        self.notice = notice
        self.machine: Machine | None = None
        self.future: Future[Result] = Future()
        self.thread = threading.Thread(target=self._main, name="vmrun-guest", daemon=True)

    def _main(self) -> None:
        try:
            volume = Volume(self.reports, str(self.reports))
            spec = replace(self.run.spec, volumes=(*self.run.spec.volumes, volume))
            self.machine = Machine(spec, notice=self.notice)
            with self.machine as vm:
                self.future.set_result(vm.run(self.command, capture=True))
        except BaseException as exc:  # handed to the host's thread
            self.future.set_exception(exc)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Interrupted: end the VM, which ends the thread's run."""
        machine = self.machine
        if machine is not None and machine.qemu is not None:
            machine.qemu.process.kill()
        self.thread.join(timeout=30)


class RemoteRun:
    """The plugin --vmrun-profile registers: it runs the collected tests in the guest."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        try:
            self.guest = guest_run(config, config.getoption("vmrun_profile"),
                                   config.getoption("vmrun_arch"))
        except VmrunError as exc:
            hint = f" ({exc.hint})" if exc.hint else ""
            raise pytest.UsageError(f"--vmrun-profile: {exc}{hint}") from None

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        if session.testsfailed and not session.config.option.continue_on_collection_errors:
            raise session.Interrupted(f"{session.testsfailed} error(s) during collection")
        if session.config.option.collectonly or not session.items:
            return True
        terminal = session.config.pluginmanager.get_plugin("terminalreporter")
        notes: queue.Queue[str] = queue.Queue()

        def show_notes() -> None:
            while not notes.empty():
                message = notes.get()
                if terminal is not None:
                    terminal.write_line(f"vmrun: {message}")

        spec = self.guest.spec
        notes.put(f"running {len(session.items)} tests in profile {self.guest.profile} "
                  f"({spec.arch})")
        relay = Relay(session)
        with reports_dir([item.nodeid for item in session.items]) as reports:
            command = guest_command(self.guest, session.config, reports,
                                    files_of(session.items))
            guest = GuestPytest(self.guest, command, reports, notes.put)
            guest.start()
            try:
                while not guest.future.done():
                    show_notes()
                    relay.poll(reports / guest_reporter.REPORTS)
                    time.sleep(POLL_S)
            except BaseException:
                guest.stop()
                raise
            show_notes()
            relay.poll(reports / guest_reporter.REPORTS)
        result, error = None, None
        try:
            result = guest.future.result()
        except VmrunError as exc:
            error = exc
        relay.fail_missing(missing_reason(result, error, guest.machine, relay))
        if session.shouldfail:
            raise session.Failed(session.shouldfail)
        return True
