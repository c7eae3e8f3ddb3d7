from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vmrun.cli
import vmrun.cli.run
import vmrun.matrix
from tests.unit.test_spec_cli import FakeMachine
from vmrun import config
from vmrun.errors import UsageError
from vmrun.machine import silent
from vmrun.spec import Accel, MachineSpec, Net, Share

ALL_KEYS = """\
arch = "aarch64"
cpus = 2
memory = "2G"
accel = "tcg"
mirror = "http://mirror.example/debian"
share = "ro"
share_via = "9p"
net = "none"
boot_timeout = 90
timeout = 12.5
jobs = 3
"""

VMRUN_ENV = [setting.env for setting in config.SETTINGS]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in VMRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    previous = signal.getsignal(signal.SIGTERM)
    FakeMachine.instances = []
    yield
    signal.signal(signal.SIGTERM, previous)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


# --- where the file is ------------------------------------------------------------------


def test_config_path_follows_xdg_and_vmrun_config(tmp_path: Path) -> None:
    assert config.config_path({"XDG_CONFIG_HOME": "/x"}) == Path("/x/vmrun/config.toml")
    assert config.config_path({}) == Path.home() / ".config" / "vmrun" / "config.toml"
    assert config.config_path({"VMRUN_CONFIG": "/y.toml", "XDG_CONFIG_HOME": "/x"}) == \
        Path("/y.toml")
    assert config.config_path({"VMRUN_CONFIG": ""}) is None


def test_a_missing_default_file_is_no_defaults(tmp_path: Path) -> None:
    assert config.run_defaults({"XDG_CONFIG_HOME": str(tmp_path)}) == {}


def test_a_missing_vmrun_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="VMRUN_CONFIG names .*missing.toml"):
        config.run_defaults({"VMRUN_CONFIG": str(tmp_path / "missing.toml")})


# --- the file -----------------------------------------------------------------------------


def test_every_key_is_read_with_its_type(tmp_path: Path) -> None:
    assert config.file_defaults(write(tmp_path, ALL_KEYS)) == {
        "arch": "aarch64", "cpus": 2, "memory": "2G", "accel": "tcg",
        "mirror": "http://mirror.example/debian", "share": "ro", "share_via": "9p",
        "net": "none", "boot_timeout": 90.0, "timeout": 12.5, "jobs": 3,
    }


