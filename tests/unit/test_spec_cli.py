from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vmrun.cli.common
import vmrun.cli.run
from vmrun.errors import UsageError
from vmrun.machine import Result
from vmrun.spec import Accel, Command, MachineSpec, Net, Share, parse_env, parse_memory

# --- parse_memory --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("512M", 512), ("512m", 512), ("512MB", 512), ("512MiB", 512), ("512mib", 512),
        ("2G", 2048), ("2g", 2048), ("2GB", 2048), ("2GiB", 2048), ("1024", 1024),
        (" 256M ", 256), ("0", 0), ("16G", 16384),
    ],
)
def test_parse_memory(text: str, mib: int) -> None:
    assert parse_memory(text) == mib


@pytest.mark.parametrize(
    "text",
    ["", " ", "M", "G", "1.5G", "-1G", "+1G", "1T", "1K", "1KB", "abc", "12 M", "G1", "1GG",
     "1bm", "0x10M", "1_000", "1e3", "512M2"],
)
def test_parse_memory_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="bad memory size") as info:
        parse_memory(text)
    assert info.value.hint is not None


def test_parse_memory_rejects_superscript_digits() -> None:
    with pytest.raises(UsageError):
        parse_memory("²G")


# --- parse_env -----------------------------------------------------------------------


def test_parse_env() -> None:
    host = {"HOME": "/home/me", "EMPTY": ""}
    assert parse_env(["A=1", "B=x=y", "C=", "HOME", "EMPTY", "UNSET", "D= sp "], host) == (
        ("A", "1"), ("B", "x=y"), ("C", ""), ("HOME", "/home/me"), ("EMPTY", ""), ("D", " sp "),
    )


def test_parse_env_keeps_order_and_repeats() -> None:
    assert parse_env(["A=1", "A=2"], {}) == (("A", "1"), ("A", "2"))


def test_parse_env_empty() -> None:
    assert parse_env([], {"A": "1"}) == ()


@pytest.mark.parametrize("item", ["=V", "=", ""])
def test_parse_env_rejects_empty_name(item: str) -> None:
    with pytest.raises(UsageError, match="bad --env") as info:
        parse_env([item], {"": "x"})
    assert info.value.hint is not None


# --- Command -------------------------------------------------------------------------


def test_command_defaults() -> None:
    command = Command(("true",))
    assert command.env == () and command.cwd is None and command.timeout is None
    assert not command.tty and command.input is None and not command.stdin_stream


def test_empty_command_is_left_to_the_image_default() -> None:
    # An empty argv means an OCI image's Entrypoint and Cmd; without an image the command
    # line refuses it before anything boots (see the "no command given" cases below).
    assert Command(()).argv == ()


@pytest.mark.parametrize(
    "changes",
    [
        {"argv": ("echo", "a\0b")},
        {"argv": ("\0",)},
        {"env": (("A\0", "1"),)},
        {"env": (("A", "1\0"),)},
        {"cwd": "/tmp\0/x"},
    ],
)
def test_command_rejects_nul(changes: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match="NUL"):
        Command(**{"argv": ("true",), **changes})


@pytest.mark.parametrize("name", ["", "A=B", "="])
def test_command_rejects_bad_env_name(name: str) -> None:
    with pytest.raises(UsageError, match="environment variable name"):
        Command(("true",), env=((name, "v"),))


@pytest.mark.parametrize("timeout", [0, -1, -0.5])
def test_command_rejects_non_positive_timeout(timeout: float) -> None:
    with pytest.raises(UsageError, match="--timeout"):
        Command(("true",), timeout=timeout)


def test_command_accepts_valid_values() -> None:
    command = Command(("sh", "-c", "echo $A", ""), env=(("A", "x y"), ("B", "")), cwd="/w",
                      timeout=0.1, input=b"\0binary\0")
    assert command.argv[-1] == ""
    with pytest.raises(AttributeError):
        command.timeout = 5  # type: ignore[misc]


# --- MachineSpec ---------------------------------------------------------------------


def test_machine_spec_defaults() -> None:
    spec = MachineSpec()
    assert (spec.arch, spec.cpus, spec.memory_mib) == (None, 1, 1024)
    assert (spec.share, spec.net, spec.accel) == (Share.RW, Net.USER, Accel.AUTO)


