"""The pytest plugin's machines: specs from @pytest.mark.vmrun, sharing by scope, short reports."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmrun.errors import UsageError, VmrunError
from vmrun.machine import Machine, Result
from vmrun.qemu.arch import lookup_arch
from vmrun.spec import Accel, Boot, Command, MachineSpec, Net, Share, Volume, parse_memory

MARKER = "vmrun"
SCOPES = ("function", "class", "module", "package", "session")
CONSOLE_LINES = 25  # of the guest's console, in a failure's report
PLUGIN_NAME = "vmrun-machines"


class VM(Machine):
    """The vm fixture's machine: a vmrun.Machine, booted, plus a shell shortcut."""

    def sh(self, script: str, *, timeout: float | None = None,
           env: Mapping[str, str] | None = None) -> Result:
        """Run SCRIPT with the guest's sh, capturing its output (Result.stdout, .stderr)."""
        command = Command(("sh", "-c", script), env=tuple((env or {}).items()),
                          timeout=timeout)
        return self.run(command, capture=True)


# ---- the marker -------------------------------------------------------------------------

def _text(key: str) -> Callable[[Any], dict[str, Any]]:
    def convert(value: Any) -> dict[str, Any]:
        if not isinstance(value, str):
            raise UsageError(f"{key}= takes a string, not {value!r}")
        return {key: value}
    return convert


def _arch(value: Any) -> dict[str, Any]:
    return {"arch": lookup_arch(_text("arch")(value)["arch"]).name}


def _choice(key: str, kind: type[Accel] | type[Boot]) -> Callable[[Any], dict[str, Any]]:
    def convert(value: Any) -> dict[str, Any]:
        try:
            return {key: kind(value)}
        except ValueError:
            known = ", ".join(kind)
            raise UsageError(f"{key}={value!r}: not one of {known}") from None
    return convert


def _memory(value: Any) -> dict[str, Any]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {"memory_mib": value}
    if isinstance(value, str):
        return {"memory_mib": parse_memory(value)}
    raise UsageError(f"memory= takes MiB or a size like '2G', not {value!r}")


def _packages(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = [word.strip() for word in value.split(",") if word.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(p, str) for p in value):
        raise UsageError(f"packages= takes a list of package names, not {value!r}")
    return {"packages": tuple(value)}


def _net(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"net": Net.USER if value else Net.NONE}
    try:
        return {"net": Net(value)}
    except ValueError:
        raise UsageError(f"net={value!r}: not one of user, none, True, False") from None


def _share(value: Any) -> dict[str, Any]:
    """rw, ro or none share the project (pytest's rootdir); a Path shares that directory."""
    if isinstance(value, Path):
        return {"share": Share.RW, "share_dir": value}
    try:
        return {"share": Share(value)}
    except ValueError:
        raise UsageError(f"share={value!r}: not one of rw, ro, none or a Path") from None


def _number(key: str, kind: type | tuple[type, ...]) -> Callable[[Any], dict[str, Any]]:
    def convert(value: Any) -> dict[str, Any]:
        if isinstance(value, bool) or not isinstance(value, kind):
            raise UsageError(f"{key}= takes a number, not {value!r}")
        return {key: value}
    return convert


def _flag(key: str) -> Callable[[Any], dict[str, Any]]:
    def convert(value: Any) -> dict[str, Any]:
        if not isinstance(value, bool):
            raise UsageError(f"{key}= takes True or False, not {value!r}")
        return {key: value}
    return convert


def _volumes(value: Any) -> dict[str, Any]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, Volume) for v in value):
        raise UsageError("volumes= takes a list of vmrun.Volume")
    return {"volumes": tuple(value)}


# The marker's keys, each turned into MachineSpec fields (scope is the fixture's own).
KEYS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "arch": _arch, "image": _text("image"), "cpus": _number("cpus", int),
    "memory": _memory, "packages": _packages, "suite": _text("suite"), "net": _net,
    "share": _share, "boot": _choice("boot", Boot), "accel": _choice("accel", Accel),
    "boot_timeout": _number("boot_timeout", (int, float)), "append": _text("append"),
    "cold": _flag("cold"), "volumes": _volumes,
}


@dataclass(frozen=True)
class Wanted:
    """What a test asks for: a machine of SPEC, shared within SCOPE."""

    spec: MachineSpec
    scope: str = "function"


def wanted_from(values: Mapping[str, Any], rootpath: Path) -> Wanted:
    """The machine the marker's VALUES describe; the project (ROOTPATH) is shared."""
    fields: dict[str, Any] = {"share_dir": rootpath}
    scope = "function"
    for key, value in values.items():
        if key == "scope":
            if value not in SCOPES:
                raise UsageError(f"scope={value!r}: not one of {', '.join(SCOPES)}")
            scope = value
        elif key in KEYS:
            fields.update(KEYS[key](value))
        else:
            raise UsageError(f"@pytest.mark.vmrun: unknown key {key!r}",
                             hint="known: scope, " + ", ".join(KEYS))
    return Wanted(MachineSpec(**fields), scope)


def marker_values(item: pytest.Item) -> dict[str, Any]:
    """The closest @pytest.mark.vmrun's keywords ({} without one)."""
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return {}
    if marker.args:
        raise UsageError("@pytest.mark.vmrun takes keywords only",
                         hint='like @pytest.mark.vmrun(arch="s390x", scope="module")')
    return dict(marker.kwargs)


# ---- short reports ----------------------------------------------------------------------

