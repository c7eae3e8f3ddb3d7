"""The pytest plugin without VMs: inert when unused, the entry point, the marker, the
reports, and the guest reporter run by the host's own pytest."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from vmrun.errors import GuestPanic, UsageError
from vmrun.spec import Net, Share
from vmrun.testing import guest_reporter
from vmrun.testing.pytest_plugin import short_report, wanted_from
from vmrun.testing.remote import GUEST_MODULE, files_of

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def plugin_args() -> list[str]:
    """-p for the plugin, unless installed (then pytest loads it from its entry point)."""
    installed = metadata.entry_points(group="pytest11", name="vmrun")
    return [] if installed else ["-p", "pytest_vmrun"]


PLAIN_SUITE = """
    import sys
    import pytest

    @pytest.fixture
    def number():
        return 3

    def test_pass(number):
        assert number == 3

    def test_fail():
        assert 1 == 2

    @pytest.mark.skip(reason="no")
    def test_skip():
        pass

    @pytest.mark.parametrize("x", [1, 2])
    def test_param(x):
        assert x

    def test_nothing_of_vmrun_imported():
        assert not [m for m in sys.modules if m == "vmrun" or m.startswith("vmrun.")]
"""


def run_subprocess(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """pytest in a process of its own, importing vmrun (and the plugin) from this tree."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(SRC))
        return pytester.runpytest_subprocess(*args)


def test_plugin_is_inert_when_unused(pytester: pytest.Pytester) -> None:
    """Loaded, the plugin imports nothing of vmrun and changes no outcome of a suite that
    uses none of it; its option and marker are there."""
    pytester.makepyfile(PLAIN_SUITE)
    without = run_subprocess(pytester, "-p", "no:vmrun", "-rA")
    with_plugin = run_subprocess(pytester, *plugin_args(), "-rA")
    for result in (without, with_plugin):
        result.assert_outcomes(passed=4, failed=1, skipped=1)
    outcomes = [line for line in with_plugin.outlines if line.startswith(("PASSED", "FAILED",
                                                                          "SKIPPED"))]
    assert outcomes == [line for line in without.outlines
                        if line.startswith(("PASSED", "FAILED", "SKIPPED"))]
    assert run_subprocess(pytester, *plugin_args(), "--markers").stdout.str().count(
        "@pytest.mark.vmrun(") == 1
    assert "--vmrun-profile" in run_subprocess(pytester, *plugin_args(), "--help").stdout.str()


