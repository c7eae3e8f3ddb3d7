"""The project file: vmrun.toml or [tool.vmrun] in pyproject.toml, read into checked profiles."""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vmrun.errors import UsageError
from vmrun.project.locate import locate
from vmrun.qemu.arch import host_arch, lookup_arch
from vmrun.spec import (
    MAX_CPUS,
    Boot,
    Command,
    MachineSpec,
    Net,
    Volume,
    check_count,
    check_seconds,
    parse_memory,
)

PROJECT_FILE = "vmrun.toml"
PYPROJECT = "pyproject.toml"
MAX_SHARDS = 1024
MAX_FILE = 1 << 20  # a project file of a megabyte is not a project file

_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               dict: "a table", list: "an array"}


def type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class Profile:
    """One named way to run the project's command (extends already resolved)."""

    name: str
    command: tuple[str, ...]
    image: str | None = None
    packages: tuple[str, ...] = ()
    suite: str | None = None
    bake: Path | None = None  # user-data or a script (absolute), baked onto image
    boot: Boot = Boot.AUTO
    arch: tuple[str, ...] = ()  # () : the host's
    cpus: int = 1
    memory_mib: int = 1024
    env: tuple[tuple[str, str], ...] = ()
    volumes: tuple[Volume, ...] = ()  # HOST absolute (given relative to the project root)
    sync: tuple[tuple[str, str], ...] = ()  # ("include"|"exclude", PATTERN), --boot full
    collect: tuple[str, ...] = ()
    junit: tuple[str, ...] = ()
    timeout: float | None = None
    boot_timeout: float | None = None
    net: Net = Net.USER
    shards: int = 1
    description: str = ""
    extends: str | None = None
    copy: str = "auto"  # auto: git's files where there is a work tree, else all; all

    @property
    def arches(self) -> tuple[str, ...]:
        """The architectures to run on: the ones given, else the host's."""
        return self.arch or (lookup_arch(host_arch()).name,)

    def machine_spec(self, arch: str) -> MachineSpec:
        """The machine one run of this profile boots on ARCH (a bake is not applied here:
        the runner bakes first and runs the baked image)."""
        return MachineSpec(
            arch=arch, cpus=self.cpus, memory_mib=self.memory_mib,
            boot_timeout=self.boot_timeout, net=self.net, image=self.image, boot=self.boot,
            volumes=self.volumes, packages=self.packages, suite=self.suite)

    def command_for(self, shard: int = 1, shards: int = 1,
                    extra: Sequence[str] = ()) -> Command:
        """The command of shard SHARD (1-based) of SHARDS, with EXTRA arguments appended;
        the guest sees VMRUN_SHARD and VMRUN_SHARDS."""
        env = (*self.env, ("VMRUN_SHARD", str(shard)), ("VMRUN_SHARDS", str(shards)))
        return Command(argv=(*self.command, *extra), env=env, timeout=self.timeout)


@dataclass(frozen=True)
class Project:
    """A project file read and checked: its profiles in file order."""

    path: Path  # the file read
    root: Path  # its directory: relative paths in it start here
    profiles: dict[str, Profile] = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    """Where values come from, to name FILE:LINE: KEY in errors."""

    path: Path
    text: str
    prefix: tuple[str, ...]  # () for vmrun.toml, ("tool", "vmrun") for pyproject.toml

    def where(self, *key: str) -> str:
        line = locate(self.text, (*self.prefix, *key))
        return f"{self.path}:{line}" if line is not None else str(self.path)

    def error(self, key: Sequence[str], message: str, hint: str | None = None) -> UsageError:
        dotted = ".".join((*self.prefix, *key))
        return UsageError(f"{self.where(*key)}: {dotted}: {message}", hint=hint)


# ---- one check per key: (value, source, key path, project root) -> the Profile field ------

Check = Callable[[Any, Source, tuple[str, ...], Path], Any]


def _want(value: object, kinds: tuple[type, ...], src: Source, key: tuple[str, ...]) -> None:
    # bool is an int to Python, never to a project file
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        wanted = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise src.error(key, f"must be {wanted}, not {type_name(value)}")


def _string(value: Any, src: Source, key: tuple[str, ...], root: Path) -> str:
    _want(value, (str,), src, key)
    if not value or "\0" in value:
        raise src.error(key, "must be a non-empty string without NUL")
    return str(value)