def console_tail(machine: Machine | None, lines: int = CONSOLE_LINES) -> str:
    if machine is None or machine.serial is None:
        return ""
    return machine.serial.tail_text(lines)


def short_report(exc: VmrunError, machine: Machine | None) -> str:
    """The vmrun error line, its hint, and the guest's console tail: no traceback."""
    out = [f"vmrun: {type(exc).__name__}: {exc}"]
    if exc.hint:
        out.append(f"hint: {exc.hint}")
    tail = getattr(exc, "serial_tail", "") or console_tail(machine)
    if tail and tail not in (exc.hint or ""):
        out += ["guest console (last lines):", tail]
    log = getattr(exc, "log_tail", "")
    if log:
        out += ["QEMU log (last lines):", log]
    return "\n".join(out)


@dataclass
class Booted:
    """A started machine, or the short report of why it did not start."""

    machine: VM | None
    failure: str = ""

    def get(self) -> VM:
        if self.machine is None:
            pytest.fail(self.failure, pytrace=False)
        return self.machine

    def close(self) -> None:
        if self.machine is not None:
            self.machine.close()


def boot(spec: MachineSpec) -> Booted:
    machine = VM(spec)
    try:
        machine.__enter__()
    except VmrunError as exc:
        return Booted(None, short_report(exc, machine))
    return Booted(machine)


USED = pytest.StashKey[list[VM]]()


class Machines:
    """The session's shared machines, and the console tails of failed tests' machines.

    Registered on first use of a fixture, so that sessions without VMs never see it."""

    def __init__(self) -> None:
        self.pool: dict[tuple[str, str, MachineSpec], Booted] = {}

    def shared(self, item: pytest.Item, wanted: Wanted) -> VM:
        owner = scope_owner(item, wanted.scope)
        key = (wanted.scope, owner.nodeid, wanted.spec)
        if key not in self.pool:
            self.pool[key] = boot(wanted.spec)
            owner.addfinalizer(lambda: self.pool.pop(key).close())
        return self.pool[key].get()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item,
                                  call: pytest.CallInfo[None]
                                  ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        machines = item.stash.get(USED, [])
        excinfo = call.excinfo
        failed = excinfo is not None and not excinfo.errisinstance(
            (pytest.skip.Exception, pytest.xfail.Exception))
        error = excinfo.value if failed and excinfo is not None else None
        # A vmrun error replaces the traceback by its line and the console of the machine
        # that failed; the other machines' consoles go in sections, as with any failure.
        broken = None
        if isinstance(error, VmrunError):
            broken = next((m for m in machines if m.failed), machines[0] if machines else None)
        if failed:
            for index, machine in enumerate(machines):
                tail = console_tail(machine)
                if tail and machine is not broken:
                    label = f"vmrun console {machine.arch.name}"
                    item.add_report_section(call.when, label if index == 0
                                            else f"{label} #{index + 1}", tail)
        report = yield
        if isinstance(error, VmrunError):
            report.longrepr = short_report(error, broken)
        return report


def machines_plugin(config: pytest.Config) -> Machines:
    plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
    if plugin is None:
        plugin = Machines()
        config.pluginmanager.register(plugin, PLUGIN_NAME)
    assert isinstance(plugin, Machines)
    return plugin


def scope_owner(item: pytest.Item, scope: str) -> pytest.Item | pytest.Collector:
    """The node whose teardown ends a machine of SCOPE (the next wider one where the test
    has no such parent: a class scope for a function outside a class is its module's)."""
    kinds: dict[str, type[pytest.Collector]] = {
        "class": pytest.Class, "module": pytest.Module, "package": pytest.Package}
    if scope == "function":
        return item
    for wider in SCOPES[SCOPES.index(scope):]:
        if wider == "session":
            break
        node = item.getparent(kinds[wider])
        if node is not None:
            return node
    return item.session


def _wanted(request: pytest.FixtureRequest, overrides: Mapping[str, Any]) -> Wanted:
    try:
        values = {**marker_values(request.node), **overrides}
        return wanted_from(values, request.config.rootpath)
    except VmrunError as exc:
        pytest.fail(short_report(exc, None), pytrace=False)


def _used(item: pytest.Item) -> list[VM]:
    if USED not in item.stash:
        item.stash[USED] = []
    return item.stash[USED]


def machine_for(request: pytest.FixtureRequest) -> VM:
    """The vm fixture: the marker's machine, booted now or shared within its scope."""
    item = request.node
    assert isinstance(item, pytest.Item)
    machines = machines_plugin(request.config)
    wanted = _wanted(request, {})
    if wanted.scope == "function":
        booted = boot(wanted.spec)
        request.addfinalizer(booted.close)
        machine = booted.get()
    else:
        machine = machines.shared(item, wanted)
    _used(item).append(machine)
    return machine


class Factory:
    """vm_factory: boots a machine per call, each powered off when the test ends."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.request = request
        self.stack = contextlib.ExitStack()
        machines_plugin(request.config)

    def __call__(self, **overrides: Any) -> VM:
        if "scope" in overrides:
            raise pytest.UsageError("vm_factory's machines live as long as the test: "
                                    "no scope=")
        wanted = _wanted(self.request, {**overrides, "scope": "function"})
        booted = boot(wanted.spec)
        self.stack.callback(booted.close)
        machine = booted.get()
        item = self.request.node
        assert isinstance(item, pytest.Item)
        _used(item).append(machine)
        return machine

    def close(self) -> None:
        self.stack.close()
