"""Docker-style run options: how they parse, what they refuse, what they put in the spec."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vmrun.cli
import vmrun.cli.run
from vmrun.cli.docker import parse_publish, parse_user, parse_volume, read_env_file
from vmrun.errors import UsageError
from vmrun.machine import Result
from vmrun.qemu.arch import lookup_arch
from vmrun.qemu.argv import BootPlan, ShareDevice, ShareKind, build_argv, volume_tag
from vmrun.rundir import run_directory
from vmrun.share import check_clash, volume_source
from vmrun.spec import Accel, Command, MachineSpec, Net, Publish, User, Volume

# ---- -v / --volume ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "volume"),
    [
        ("/data", Volume(Path("/data"))),
        ("/data:ro", Volume(Path("/data"), readonly=True)),
        ("/data:rw", Volume(Path("/data"))),
        ("/data:/srv", Volume(Path("/data"), "/srv")),
        ("/data:/srv:ro", Volume(Path("/data"), "/srv", readonly=True)),
        ("rel/dir:/srv", Volume(Path("rel/dir"), "/srv")),
    ],
)
def test_parse_volume(text: str, volume: Volume) -> None:
    assert parse_volume(text) == volume


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "bad --volume"), (":/srv", "bad --volume"), ("/a:", "bad --volume"),
        ("/a:/b:/c", "bad --volume"), ("/a:/b:rx", "bad --volume"),
        ("/a:srv", "is not absolute"), ("/a:/", "over the guest's '/'"),
        ("/a:/srv/..", "over the guest's '/'"), ("/:ro", "over the guest's '/'"),
    ],
)
def test_parse_volume_rejects(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_volume(text)
    assert "\n" not in str(info.value)


def test_volume_target_defaults_to_the_host_path_and_is_normalized(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Volume(tmp_path).target == str(tmp_path)
    assert Volume(Path("/h"), "//srv/./x/../y/").target == "/srv/y"
    monkeypatch.chdir(tmp_path)
    assert Volume(Path("sub")).target == str(tmp_path / "sub")


def test_volumes_at_one_guest_path_are_refused() -> None:
    with pytest.raises(UsageError, match="/a and /b are both mounted at /srv"):
        MachineSpec(volumes=(Volume(Path("/a"), "/srv"), Volume(Path("/b"), "/srv/")))
    spec = MachineSpec(volumes=(Volume(Path("/a"), "/srv"), Volume(Path("/b"), "/srv/b")))
    assert len(spec.volumes) == 2  # nested is fine: the parent is mounted first


def test_volume_source_needs_an_existing_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path)
    assert volume_source(Volume(tmp_path / "link")) == tmp_path.resolve()
    with pytest.raises(UsageError, match="no such directory on the host"):
        volume_source(Volume(tmp_path / "missing"))
    with pytest.raises(UsageError, match="not a directory") as info:
        volume_source(Volume(tmp_path / "file"))
    assert info.value.hint is not None and "-v DIR:GUESTDIR" in info.value.hint


def test_volume_over_the_working_directory_is_refused(tmp_path: Path) -> None:
    check_clash([Volume(Path("/x"), "/elsewhere")], tmp_path)
    with pytest.raises(UsageError, match="shared working directory's guest path"):
        check_clash([Volume(Path("/x"), str(tmp_path))], tmp_path)


# ---- -p / --publish ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("8080:80", Publish(8080, 80)), ("8080:80/tcp", Publish(8080, 80)),
        ("0.0.0.0:8080:80", Publish(8080, 80, "0.0.0.0")),
        ("192.0.2.7:1:65535", Publish(1, 65535, "192.0.2.7")),
    ],
)
def test_parse_publish(text: str, rule: Publish) -> None:
    assert parse_publish(text) == rule


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("80", "bad --publish"), ("a:80", "bad --publish"), ("8080:80/udp", "only tcp"),
        ("1:2:3:4", "bad --publish"), ("0:80", "not between 1 and 65535"),
        ("8080:65536", "not between 1 and 65535"), ("localhost:1:2", "not an IPv4 address"),
        ("::1:1:2", "bad --publish"), ("-1:2", "bad --publish"),
    ],
)
def test_parse_publish_rejects(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_publish(text)


def test_publish_needs_the_network_and_distinct_host_ports() -> None:
    with pytest.raises(UsageError, match="--publish needs the guest network"):
        MachineSpec(net=Net.NONE, publish=(Publish(8080, 80),))
    with pytest.raises(UsageError, match="host port 8080 is given twice"):
        MachineSpec(publish=(Publish(8080, 80), Publish(8080, 81)))
    with pytest.raises(UsageError, match="host port 8080 is given twice"):
        MachineSpec(publish=(Publish(8080, 80), Publish(8080, 81, "0.0.0.0")))
    both = (Publish(8080, 80), Publish(8080, 81, "192.0.2.7"))
    assert MachineSpec(publish=both).publish == both


# ---- -u / --user, --name, -w ------------------------------------------------------------


def test_parse_user() -> None:
    assert parse_user("1000") == User(1000)
    assert parse_user("1000:50") == User(1000, 50)
    assert parse_user("0:0") == User(0, 0)
    for bad in ("", "me", "1000:", ":5", "1:2:3", "-1", "1.5", "٣"):
        with pytest.raises(UsageError, match="bad --user"):
            parse_user(bad)
    with pytest.raises(UsageError, match="out of range"):
        parse_user(str(1 << 32))


@pytest.mark.parametrize("name", ["a", "web-1", "A.b_c", "9" * 64])
def test_name_accepted(name: str) -> None:
    assert MachineSpec(name=name).name == name


@pytest.mark.parametrize("name", ["", "-x", ".x", "_x", "a b", "a/b", "9" * 65, "é"])
def test_name_refused(name: str) -> None:
    with pytest.raises(UsageError, match="bad --name"):
        MachineSpec(name=name)


def test_run_directory_carries_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMRUN_RUNS_DIR", str(tmp_path))
    with run_directory(keep=lambda: False, notice=print, name="web-1") as path:
        assert path.name.startswith("run-web-1-") and path.is_dir()
    with run_directory(keep=lambda: False, notice=print) as path:
        assert path.name.startswith("run-") and not path.name.startswith("run-web")


def test_workdir_must_be_absolute() -> None:
    assert Command(("pwd",), cwd="/srv").cwd == "/srv"
    with pytest.raises(UsageError, match="must be an absolute path"):
        Command(("pwd",), cwd="srv")


# ---- --env-file -------------------------------------------------------------------------


def test_env_file(tmp_path: Path) -> None:
    path = tmp_path / "env"
    path.write_text("# a comment\n\nA=1\n  B=x=y\nQUOTED=\"kept as is\"\nEMPTY=\n"
                    "HOSTVAR\nUNSET\n   # indented comment\nSP= a b \n")
    assert read_env_file(path, {"HOSTVAR": "from-host"}) == (
        ("A", "1"), ("B", "x=y"), ("QUOTED", '"kept as is"'), ("EMPTY", ""),
        ("HOSTVAR", "from-host"), ("SP", " a b "))


@pytest.mark.parametrize(("text", "line"), [("A=1\nB C=2\n", 2), ("=x\n", 1),
                                            ("A=1\n\n# c\nA B\n", 4)])
def test_env_file_errors_name_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "env"
    path.write_text(text)
    with pytest.raises(UsageError, match=f"^{path}:{line}: bad variable"):
        read_env_file(path, {})


def test_env_file_is_bounded_and_regular(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"A=" + b"x" * (1 << 20) + b"\n")
    with pytest.raises(UsageError, match="larger than 1 MiB"):
        read_env_file(big, {})
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="a FIFO, not a regular file"):
        read_env_file(fifo, {})
    with pytest.raises(UsageError, match="cannot read --env-file"):
        read_env_file(tmp_path / "missing", {})
    (tmp_path / "latin").write_bytes(b"A=\xe9\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        read_env_file(tmp_path / "latin", {})


# ---- QEMU's argv --------------------------------------------------------------------------


def boot_plan(**changes: Any) -> BootPlan:
    fds = {name: n for n, name in enumerate(
        ("control", "status", "stdout", "stderr", "stdin", "serial", "qmp"), 3)}
    fields: dict[str, Any] = {
        "arch": lookup_arch("x86_64"), "accel": Accel.TCG, "cpus": 1, "memory_mib": 512,
        "kernel": Path("/k"), "initrd": Path("/i"), "cmdline": "c", "fds": fds, **changes}
    return BootPlan(**fields)


def test_argv_has_a_device_per_volume() -> None:
    argv = build_argv(boot_plan(
        share=ShareDevice(ShareKind.NINEP, Path("/w"), readonly=False),
        volumes=(ShareDevice(ShareKind.NINEP, Path("/d,1"), True, tag=volume_tag(1)),
                 ShareDevice(ShareKind.VIRTIOFS, Path("/e"), False, Path("/r/v2.sock"),
                             volume_tag(2)))))
    text = " ".join(argv)
    assert "local,id=share0,path=/w,security_model=none,multidevs=remap " in text
    assert "fsdev=share0,mount_tag=vmrun0" in text
    assert "local,id=share1,path=/d,,1,security_model=none,multidevs=remap,readonly=on" in text
    assert "fsdev=share1,mount_tag=vmrun1" in text
    assert "socket,id=vfs2,path=/r/v2.sock" in text and "chardev=vfs2,tag=vmrun2" in text
    assert argv.count("memory-backend-memfd,id=mem,size=512M,share=on") == 1
    assert "microvm,isa-serial=on,rtc=on,memory-backend=mem" in argv


def test_argv_forwards_published_ports() -> None:
    argv = build_argv(boot_plan(forwards=(Publish(8080, 80), Publish(2222, 22, "0.0.0.0"))))
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev == ("user,id=net0,hostfwd=tcp:127.0.0.1:8080-:80,"
                      "hostfwd=tcp:0.0.0.0:2222-:22")


# ---- the command line ---------------------------------------------------------------------


class FakeMachine:
    """Stands in for vmrun.machine.Machine: records the spec and commands, boots nothing."""

    last: FakeMachine | None = None

    def __init__(self, spec: MachineSpec, *args: Any, **kwargs: Any) -> None:
        self.spec = spec
        self.commands: list[Command] = []
        self.timings: dict[str, float] = {}
        FakeMachine.last = self

    def __enter__(self) -> FakeMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def run(self, command: Command) -> Result:
        self.commands.append(command)
        return Result(exit_code=0)


@pytest.fixture(autouse=True)
def fake_machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    previous = signal.getsignal(signal.SIGTERM)  # main() installs a SIGTERM handler
    monkeypatch.setattr(vmrun.cli.run, "Machine", FakeMachine)
    FakeMachine.last = None
    yield
    signal.signal(signal.SIGTERM, previous)


def cli(argv: list[str]) -> tuple[MachineSpec, Command]:
    assert vmrun.cli.main(argv) == 0
    machine = FakeMachine.last
    assert machine is not None
    return machine.spec, machine.commands[0]


def test_cli_docker_options_reach_spec_and_command(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("A=from-file\nB=from-file\nHOSTVAR\n")
    monkeypatch.setenv("HOSTVAR", "h")
    spec, command = cli(["-v", f"{tmp_path}:/srv:ro", "--volume", "/x", "-w", "/srv",
                         "-u", "1000:50", "--env-file", str(env_file), "-e", "B=from-e",
                         "--rm", "-m", "256M", "--network", "none", "--name", "job.1",
                         "-i", "--", "id"])
    assert spec.volumes == (Volume(tmp_path, "/srv", True), Volume(Path("/x")))
    assert (spec.memory_mib, spec.net, spec.name, spec.verbose) == (256, Net.NONE, "job.1",
                                                                      False)
    assert command.cwd == "/srv" and command.user == User(1000, 50)
    assert command.env == (("A", "from-file"), ("B", "from-file"), ("HOSTVAR", "h"),
                           ("B", "from-e"))
    assert command.stdin_stream and command.argv == ("id",)
    spec, _ = cli(["-p", "8080:80", "-p", "0.0.0.0:9000:90", "--verbose", "--", "true"])
    assert spec.publish == (Publish(8080, 80), Publish(9000, 90, "0.0.0.0"))
    assert spec.verbose and spec.volumes == ()


def test_cli_i_streams_stdin_even_from_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "isatty", lambda fd: True)
    assert not cli(["--", "cat"])[1].stdin_stream
    assert cli(["-i", "--", "cat"])[1].stdin_stream
    command = cli(["-it", "--", "sh"])[1]
    assert command.stdin_stream and command.tty
    assert cli(["-ti", "--", "sh"])[1].tty


def test_cli_v_is_no_longer_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    assert vmrun.cli.main(["-v", "--", "true"]) == 125
    assert "-v/--volume: expected one argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-v", "/a:rel", "--", "true"], "is not absolute"),
        (["-v", "/a:/s", "-v", "/b:/s", "--", "true"], "both mounted at /s"),
        (["-w", "rel", "--", "true"], "must be an absolute path"),
        (["-u", "root", "--", "true"], "bad --user 'root'"),
        (["--name", "-bad", "--", "true"], "expected one argument"),
        (["--name", "a b", "--", "true"], "bad --name"),
        (["-p", "80", "--", "true"], "bad --publish '80'"),
        (["-p", "8080:80", "--net", "none", "--", "true"], "needs the guest network"),
        (["--env-file", "/nonexistent/env", "--", "true"], "cannot read --env-file"),
        (["--network", "bridge", "--", "true"], "invalid choice"),
    ],
)
def test_cli_docker_option_errors(capsys: pytest.CaptureFixture[str], argv: list[str],
                                  message: str) -> None:
    assert vmrun.cli.main(argv) == 125
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("vmrun: error: ") and message in lines[0], lines
    assert FakeMachine.last is None


def test_help_names_the_docker_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        vmrun.cli.main(["--help"])
    text = capsys.readouterr().out
    for spelling in ("-v HOST[:GUEST][:ro], --volume", "-w DIR, --workdir", "-u UID[:GID]",
                     "--env-file FILE", "-i, --interactive", "--rm", "every run is removed",
                     "-m MEMORY, --memory", "--net {user,none}, --network", "--name NAME",
                     "-p [ADDR:]HOST:GUEST[/tcp]"):
        assert spelling in text


def test_boot_full_refuses_volumes_publish_and_user(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    for option in (["-v", f"{tmp_path}:/x"], ["-p", "8080:80"], ["-u", "1"]):
        assert vmrun.cli.main(["--image", "some-image", "--boot", "full", *option,
                               "--", "true"]) == 125
        assert "work with --boot full" in capsys.readouterr().err
    assert vmrun.cli.main(["--arch", "x86_64,aarch64", "-p", "8080:80", "--", "true"]) == 125
    assert "-p cannot be used with several architectures" in capsys.readouterr().err
