"""The pytest plugin with real VMs, through pytester: scopes, vm_factory, short reports of
a VM that misbehaves, and --vmrun-profile running tests inside the guest."""

from __future__ import annotations

import os
from xml.etree import ElementTree

import pytest

from tests.integration.vmtools import qemu_children
from tests.unit.test_pytest_plugin import plugin_args, run_subprocess

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.vm


def test_module_scope_boots_once_per_module_and_arch(pytester: pytest.Pytester) -> None:
    """Two tests of a module share one machine (what the first leaves in the guest the
    second finds), on x86_64 and on aarch64; each is powered off when its module ends."""
    shared = """
        import os
        import pytest
        from tests.integration.vmtools import qemu_children

        pytestmark = pytest.mark.vmrun(arch="{arch}", scope="module", share="none")

        def test_first(vm):
            assert len(qemu_children(os.getpid())) == 1  # the other module's is gone
            assert vm.sh("uname -m").stdout == b"{arch}\\n"
            assert vm.sh("echo here > /tmp/mark").exit_code == 0

        def test_second(vm):
            assert vm.sh("cat /tmp/mark").stdout == b"here\\n"
    """
    pytester.makepyfile(test_1_x86=shared.format(arch="x86_64"),
                        test_2_arm=shared.format(arch="aarch64"))
    result = pytester.runpytest_inprocess(*plugin_args(), "-v")
    result.assert_outcomes(passed=4)
    assert qemu_children(os.getpid()) == []


def test_vm_factory_boots_separate_machines(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os
        from tests.integration.vmtools import qemu_children

        def test_two(vm_factory):
            first = vm_factory(share="none")
            second = vm_factory(share="none", memory="512M")
            assert first is not second
            assert len(qemu_children(os.getpid())) == 2
            assert first.sh("echo one > /tmp/who").exit_code == 0
            assert second.sh("cat /tmp/who").exit_code != 0  # another guest
            assert second.sh("grep MemTotal /proc/meminfo").exit_code == 0

        def test_after():
            assert qemu_children(os.getpid()) == []
    """)
    pytester.runpytest_inprocess(*plugin_args()).assert_outcomes(passed=2)


def test_misbehaving_vm_gives_short_reports_with_the_console(
        pytester: pytest.Pytester) -> None:
    """A guest that panics at boot is a setup error; a failing guest command is a failure
    with the console's tail beside it; a guest that crashes during a test is a failure of
    a few lines: vmrun's error and the console, never a traceback of vmrun's code."""
    pytester.makepyfile("""
        import pytest

        @pytest.mark.vmrun(append="rdinit=/nonexistent", share="none", boot_timeout=120)
        def test_no_boot(vm):
            pass

        @pytest.mark.vmrun(share="none", scope="module")
        def test_command_fails(vm):
            assert vm.sh("echo guest-was-here > /dev/console; exit 3").exit_code == 0

        @pytest.mark.vmrun(share="none", scope="module")
        def test_guest_crashes(vm):
            vm.sh("echo c > /proc/sysrq-trigger")
    """)
    result = pytester.runpytest_inprocess(*plugin_args())
    result.assert_outcomes(errors=1, failed=2)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*ERROR at setup of test_no_boot*",
        "vmrun: GuestPanic: the guest kernel panicked",
        "guest console (last lines):",
        "*Kernel panic - not syncing*",
    ])
    result.stdout.fnmatch_lines([
        "*_ test_command_fails _*",
        "*assert 3 == 0*",
        "*Captured vmrun console x86_64 call*",
        "guest-was-here*",
    ])
    result.stdout.fnmatch_lines([
        "*_ test_guest_crashes _*",
        "vmrun: GuestPanic: the guest kernel panicked",
        "guest console (last lines):",
        "*sysrq*",
    ])
    assert "Traceback" not in out
    assert out.count("Captured vmrun console") == 1  # not again beside the crash's report
    assert "machine.py" not in out  # no frame of vmrun's code
    assert qemu_children(os.getpid()) == []


PROJECT = """
[profile.inguest]
packages = ["python3", "python3-pytest"]
command = ["python3", "-m", "pytest"]
timeout = 600

[profile.bare]
command = ["sh", "-c", "true"]
"""

GUEST_SUITE = """
    import platform
    import pytest

    def test_pass():
        assert open("/proc/1/comm").read()  # any Linux; the guest's

    def test_fail():
        assert platform.python_version() == "0.0", "in the guest"

    @pytest.mark.skip(reason="skipped in the guest")
    def test_skip():
        pass

    def test_not_selected():
        pass
"""


def test_vmrun_profile_runs_tests_in_the_guest(pytester: pytest.Pytester) -> None:
    """--vmrun-profile: the selected tests run in the profile's VM (Debian's python3 and
    pytest, from packages) and the host's session reports each under its own name."""
    pytest.importorskip("vmrun.project")  # the project files' reader (issue 15)
    (pytester.path / "vmrun.toml").write_text(PROJECT)
    pytester.makepyfile(test_inside=GUEST_SUITE)
    result = run_subprocess(pytester, *plugin_args(), "--vmrun-profile", "inguest", "-rA",
                            "-k", "not not_selected", "-p", "no:cacheprovider",
                            "--junitxml=report.xml")
    result.assert_outcomes(passed=1, failed=1, skipped=1, deselected=1)
    result.stdout.fnmatch_lines_random([
        "PASSED test_inside.py::test_pass",
        "FAILED test_inside.py::test_fail - AssertionError: in the guest*",
        "SKIPPED * test_inside.py:*: skipped in the guest",
    ])
    result.stdout.fnmatch_lines(["*running 3 tests in profile inguest (x86_64)*"])
    assert result.ret == 1
    assert "test_not_selected" not in result.stdout.str()
    cases = {case.get("name"): [child.tag for child in case] for case in
             ElementTree.parse(pytester.path / "report.xml").getroot().iter("testcase")}
    assert cases == {"test_pass": [], "test_fail": ["failure"], "test_skip": ["skipped"]}
    # -x: the guest stops at the first failure, and the host says so, as pytest does.
    stopped = run_subprocess(pytester, *plugin_args(), "--vmrun-profile", "inguest", "-x",
                             "-p", "no:cacheprovider")
    stopped.assert_outcomes(passed=1, failed=1)
    stopped.stdout.fnmatch_lines(["*stopping after 1 failures*"])


def test_vmrun_profile_without_pytest_in_the_guest(pytester: pytest.Pytester) -> None:
    """A guest without python3 fails each selected test with why, and a hint."""
    pytest.importorskip("vmrun.project")
    (pytester.path / "vmrun.toml").write_text(PROJECT)
    pytester.makepyfile(test_inside=GUEST_SUITE)
    result = run_subprocess(pytester, *plugin_args(), "--vmrun-profile", "bare",
                            "-k", "pass or fail", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=2, deselected=2)
    result.stdout.fnmatch_lines([
        "*ERROR at setup of test_pass*",
        "vmrun: the test did not report from the guest (pytest exited with status 127)",
        "guest pytest output (last lines):",
        "*python3: not found",
        "hint: the guest needs python3 and pytest*",
    ])