def _strings(value: Any, src: Source, key: tuple[str, ...], root: Path) -> tuple[str, ...]:
    _want(value, (list,), src, key)
    for item in value:
        if not isinstance(item, str):
            raise src.error(key, f"must be an array of strings, not one holding "
                            f"{type_name(item)}")
        if "\0" in item:
            raise src.error(key, "a string cannot hold a NUL byte")
    return tuple(value)


def _wrapped(check: Callable[[Any, str], Any], kinds: tuple[type, ...]) -> Check:
    """A check built from vmrun's option checks, its message prefixed with FILE:LINE: KEY."""
    def run(value: Any, src: Source, key: tuple[str, ...], root: Path) -> Any:
        _want(value, kinds, src, key)
        try:
            return check(value, key[-1])
        except UsageError as error:
            raise src.error(key, str(error), error.hint) from None
    return run


def _image(value: Any, src: Source, key: tuple[str, ...], root: Path) -> str:
    return _string(value, src, key, root)


def _packages(value: Any, src: Source, key: tuple[str, ...], root: Path) -> tuple[str, ...]:
    from vmrun.build.debootstrap import parse_packages

    names = _strings(value, src, key, root)
    try:
        return parse_packages(",".join(names), "packages")
    except UsageError as error:
        raise src.error(key, str(error), error.hint) from None


def _suite(value: Any, src: Source, key: tuple[str, ...], root: Path) -> str:
    from vmrun.build.debootstrap import check_suite

    return _wrapped(lambda v, _: check_suite(v), (str,))(value, src, key, root)  # type: ignore[no-any-return]


def _path(value: Any, src: Source, key: tuple[str, ...], root: Path) -> Path:
    path = root / _string(value, src, key, root)
    if not path.is_file():
        raise src.error(key, f"{path} is not a file")
    return path


def _choice(kind: type[Boot] | type[Net]) -> Check:
    def run(value: Any, src: Source, key: tuple[str, ...], root: Path) -> Any:
        text = _string(value, src, key, root)
        choices = [member.value for member in kind]
        if text not in choices:
            raise src.error(key, f"must be one of {', '.join(choices)}, not {text!r}")
        return kind(text)
    return run


def _one_of(*choices: str) -> Check:
    def run(value: Any, src: Source, key: tuple[str, ...], root: Path) -> str:
        text = _string(value, src, key, root)
        if text not in choices:
            raise src.error(key, f"must be one of {', '.join(choices)}, not {text!r}")
        return text
    return run


def _arches(value: Any, src: Source, key: tuple[str, ...], root: Path) -> tuple[str, ...]:
    names = _strings([value] if isinstance(value, str) else value, src, key, root)
    if not names:
        raise src.error(key, "names no architecture")
    try:
        arches = tuple(lookup_arch(name).name for name in names)
    except UsageError as error:
        raise src.error(key, str(error), error.hint) from None
    if len(set(arches)) != len(arches):
        raise src.error(key, "names an architecture twice")
    return arches


def _memory(value: Any, src: Source, key: tuple[str, ...], root: Path) -> int:
    _want(value, (str, int), src, key)
    try:
        mib = parse_memory(str(value))
    except UsageError as error:
        raise src.error(key, str(error), error.hint) from None
    if mib < 128:
        raise src.error(key, f"must be at least 128M, not {value!r}")
    return mib


def _env(value: Any, src: Source, key: tuple[str, ...], root: Path
         ) -> tuple[tuple[str, str], ...]:
    _want(value, (dict,), src, key)
    pairs: list[tuple[str, str]] = []
    for name, item in value.items():
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise src.error((*key, name), f"must be a string or a number, not "
                            f"{type_name(item)}")
        if not name or "=" in name or "\0" in name or "\0" in str(item):
            raise src.error((*key, name), "bad environment variable")
        pairs.append((name, str(item)))
    return tuple(pairs)


def _volumes(value: Any, src: Source, key: tuple[str, ...], root: Path
             ) -> tuple[Volume, ...]:
    from vmrun.cli.docker import parse_volume

    volumes = []
    for text in _strings(value, src, key, root):
        try:
            volume = parse_volume(text)
        except UsageError as error:
            raise src.error(key, str(error), error.hint) from None
        volumes.append(replace(volume, host=(root / volume.host).resolve()))
    return tuple(volumes)