def test_memory_may_be_a_number_of_mib(tmp_path: Path) -> None:
    assert config.file_defaults(write(tmp_path, "memory = 2048\n")) == {"memory": "2048"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cpus = 2\ncpu = 4\n", r"config.toml:2: unknown key 'cpu'"),
        ("\n[run]\ncpus = 2\n", r"config.toml:2: unknown key 'run'"),
        ("cpus = \"2\"\n", r"config.toml:1: cpus must be an integer, not a string"),
        ("cpus = true\n", r"config.toml:1: cpus must be an integer, not a boolean"),
        ("timeout = \"9\"\n", r"config.toml:1: timeout must be an integer or a number, not a "
                              r"string"),
        ("memory = [1]\n", r"config.toml:1: memory must be a string or an integer, not an array"),
        ("accel = 1\n", r"config.toml:1: accel must be a string, not an integer"),
        ("cpus = 0\n", r"config.toml:1: cpus must be between 1 and 64, not 0"),
        ("jobs = 999\n", r"config.toml:1: jobs must be between 1 and 256, not 999"),
        ("memory = \"lots\"\n", r"config.toml:1: memory: bad memory size 'lots'"),
        ("accel = \"xen\"\n", r"config.toml:1: accel must be one of auto, kvm, hvf, tcg, "
                              r"not 'xen'"),
        ("share = \"yes\"\n", r"config.toml:1: share must be one of"),
        ("arch = \"vax\"\n", r"config.toml:1: arch: unknown architecture 'vax'"),
        ("boot_timeout = -1\n", r"config.toml:1: boot_timeout must be a number of seconds"),
        ("mirror = \"\"\n", r"config.toml:1: mirror is empty"),
        ("cpus = \n", r"config.toml: not valid TOML"),
    ],
)
def test_a_bad_file_is_a_one_line_error_naming_file_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UsageError, match=message) as info:
        config.file_defaults(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_an_unreadable_file_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.mkdir()
    with pytest.raises(UsageError, match=f"cannot read the config file {path}"):
        config.file_defaults(path)


# --- the environment ---------------------------------------------------------------------


def test_env_values_are_checked_and_typed() -> None:
    assert config.env_defaults({"VMRUN_CPUS": "4", "VMRUN_TIMEOUT": "3", "VMRUN_NET": "none",
                                "VMRUN_ARCH": "arm64,s390x", "VMRUN_MEMORY": ""}) == {
        "cpus": 4, "timeout": 3.0, "net": "none", "arch": "arm64,s390x"}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("VMRUN_CPUS", "two", "VMRUN_CPUS takes a whole number, not 'two'"),
        ("VMRUN_CPUS", "100", "VMRUN_CPUS must be between 1 and 64, not 100"),
        ("VMRUN_MEMORY", "2T", "VMRUN_MEMORY: bad memory size '2T'"),
        ("VMRUN_ACCEL", "xen", "VMRUN_ACCEL must be one of"),
        ("VMRUN_ARCH", "x86_64,vax", "VMRUN_ARCH: unknown architecture 'vax'"),
        ("VMRUN_ARCH", ",", "VMRUN_ARCH names no architecture"),
        ("VMRUN_BOOT_TIMEOUT", "soon", "VMRUN_BOOT_TIMEOUT takes a number of seconds"),
    ],
)
def test_a_bad_env_value_names_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        config.env_defaults({name: value})
    assert str(info.value).startswith(message)


# --- precedence: option > environment > file > built-in ----------------------------------


def test_env_beats_file(tmp_path: Path) -> None:
    path = write(tmp_path, "cpus = 2\nmemory = \"2G\"\n")
    assert config.run_defaults({"VMRUN_CONFIG": str(path), "VMRUN_CPUS": "3"}) == {
        "cpus": 3, "memory": "2G"}


def test_the_old_mirror_variable_is_the_mirror_setting(tmp_path: Path) -> None:
    path = write(tmp_path, "mirror = \"http://file.example/debian\"\n")
    environ = {"VMRUN_CONFIG": str(path), "VMRUN_DEBIAN_MIRROR": "http://env.example/debian"}
    assert config.run_defaults(environ) == {"mirror": "http://env.example/debian"}


def run_cli(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> MachineSpec:
    monkeypatch.setattr(vmrun.cli.run, "Machine", FakeMachine)
    assert vmrun.cli.main(argv) == 0
    [machine] = FakeMachine.instances
    FakeMachine.instances = []
    return machine.spec


@pytest.mark.parametrize(
    ("in_file", "in_env", "options", "cpus"),
    [
        (False, False, [], 1),  # built-in
        (True, False, [], 2),  # the file beats the built-in
        (True, True, [], 3),  # the environment beats the file
        (True, True, ["--cpus", "4"], 4),  # the option beats the environment
        (False, True, [], 3),
        (False, False, ["--cpus", "4"], 4),
    ],
)
def test_precedence_through_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_file: bool, in_env: bool,
    options: list[str], cpus: int
) -> None:
    monkeypatch.setenv("VMRUN_CONFIG", str(write(tmp_path, "cpus = 2\n" if in_file else "")))
    if in_env:
        monkeypatch.setenv("VMRUN_CPUS", "3")
    assert run_cli(monkeypatch, [*options, "--", "true"]).cpus == cpus