@pytest.mark.parametrize("cpus", [1, 2, 64])
def test_machine_spec_cpus_ok(cpus: int) -> None:
    assert MachineSpec(cpus=cpus).cpus == cpus


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"cpus": 0}, "--cpus"), ({"cpus": -1}, "--cpus"), ({"cpus": 65}, "--cpus"),
        ({"memory_mib": 127}, "--memory"), ({"memory_mib": 0}, "--memory"),
        ({"boot_timeout": 0}, "--boot-timeout"), ({"boot_timeout": -3.0}, "--boot-timeout"),
    ],
)
def test_machine_spec_rejects(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        MachineSpec(**changes)


def test_machine_spec_minimum_memory() -> None:
    assert MachineSpec(memory_mib=128, share_dir=Path("/x")).memory_mib == 128


# --- the command line ----------------------------------------------------------------


class FakeMachine:
    """Stands in for vmrun.machine.Machine: records what the CLI asked for, boots nothing."""

    instances: list[FakeMachine] = []
    exit_code = 0

    def __init__(self, spec: MachineSpec, *args: Any, **kwargs: Any) -> None:
        self.spec = spec
        self.args = args
        self.kwargs = kwargs
        self.commands: list[Command] = []
        self.timings: dict[str, float] = {"boot": 0.25}
        FakeMachine.instances.append(self)

    def __enter__(self) -> FakeMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run(self, command: Command) -> Result:
        self.commands.append(command)
        return Result(exit_code=self.exit_code)


class NoMachine:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("the CLI must not boot a machine here")


@pytest.fixture(autouse=True)
def cli_sandbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # main() installs a SIGTERM handler; the test run must get the old one back.
    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(vmrun.cli.run, "Machine", NoMachine)
    FakeMachine.instances = []
    yield
    signal.signal(signal.SIGTERM, previous)


def run_main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, list[str]]:
    code = vmrun.cli.main(argv)
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err.splitlines()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus", "--", "true"], "unrecognized arguments: --bogus"),
        (["--cpus", "x", "--", "true"], "--cpus takes a whole number, not 'x'"),
        (["--share", "maybe", "--", "true"], "argument --share: invalid choice"),
        (["--accel", "xen", "--", "true"], "argument --accel: invalid choice"),
        (["--net", "bridge", "--", "true"], "argument --net/--network: invalid choice"),
        (["--share-via", "nfs", "--", "true"], "argument --share-via: invalid choice"),
        (["--timeout", "soon", "--", "true"], "--timeout takes a number of seconds, not 'soon'"),
        (["uname", "-r"], "unknown command 'uname'"),
        (["--memory"], "argument -m/--memory: expected one argument"),
        (["--memory", "lots", "--", "true"], "bad memory size 'lots'"),
        (["--env", "=V", "--", "true"], "bad --env '=V'"),
        ([], "no command given"),
        (["--"], "no command given"),
        (["run", "--"], "no command given"),
        (["info", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_cli_usage_errors_with_hint(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, lines = run_main(capsys, argv)
    assert code == 125
    assert len(lines) == 2, lines
    assert lines[0].startswith("vmrun: error: ")
    assert message in lines[0]
    assert lines[1].startswith("hint: ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cpus", "0", "--", "true"], "--cpus must be between 1 and 64, not 0"),
        (["--cpus", "65", "--", "true"], "--cpus must be between 1 and 64, not 65"),
        (["--memory", "64M", "--", "true"], "--memory must be at least 128M, not 64M"),
        (["--boot-timeout", "0", "--", "true"],
         "--boot-timeout must be a number of seconds above 0 and at most 31536000, not 0.0"),
        (["--timeout", "-1", "--", "true"],
         "--timeout must be a number of seconds above 0 and at most 31536000, not -1.0"),
    ],
)
def test_cli_bad_values_fail_before_booting(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, lines = run_main(capsys, argv)
    assert code == 125
    assert lines[0] == f"vmrun: error: {message}"
    assert all(line.startswith("hint: ") for line in lines[1:])
    assert len(lines) <= 2


def test_cli_cpus_zero_returns_125_without_booting(capsys: pytest.CaptureFixture[str]) -> None:
    assert vmrun.cli.main(["--cpus", "0", "--", "true"]) == 125
    assert "vmrun: error: --cpus" in capsys.readouterr().err


def test_cli_help_lists_reserved_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        vmrun.cli.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: vmrun")
    for code in (*range(118, 126), 130, 143):
        assert f"  {code}  " in text or f" {code} terminated" in text, code
    for option in ("--cpus", "--memory", "--timeout", "--boot-timeout", "--accel", "--share"):
        assert option in text


def test_cli_passes_command_and_spec_to_machine(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vmrun.cli.run, "Machine", FakeMachine)
    monkeypatch.setattr(FakeMachine, "exit_code", 42)
    monkeypatch.setenv("VMRUN_TEST_PASS", "from host")
    monkeypatch.delenv("VMRUN_TEST_UNSET", raising=False)
    code = vmrun.cli.main([
        "run", "--cpus", "3", "--memory", "2G", "--accel", "tcg", "--share", "ro",
        "--net", "none", "--timeout", "9", "-e", "A=1", "--env", "VMRUN_TEST_PASS",
        "-e", "VMRUN_TEST_UNSET", "--", "sh", "-c", "exit 42", "--cpus", "--",
    ])
    assert code == 42  # the guest's exit status passes through
    [machine] = FakeMachine.instances
    assert machine.spec == MachineSpec(cpus=3, memory_mib=2048, accel=Accel.TCG,
                                       share=Share.RO, net=Net.NONE)
    assert machine.kwargs["share_via"] == "auto"
    [command] = machine.commands
    assert command.argv == ("sh", "-c", "exit 42", "--cpus", "--")
    assert command.env == (("A", "1"), ("VMRUN_TEST_PASS", "from host"))
    assert command.timeout == 9.0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv", [["run", "--", "uname", "-r"], ["--", "uname", "-r"],
                                  ["--verbose", "--", "uname", "-r"],
                                  ["run", "--verbose", "--", "uname", "-r"]])