def _sync(value: Any, src: Source, key: tuple[str, ...], root: Path
          ) -> tuple[tuple[str, str], ...]:
    from vmrun import sync

    rules = []
    for text in _strings(value, src, key, root):
        sign, pattern = text[:1], text[1:].lstrip(" ")
        if sign not in ("+", "-") or not pattern:
            raise src.error(key, f"bad rule {text!r}", hint="write '+ PATTERN' to copy, "
                            "'- PATTERN' to leave out (rsync's filter rules)")
        rules.append(("include" if sign == "+" else "exclude", pattern))
    try:
        sync.parse_rules(rules)
    except UsageError as error:
        raise src.error(key, str(error), error.hint) from None
    return tuple(rules)


def _relative_globs(value: Any, src: Source, key: tuple[str, ...], root: Path
                    ) -> tuple[str, ...]:
    globs = _strings(value, src, key, root)
    for glob in globs:
        if not glob or glob.startswith("/") or ".." in glob.split("/"):
            raise src.error(key, f"{glob!r} must be a relative path without '..'")
    return globs


def _command(value: Any, src: Source, key: tuple[str, ...], root: Path) -> tuple[str, ...]:
    argv = _strings(value, src, key, root)
    if not argv:
        raise src.error(key, "is empty", hint='like command = ["make", "check"]')
    return argv


CHECKS: dict[str, tuple[str, Check]] = {  # key: (Profile field, check)
    "description": ("description", _string),
    "extends": ("extends", _string),
    "image": ("image", _image),
    "packages": ("packages", _packages),
    "suite": ("suite", _suite),
    "bake": ("bake", _path),
    "boot": ("boot", _choice(Boot)),
    "arch": ("arch", _arches),
    "cpus": ("cpus", _wrapped(lambda v, k: check_count(v, k, MAX_CPUS), (int,))),
    "memory": ("memory_mib", _memory),
    "env": ("env", _env),
    "volumes": ("volumes", _volumes),
    "sync": ("sync", _sync),
    "command": ("command", _command),
    "collect": ("collect", _relative_globs),
    "junit": ("junit", _relative_globs),
    "timeout": ("timeout", _wrapped(check_seconds, (int, float))),
    "boot_timeout": ("boot_timeout", _wrapped(check_seconds, (int, float))),
    "net": ("net", _choice(Net)),
    "copy": ("copy", _one_of("auto", "all")),
    "shards": ("shards", _wrapped(lambda v, k: check_count(v, k, MAX_SHARDS), (int,))),
}


# ---- reading the file ---------------------------------------------------------------------

def find_project(start: Path) -> tuple[Path, tuple[str, ...]] | None:
    """The project file for START: vmrun.toml, else a pyproject.toml with [tool.vmrun], in
    START or the nearest directory above it."""
    for directory in (start, *start.parents):
        if (directory / PROJECT_FILE).is_file():
            return directory / PROJECT_FILE, ()
        pyproject = directory / PYPROJECT
        if pyproject.is_file() and "vmrun" in _read(pyproject)[1].get("tool", {}):
            return pyproject, ("tool", "vmrun")
    return None