def test_every_setting_reaches_the_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    text = ALL_KEYS.replace('arch = "aarch64"\n', "").replace("jobs = 3\n", "")
    monkeypatch.setenv("VMRUN_CONFIG", str(write(tmp_path, text)))
    monkeypatch.setattr(vmrun.cli.run, "Machine", FakeMachine)
    assert vmrun.cli.main(["--", "true"]) == 0
    [machine] = FakeMachine.instances
    assert machine.spec == MachineSpec(
        cpus=2, memory_mib=2048, accel=Accel.TCG, mirror="http://mirror.example/debian",
        share=Share.RO, net=Net.NONE, boot_timeout=90.0)
    assert machine.kwargs["share_via"] == "9p"
    assert machine.commands[0].timeout == 12.5


def test_options_beat_every_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMRUN_CONFIG", str(write(tmp_path, ALL_KEYS)))
    monkeypatch.setenv("VMRUN_MEMORY", "3G")
    spec = run_cli(monkeypatch, [
        "--arch", "x86_64", "--cpus", "1", "--memory", "512M", "--accel", "auto",
        "--mirror", "http://opt.example/debian", "--share", "rw", "--share-via", "auto",
        "--net", "user", "--boot-timeout", "5", "--", "true"])
    assert spec == MachineSpec(arch="x86_64", memory_mib=512, mirror="http://opt.example/debian",
                               boot_timeout=5.0)


def test_a_bad_config_fails_the_run_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "cpus = 2\nmemroy = \"2G\"\n")
    monkeypatch.setenv("VMRUN_CONFIG", str(path))
    assert vmrun.cli.main(["--", "true"]) == 125
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"vmrun: error: {path}:2: unknown key 'memroy'"
    assert lines[1].startswith("hint: known keys: arch, cpus, memory")


def test_a_bad_env_value_fails_the_run(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VMRUN_SHARE", "sometimes")
    assert vmrun.cli.main(["--", "true"]) == 125
    assert capsys.readouterr().err.startswith(
        "vmrun: error: VMRUN_SHARE must be one of rw, ro, none, not 'sometimes'")


# --- matrix runs: every architecture gets the same defaults --------------------------------


def test_a_matrix_run_hands_its_defaults_to_every_architecture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMRUN_CONFIG", str(write(tmp_path, 'arch = "aarch64,s390x"\n'
                                                 "cpus = 2\njobs = 1\n")))
    monkeypatch.setenv("VMRUN_MEMORY", "2G")
    calls: list[Any] = []

    def fake_matrix(*args: Any, **kwargs: Any) -> int:
        calls.append((args, kwargs))
        return 0

    monkeypatch.setattr(vmrun.matrix, "run_matrix", fake_matrix)
    assert vmrun.cli.main(["-q", "--cpus", "3", "--", "uname", "-m"]) == 0
    [((arches, passthrough, command, jobs), kwargs)] = calls
    assert (arches, command, jobs, kwargs) == (["aarch64", "s390x"], ["uname", "-m"], 1,
                                               {"quiet": True})
    # the resolved defaults first, then the run's own options (argparse: the last wins)
    assert passthrough == ["--cpus", "2", "--memory", "2G", "-q", "--cpus", "3"]
    parsed = vmrun.cli.run.run_parser().parse_args(passthrough)
    assert (parsed.cpus, parsed.memory, parsed.quiet) == (3, "2G", True)


# --- -q ------------------------------------------------------------------------------------


def test_quiet_gives_the_machine_a_silent_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmrun.cli.run, "Machine", FakeMachine)
    assert vmrun.cli.main(["-q", "--", "true"]) == 0
    assert vmrun.cli.main(["--quiet", "--", "true"]) == 0
    assert vmrun.cli.main(["--", "true"]) == 0
    notices = [machine.kwargs["notice"] for machine in FakeMachine.instances]
    assert notices[:2] == [silent, silent] and notices[2] is not silent


def test_quiet_and_verbose_contradict(capsys: pytest.CaptureFixture[str]) -> None:
    assert vmrun.cli.main(["-q", "--verbose", "--", "true"]) == 125
    assert "--quiet and --verbose" in capsys.readouterr().err