def test_entry_point_loads_the_plugin(pytester: pytest.Pytester, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """pyproject.toml's pytest11 entry point, installed, makes pytest load the plugin."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())
    points = table["project"]["entry-points"]["pytest11"]
    assert points == {"vmrun": "pytest_vmrun"}
    dist = tmp_path / "site" / "vmrun_probe-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vmrun-probe\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[pytest11]\n" + "".join(f"{k} = {v}\n" for k, v in points.items()))
    pytester.makepyfile("""
        def test_loaded(request):
            assert request.config.pluginmanager.get_plugin("vmrun").__name__ == "pytest_vmrun"
            assert request.config.getoption("vmrun_profile") is None
    """)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'site'}:{SRC}")
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_marker_values_become_a_spec(tmp_path: Path) -> None:
    wanted = wanted_from({"arch": "arm64", "memory": "2G", "cpus": 2, "scope": "module",
                          "packages": "python3, python3-pytest", "net": False,
                          "share": "ro", "image": "docker://alpine", "boot_timeout": 30},
                         tmp_path)
    spec = wanted.spec
    assert wanted.scope == "module"
    assert (spec.arch, spec.memory_mib, spec.cpus, spec.net, spec.share) == (
        "aarch64", 2048, 2, Net.NONE, Share.RO)
    assert spec.packages == ("python3", "python3-pytest")
    assert spec.share_dir == tmp_path and spec.boot_timeout == 30
    assert wanted_from({}, tmp_path).scope == "function"
    assert wanted_from({"share": tmp_path / "x"}, tmp_path).spec.share_dir == tmp_path / "x"
    # The same keywords make equal specs: that is what module and session scopes share by.
    assert wanted_from({"arch": "aarch64"}, tmp_path) == wanted_from({"arch": "arm64"},
                                                                     tmp_path)


@pytest.mark.parametrize(("values", "message"), [
    ({"bogus": 1}, "unknown key 'bogus'"),
    ({"scope": "forever"}, "scope='forever'"),
    ({"arch": "vax"}, "unknown architecture 'vax'"),
    ({"memory": "lots"}, "bad memory size"),
    ({"cpus": "2"}, "cpus= takes a number"),
    ({"net": "wifi"}, "net='wifi'"),
    ({"packages": [1]}, "packages= takes a list"),
])
def test_marker_errors(tmp_path: Path, values: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        wanted_from(values, tmp_path)


def test_bad_marker_fails_setup_in_one_line(pytester: pytest.Pytester) -> None:
    """A marker vmrun cannot use is a setup error with vmrun's line, no traceback and no
    VM booted."""
    pytester.makepyfile("""
        import pytest

        @pytest.mark.vmrun(arch="vax")
        def test_a(vm):
            pass

        def test_b(vm_factory):
            vm_factory(bogus=True)
    """)
    result = pytester.runpytest_inprocess(*plugin_args())
    result.assert_outcomes(errors=1, failed=1)
    result.stdout.fnmatch_lines([
        "*vmrun: UsageError: unknown architecture 'vax'",
        "*vmrun: UsageError: @pytest.mark.vmrun: unknown key 'bogus'",
    ])
    assert "Traceback" not in result.stdout.str()
    assert "def test_a" not in result.stdout.str()


def test_short_report_has_the_error_line_and_the_console_tail() -> None:
    panic = GuestPanic("the guest kernel panicked",
                       serial_tail="[ 1.0] Kernel panic - not syncing: VFS\n[ 1.1] Call Trace:")
    assert short_report(panic, None).splitlines() == [
        "vmrun: GuestPanic: the guest kernel panicked",
        "guest console (last lines):",
        "[ 1.0] Kernel panic - not syncing: VFS",
        "[ 1.1] Call Trace:",
    ]


def test_files_of_keeps_order_and_drops_repeats() -> None:
    class Item:
        def __init__(self, nodeid: str) -> None:
            self.nodeid = nodeid

    items = [Item("b.py::t1"), Item("a.py::C::t[x]"), Item("b.py::t2")]
    assert files_of(items) == ["b.py", "a.py"]  # type: ignore[arg-type]


def test_guest_reporter_runs_the_selected_tests_in_order(tmp_path: Path) -> None:
    """The reporter (the guest's side, run here by the host's pytest) runs exactly the
    node ids it is given, in their order, and writes one JSON report per phase."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_a.py").write_text(textwrap.dedent("""
        import pytest

        def test_pass():
            pass

        def test_fail():
            assert 1 == 2, "boom"

        def test_other():
            pass

        @pytest.mark.skip(reason="not today")
        def test_skip():
            pass
    """))
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / f"{GUEST_MODULE}.py").write_text(Path(guest_reporter.__file__).read_text())
    wanted = ["test_a.py::test_skip", "test_a.py::test_fail", "test_a.py::test_pass"]
    (reports / guest_reporter.SELECTED).write_text("".join(f"{n}\n" for n in wanted))
    subprocess.run([sys.executable, "-m", "pytest", "-p", GUEST_MODULE,
                    f"--vmrun-report={reports}", "-p", "no:cacheprovider",
                    f"--rootdir={project}", "-p", "no:vmrun", "test_a.py"],
                   cwd=project, env={"PYTHONPATH": str(reports), "PATH": "/usr/bin:/bin"},
                   capture_output=True, timeout=120)
    lines = [json.loads(line) for line in
             (reports / guest_reporter.REPORTS).read_text().splitlines()]
    seen = [(line["report"]["nodeid"], line["report"]["when"], line["report"]["outcome"])
            for line in lines]
    assert seen == [
        ("test_a.py::test_skip", "setup", "skipped"),
        ("test_a.py::test_skip", "teardown", "passed"),
        ("test_a.py::test_fail", "setup", "passed"),
        ("test_a.py::test_fail", "call", "failed"),
        ("test_a.py::test_fail", "teardown", "passed"),
        ("test_a.py::test_pass", "setup", "passed"),
        ("test_a.py::test_pass", "call", "passed"),
        ("test_a.py::test_pass", "teardown", "passed"),
    ]
    assert "boom" in lines[3]["text"]


def test_unknown_profile_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytest.importorskip("vmrun.project")
    (pytester.path / "vmrun.toml").write_text('[profile.unit]\ncommand = ["true"]\n')
    pytester.makepyfile("def test_a(): pass")
    result = run_subprocess(pytester, *plugin_args(), "--vmrun-profile", "nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: --vmrun-profile: no profile 'nope' in the project (profiles: unit)"])


def test_scopes_end_with_their_nodes(pytester: pytest.Pytester) -> None:
    """A shared machine's owner, whose teardown powers it off: the test, its class, its
    module, its package, the session; the next wider node where there is no such one."""
    pytester.makeconftest("""
        import pytest
        from vmrun.testing.pytest_plugin import SCOPES, scope_owner

        @pytest.fixture
        def owners(request):
            return [scope_owner(request.node, scope).nodeid for scope in SCOPES]
    """)
    pytester.mkpydir("pkg")
    pytester.path.joinpath("pkg", "test_scopes.py").write_text(textwrap.dedent("""
        class TestC:
            def test_in_class(self, owners):
                assert owners == ["pkg/test_scopes.py::TestC::test_in_class",
                                  "pkg/test_scopes.py::TestC", "pkg/test_scopes.py",
                                  "pkg", ""]

        def test_plain(owners):
            assert owners[1:3] == ["pkg/test_scopes.py", "pkg/test_scopes.py"]
    """))
    pytester.path.joinpath("test_top.py").write_text(textwrap.dedent("""
        def test_top(owners):
            assert owners[2:] == ["test_top.py", "", ""]
    """))
    pytester.runpytest_inprocess(*plugin_args()).assert_outcomes(passed=3)
