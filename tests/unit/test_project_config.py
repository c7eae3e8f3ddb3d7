"""The project file: every key checked, errors that name FILE:LINE: KEY, extends, the locator."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmrun.cli import main
from vmrun.errors import UsageError
from vmrun.project import load, read_project
from vmrun.project.config import CHECKS
from vmrun.project.locate import locate
from vmrun.spec import Boot, Net, Volume


def write(directory: Path, text: str, name: str = "vmrun.toml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(directory: Path, text: str, name: str = "vmrun.toml") -> str:
    path = write(directory, text, name)
    with pytest.raises(UsageError) as info:
        read_project(path)
    return str(info.value)


def test_locator_finds_headers_keys_dotted_and_quoted_forms() -> None:
    text = textwrap.dedent("""\
        # a comment = not a key
        [profile.unit]
        command = ["true"]
        "timeout" = 5

        [profile . 'py']
        env.A = "1"
        notes = '''
        image = "inside a string"
        '''
        image = "x"

        [tool.vmrun.profile.a]
        cpus = 2
        """)
    assert locate(text, ("profile", "unit")) == 2
    assert locate(text, ("profile", "unit", "command")) == 3
    assert locate(text, ("profile", "unit", "timeout")) == 4
    assert locate(text, ("profile", "py", "env", "A")) == 7
    assert locate(text, ("profile", "py", "image")) == 11  # not the line inside the string
    assert locate(text, ("profile", "py", "arch")) == 6  # absent: its table's header
    assert locate(text, ("tool", "vmrun", "profile", "a", "cpus")) == 14
    assert locate(text, ("nothing",)) is None


def test_the_issue_example_reads_with_extends_applied(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    path = write(tmp_path, """\
        [profile.unit]
        command = ["sh", "-c", "make check"]
        arch = ["x86_64", "s390x"]
        timeout = 600
        env = { A = "1", B = "from unit" }
        volumes = ["data:/data:ro"]

        [profile.py]
        extends = "unit"
        image = "docker://python:3.12-slim"
        command = ["python", "-m", "pytest", "--junitxml=report.xml"]
        collect = ["report.xml"]
        junit = ["report.xml"]
        memory = "2G"
        shards = 3
        env.B = 2
        """)
    project = read_project(path)
    assert list(project.profiles) == ["unit", "py"]
    py = project.profiles["py"]
    assert py.arch == ("x86_64", "s390x") and py.timeout == 600.0
    assert py.image == "docker://python:3.12-slim" and py.memory_mib == 2048
    assert py.command == ("python", "-m", "pytest", "--junitxml=report.xml")
    assert py.env == (("A", "1"), ("B", "2"))  # variables add up along extends
    assert py.volumes == (Volume(tmp_path.resolve() / "data", "/data", readonly=True),)
    assert py.shards == 3 and py.collect == py.junit == ("report.xml",)
    assert project.profiles["unit"].image is None
    spec = py.machine_spec("s390x")
    assert (spec.arch, spec.memory_mib, spec.image) == ("s390x", 2048, py.image)
    command = py.command_for(2, 3, ["-k", "fast"])
    assert command.argv[-2:] == ("-k", "fast") and command.timeout == 600.0
    assert dict(command.env)["VMRUN_SHARD"] == "2" and dict(command.env)["VMRUN_SHARDS"] == "3"


def test_pyproject_tool_vmrun_is_found_from_a_subdirectory(tmp_path: Path) -> None:
    write(tmp_path, """\
        [project]
        name = "x"

        [tool.vmrun.profile.t]
        command = ["true"]
        boot = "fast"
        net = "none"
        """, "pyproject.toml")
    (tmp_path / "src" / "deep").mkdir(parents=True)
    project = load(tmp_path / "src" / "deep")
    assert project.path == tmp_path.resolve() / "pyproject.toml"
    assert project.profiles["t"].boot == Boot.FAST and project.profiles["t"].net == Net.NONE


def test_pyproject_without_tool_vmrun_is_passed_over_for_a_vmrun_toml_above(
        tmp_path: Path) -> None:
    write(tmp_path, '[profile.top]\ncommand = ["true"]\n')
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", '[project]\nname = "x"\n', "pyproject.toml")
    assert list(load(tmp_path / "sub").profiles) == ["top"]


def test_no_project_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no vmrun.toml"):
        load(tmp_path)


# Each bad file, the line its error must name and words the message must hold.
BAD = [
    ('[profile.a]\ncommand = ["true"]\nimgae = "x"\n', 3, "profile.a.imgae: unknown key"),
    ('[profile.a]\ncommand = ["true"]\ncpus = "2"\n', 3, "profile.a.cpus: must be an "
     "integer, not a string"),
    ('[profile.a]\ncommand = ["true"]\ncpus = true\n', 3, "profile.a.cpus: must be an "
     "integer, not a boolean"),
    ('[profile.a]\ncommand = ["true"]\ncpus = 0\n', 3, "profile.a.cpus: cpus must be"),
    ('[profile.a]\ncommand = "make check"\n', 2, "profile.a.command: must be an array"),
    ('[profile.a]\ncommand = []\n', 2, "profile.a.command: is empty"),
    ('[profile.a]\ncommand = ["true", 1]\n', 2, "holding an integer"),
    ('[profile.a]\ncommand = ["true"]\narch = ["x86_64", "vax"]\n', 3,
     "profile.a.arch: unknown architecture 'vax'"),
    ('[profile.a]\ncommand = ["true"]\narch = ["x86_64", "amd64"]\n', 3, "twice"),
    ('[profile.a]\ncommand = ["true"]\nmemory = "lots"\n', 3, "profile.a.memory: bad memory"),
    ('[profile.a]\ncommand = ["true"]\nmemory = 64\n', 3, "at least 128M"),
    ('[profile.a]\ncommand = ["true"]\ntimeout = -1\n', 3, "profile.a.timeout:"),
    ('[profile.a]\ncommand = ["true"]\nboot = "slow"\n', 3, "must be one of auto, fast"),
    ('[profile.a]\ncommand = ["true"]\n\n[profile.a.env]\nA = [1]\n', 5,
     "profile.a.env.A: must be a string or a number"),
    ('[profile.a]\ncommand = ["true"]\nvolumes = ["a:b:c:d"]\n', 3, "bad --volume"),
    ('[profile.a]\ncommand = ["true"]\nboot = "full"\nimage = "x"\nsync = ["* x"]\n', 5,
     "profile.a.sync: bad rule"),
    ('[profile.a]\ncommand = ["true"]\nsync = ["+ x"]\n', 3, 'works with boot = "full"'),
    ('[profile.a]\ncommand = ["true"]\ncollect = ["../x"]\n', 3, "without '..'"),
    ('[profile.a]\ncommand = ["true"]\ncollect = ["a.xml"]\njunit = ["b.xml"]\n', 4,
     "'b.xml' is not collected"),
    ('[profile.a]\ncommand = ["true"]\nshards = 0\n', 3, "profile.a.shards:"),
    ('[profile.a]\ncommand = ["true"]\nbake = "missing.yaml"\nimage = "x"\n', 3,
     "is not a file"),
    ('[profile.a]\ncommand = ["true"]\npackages = ["Bad Name"]\n', 3, "bad package name"),
    ('[profile.a]\ncommand = ["true"]\nimage = "x"\npackages = ["git"]\n', 4,
     "image or packages"),
    ('[profile.a]\ncpus = 2\n', 1, "profile.a: no command"),
    ('[profile.a]\nextends = "b"\ncommand = ["true"]\n', 2, "profile.a.extends: no profile"),
    ('[profile.a]\nextends = "b"\n\n[profile.b]\nextends = "a"\n', 5,
     "profile.b.extends: extends itself: a -> b -> a"),
    ('[profile.a]\nextends = "a"\n', 2, "extends itself"),
    ('[profile.a]\ncommand = ["true"]\n\n[other]\nx = 1\n', 4, "other: unknown key"),
    ('[profile.a]\ncommand = ["true"]\ncopy = "some"\n', 3, "must be one of auto, all"),
    ('profile = 3\n', 1, "profile: must be a table"),
    ('[profile."bad name"]\ncommand = ["true"]\n', 1, "a profile name is"),
]


@pytest.mark.parametrize(("text", "line", "words"), BAD)
def test_every_bad_key_is_an_error_naming_file_line_and_key(
        tmp_path: Path, text: str, line: int, words: str) -> None:
    message = error_of(tmp_path, text)
    assert message.startswith(f"{tmp_path / 'vmrun.toml'}:{line}: "), message
    assert words in message
    assert "\n" not in message


def test_errors_in_pyproject_name_the_tool_vmrun_key_and_its_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, """\
        [project]
        name = "x"

        [tool.vmrun.profile.t]
        command = ["true"]
        cpus = 1.5
        """, "pyproject.toml")
    assert message.startswith(f"{tmp_path / 'pyproject.toml'}:6: tool.vmrun.profile.t.cpus:")


def test_a_key_inherited_through_extends_is_blamed_where_it_is_written(
        tmp_path: Path) -> None:
    message = error_of(tmp_path, """\
        [profile.base]
        command = ["true"]
        collect = ["a.xml"]

        [profile.child]
        extends = "base"
        junit = ["b.xml"]
        """)
    assert re.match(rf"{re.escape(str(tmp_path))}/vmrun.toml:7: profile.child.junit", message)


def test_not_toml_is_one_line_naming_the_file(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[profile.a\n")
    assert message.startswith(f"{tmp_path / 'vmrun.toml'}: not valid TOML")


def test_config_check_prints_the_resolved_profiles(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, """\
        [profile.unit]
        command = ["make", "check"]
        arch = ["aarch64"]

        [profile.more]
        extends = "unit"
        cpus = 2
        """)
    assert main(["config", "check", "--project", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["profiles"]["more"]["command"] == ["make", "check"]
    assert data["profiles"]["more"]["arch"] == ["aarch64"]
    assert data["profiles"]["more"]["cpus"] == 2
    assert main(["config", "check", "--project", str(path)]) == 0
    out = capsys.readouterr().out
    assert "all keys valid" in out and "[profile.more]" in out and "cpus = 2" in out


def test_config_check_of_a_bad_file_exits_125_with_file_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[profile.a]\ncommand = ["true"]\ncpu = 2\n')
    assert main(["config", "check", "--project", str(path)]) == 125
    err = capsys.readouterr().err
    assert f"{path}:3: profile.a.cpu: unknown key" in err


@given(st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True),
                          st.lists(st.sampled_from(sorted(CHECKS)), min_size=1, max_size=5,
                                   unique=True),
                          st.sampled_from(["", " ", "  "]), st.booleans()),
                min_size=1, max_size=4, unique_by=lambda t: t[0]))
def test_locator_finds_every_key_wherever_it_is_written(
        tables: list[tuple[str, list[str], str, bool]]) -> None:
    lines: list[str] = ["# project", ""]
    expected: dict[tuple[str, ...], int] = {}
    for name, keys, space, quoted in tables:
        lines.append(f"[{space}profile{space}.{space}{name!r}{space}]" if quoted
                     else f"[profile.{name}]")
        expected[("profile", name)] = len(lines)
        for key in keys:
            lines.append(f'{space}"{key}"{space}= 1' if quoted else f"{key} = 1")
            expected[("profile", name, key)] = len(lines)
        lines.append("")
    text = "\n".join(lines)
    for path, line in expected.items():
        assert locate(text, path) == line