def _read(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE + 1)
    except OSError as exc:
        raise UsageError(f"cannot read the project file {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE:
        raise UsageError(f"{path}: larger than {MAX_FILE >> 20} MiB: not a project file")
    try:
        text = data.decode()
        return text, tomllib.loads(text)
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None


def read_project(path: Path, prefix: tuple[str, ...] | None = None) -> Project:
    """The project in PATH (vmrun.toml, or pyproject.toml's [tool.vmrun]), checked."""
    text, data = _read(path)
    if prefix is None:
        prefix = ("tool", "vmrun") if path.name == PYPROJECT else ()
    for part in prefix:
        data = data.get(part, {})
    src = Source(path=path, text=text, prefix=prefix)
    if not isinstance(data, dict):
        raise src.error((), f"must be a table, not {type_name(data)}")
    for key in data:
        if key != "profile":
            raise src.error((key,), "unknown key", hint="a project file holds "
                            "[profile.NAME] tables")
    raw = data.get("profile", {})
    if not isinstance(raw, dict):
        raise src.error(("profile",), f"must be a table, not {type_name(raw)}")
    if not raw:
        raise src.error((), "no profile", hint='add one: [profile.test] command = '
                        '["make", "check"]')
    root = path.parent.resolve()
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise src.error(("profile", name), f"must be a table, not {type_name(table)}")
        _check_name(name, src)
    profiles = {name: _profile(name, raw, src, root, ()) for name in raw}
    return Project(path=path, root=root, profiles=profiles)


def _check_name(name: str, src: Source) -> None:
    from vmrun.spec import NAME_PATTERN

    if not NAME_PATTERN.fullmatch(name):
        raise src.error(("profile", name), "a profile name is letters, digits, '_', '.' "
                        "and '-' (up to 64, starting with a letter or digit)")


def _merged(name: str, raw: Mapping[str, Any], src: Source, chain: tuple[str, ...]
            ) -> dict[str, tuple[Any, tuple[str, ...]]]:
    """NAME's keys over those of the profiles it extends: key -> (value, where it is set)."""
    table = raw[name]
    own: dict[str, tuple[Any, tuple[str, ...]]] = {
        key: (value, ("profile", name, key)) for key, value in table.items()}
    for key in table:
        if key not in CHECKS:
            raise src.error(("profile", name, key), "unknown key",
                            hint=f"known keys: {', '.join(CHECKS)}")
    if "extends" not in table:
        return own
    parent = table["extends"]
    where = ("profile", name, "extends")
    if not isinstance(parent, str):
        raise src.error(where, f"must be a string, not {type_name(parent)}")
    if parent not in raw:
        raise src.error(where, f"no profile {parent!r}",
                        hint=f"profiles: {', '.join(raw)}")
    if parent in chain or parent == name:
        cycle = " -> ".join((*chain, name, parent))
        raise src.error(where, f"extends itself: {cycle}")
    merged = _merged(parent, raw, src, (*chain, name))
    if "env" in own and "env" in merged and isinstance(own["env"][0], dict) \
            and isinstance(merged["env"][0], dict):
        # variables add up along extends (the extending profile wins), other keys replace
        own["env"] = ({**merged["env"][0], **own["env"][0]}, own["env"][1])
    return {**merged, **own}


def _profile(name: str, raw: Mapping[str, Any], src: Source, root: Path,
             chain: tuple[str, ...]) -> Profile:
    values: dict[str, Any] = {}
    merged = _merged(name, raw, src, chain)
    for key, (value, where) in merged.items():
        attribute, check = CHECKS[key]
        values[attribute] = check(value, src, where, root)
    if "command" not in values:
        raise src.error(("profile", name), "no command (and none from extends)",
                        hint='like command = ["make", "check"]')
    profile = Profile(name=name, **values)
    _check_profile(profile, merged, src)
    return profile


def _check_profile(profile: Profile, merged: Mapping[str, tuple[Any, tuple[str, ...]]],
                   src: Source) -> None:
    """Checks across keys: junit files are collected, one image source, sync rules and
    bake need what they work with."""
    for path in profile.junit:
        if not any(fnmatch.fnmatch(path, glob) for glob in profile.collect):
            raise src.error(merged["junit"][1], f"{path!r} is not collected",
                            hint="add it (or a glob matching it) to collect")
    if profile.image is not None and profile.packages:
        raise src.error(merged["packages"][1], "give image or packages, not both")
    if profile.suite is not None and not profile.packages:
        raise src.error(merged["suite"][1], "works with packages only")
    if profile.bake is not None and profile.image is None:
        raise src.error(merged["bake"][1], "needs an image to bake onto")
    if profile.sync and profile.boot != Boot.FULL:
        raise src.error(merged["sync"][1], 'works with boot = "full" only')


def load(start: Path | None = None, *, file: Path | None = None) -> Project:
    """The project of START (default: the current directory), or the one in FILE."""
    if file is not None:
        if not file.is_file():
            raise UsageError(f"no project file {file}")
        return read_project(file)
    start = (start or Path.cwd()).resolve()
    found = find_project(start)
    if found is None:
        raise UsageError(f"no {PROJECT_FILE} (or pyproject.toml with [tool.vmrun]) in "
                         f"{start} or above", hint="see README, 'Projects'")
    return read_project(*found)