def test_cli_documented_command_forms(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    # README: `vmrun [OPTIONS] -- CMD` and `vmrun run [OPTIONS] -- CMD`; without "--" a
    # first word must be a subcommand (see test_bad_inputs).
    monkeypatch.setattr(vmrun.cli.run, "Machine", FakeMachine)
    monkeypatch.setattr(vmrun.cli.run, "notice_stderr", lambda message: None)
    assert vmrun.cli.main(argv) == 0
    assert FakeMachine.instances[0].commands[0].argv == ("uname", "-r")


# --- --boot full and bake ---------------------------------------------------------------


def test_cli_full_boot_gets_the_rules_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    import vmrun.fullboot

    monkeypatch.setattr(vmrun.fullboot, "FullMachine", FakeMachine)
    code = vmrun.cli.main(["--image", "img", "--boot", "full", "--include", "src/***",
                           "--sync", "- *.pyc", "--exclude", "*", "--collect", "out/*",
                           "--firmware", "uefi", "--", "make", "check"])
    assert code == 0
    [machine] = FakeMachine.instances
    assert machine.spec.boot == "full" and machine.spec.image == "img"
    options = machine.args[0] if machine.args else machine.kwargs["options"]
    assert [(rule.include, rule.pattern) for rule in options.rules] == [
        (True, "src/***"), (False, "*.pyc"), (False, "*")]
    assert options.collect == ("out/*",)
    assert options.firmware == "uefi"
    assert machine.commands[0].argv == ("make", "check")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--boot", "full", "--", "true"], "--boot full needs --image"),
        (["--include", "src/***", "--", "true"], "--include/--exclude/--sync works with --boot"),
        (["--image", "x", "--boot", "full", "--sync", "src", "--", "true"], "bad --sync rule"),
        (["--image", "x", "--collect", "out", "--", "true"], "--collect works with --boot full"),
        (["--firmware", "bios", "--", "true"], "--firmware works with --boot full"),
        (["--boot", "sideways", "--", "true"], "argument --boot: invalid choice"),
        (["--image", "x", "--boot", "full", "--include", "a/../b", "--", "true"],
         "cannot contain a '..' component"),
    ],
)
def test_cli_full_boot_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str],
                                    message: str) -> None:
    code, lines = run_main(capsys, argv)
    assert code == 125
    assert message in lines[0], lines


def test_bake_refuses_bad_input_before_anything_boots(capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    bad = tmp_path / "user-data"
    bad.write_text("packages: [hello]\n")  # no #cloud-config header
    code, lines = run_main(capsys, ["image", "bake", "base", "--user-data", str(bad),
                                    "--name", "x"])
    assert code == 125 and "user-data has an unknown format" in lines[0]
    code, lines = run_main(capsys, ["image", "bake", "base", "--user-data",
                                    str(tmp_path / "missing"), "--name", "x"])
    assert code == 125 and "cannot read user-data" in lines[0]
    bad.write_text("#cloud-config\nusers: [\n")
    code, lines = run_main(capsys, ["image", "bake", "base", "--user-data", str(bad),
                                    "--name", "x"])
    assert code == 125 and "YAML error" in lines[0]
    bad.write_text("#cloud-config\n")
    code, lines = run_main(capsys, ["image", "bake", "base", "--user-data", str(bad),
                                    "--name", "bad name"])
    assert code == 125 and "bad image name" in lines[0]
    code, lines = run_main(capsys, ["image", "bake", "base", "--name", "x"])
    assert code == 125 and "--user-data" in lines[0]
