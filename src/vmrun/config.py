"""Defaults for run options: a TOML config file and VMRUN_* environment variables."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from vmrun.errors import UsageError
from vmrun.qemu.arch import lookup_arch
from vmrun.spec import MAX_CPUS, Accel, Net, Share, parse_count, parse_memory, parse_seconds

MAX_JOBS = 256
CONFIG_ENV = "VMRUN_CONFIG"

Value = str | int | float


def _count(most: int) -> Callable[[str, str], Value]:
    return lambda text, label: parse_count(text, label, most)


def _seconds(text: str, label: str) -> Value:
    return parse_seconds(text, label)


def _memory(text: str, label: str) -> Value:
    parse_memory(text)  # the 128M floor and the host's ceiling are MachineSpec's checks
    return text


def _arches(text: str, label: str) -> Value:
    names = [name for name in text.split(",") if name]
    if not names:
        raise UsageError(f"{label} names no architecture")
    for name in names:
        lookup_arch(name)
    return text


def _text(text: str, label: str) -> Value:
    if not text:
        raise UsageError(f"{label} is empty")
    return text


def _one_of(*choices: str) -> Callable[[str, str], Value]:
    def check(text: str, label: str) -> Value:
        if text not in choices:
            raise UsageError(f"{label} must be one of {', '.join(choices)}, not {text!r}")
        return text

    return check


@dataclass(frozen=True)
class Setting:
    """A run option that the config file and the environment can give a default for."""

    key: str  # in config.toml; the option is --KEY with _ as -, the parser's dest is KEY
    env: str
    parse: Callable[[str, str], Value]  # (text, where it came from) -> the parser's value
    toml_types: tuple[type, ...] = (str,)

    @property
    def option(self) -> str:
        return "--" + self.key.replace("_", "-")


SETTINGS = (
    Setting("arch", "VMRUN_ARCH", _arches),
    Setting("cpus", "VMRUN_CPUS", _count(MAX_CPUS), (int,)),
    Setting("memory", "VMRUN_MEMORY", _memory, (str, int)),
    Setting("accel", "VMRUN_ACCEL", _one_of(*(a.value for a in Accel))),
    Setting("mirror", "VMRUN_DEBIAN_MIRROR", _text),
    Setting("share", "VMRUN_SHARE", _one_of(*(s.value for s in Share))),
    Setting("share_via", "VMRUN_SHARE_VIA", _one_of("auto", "9p", "virtiofs")),
    Setting("net", "VMRUN_NET", _one_of(*(n.value for n in Net))),
    Setting("boot_timeout", "VMRUN_BOOT_TIMEOUT", _seconds, (int, float)),
    Setting("timeout", "VMRUN_TIMEOUT", _seconds, (int, float)),
    Setting("jobs", "VMRUN_JOBS", _count(MAX_JOBS), (int,)),
)
BY_KEY = {setting.key: setting for setting in SETTINGS}


def config_path(environ: Mapping[str, str]) -> Path | None:
    """$VMRUN_CONFIG (empty: no file), else $XDG_CONFIG_HOME/vmrun/config.toml."""
    if CONFIG_ENV in environ:
        return Path(environ[CONFIG_ENV]) if environ[CONFIG_ENV] else None
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "vmrun" / "config.toml"


def _line_of(text: str, key: str) -> str:
    """':N' for the first line that sets KEY, or '' when it cannot be found cheaply."""
    name = rf"[\"']?{re.escape(key)}[\"']?"
    pattern = re.compile(rf"^[ \t]*(?:\[\[?\s*{name}\s*[\].]|{name}\s*[=.])", re.MULTILINE)
    match = pattern.search(text)
    return f":{text.count(chr(10), 0, match.start()) + 1}" if match else ""


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               dict: "a table", list: "an array"}


def _type_name(kind: type) -> str:
    return _TYPE_NAMES.get(kind, kind.__name__)


def _checked(setting: Setting, text: str, where: str) -> Value:
    try:
        return setting.parse(text, where)
    except UsageError as error:
        message = str(error)
        if not message.startswith(where):
            message = f"{where}: {message}"
        raise UsageError(message, hint=error.hint) from None


def file_defaults(path: Path) -> dict[str, Value]:
    """The run defaults PATH sets; {} when it does not exist. Every key is checked."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the config file {path}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    known = ", ".join(BY_KEY)
    values: dict[str, Value] = {}
    for key, value in data.items():
        where = f"{path}{_line_of(text, key)}"
        setting = BY_KEY.get(key)
        if setting is None:
            raise UsageError(f"{where}: unknown key {key!r}", hint=f"known keys: {known}")
        # bool is an int to Python, never to a config file
        if isinstance(value, bool) or not isinstance(value, setting.toml_types):
            wanted = " or ".join(map(_type_name, setting.toml_types))
            raise UsageError(f"{where}: {key} must be {wanted}, not {_type_name(type(value))}")
        values[key] = _checked(setting, str(value), f"{where}: {key}")
    return values


def env_defaults(environ: Mapping[str, str]) -> dict[str, Value]:
    """The run defaults the VMRUN_* variables set (an empty variable sets nothing)."""
    return {setting.key: _checked(setting, environ[setting.env], setting.env)
            for setting in SETTINGS if environ.get(setting.env)}


def run_defaults(environ: Mapping[str, str] | None = None) -> dict[str, Value]:
    """Defaults for the run parser: the environment beats the file (options beat both)."""
    environ = os.environ if environ is None else environ
    path = config_path(environ)
    if path is None:
        from_file: dict[str, Value] = {}
    elif CONFIG_ENV in environ and not path.exists():
        raise UsageError(f"${CONFIG_ENV} names {path}, which does not exist",
                         hint=f"set {CONFIG_ENV}= (empty) for no config file")
    else:
        from_file = file_defaults(path)
    return {**from_file, **env_defaults(environ)}


def as_options(defaults: Mapping[str, Value], *, leave_out: frozenset[str] = frozenset()
               ) -> list[str]:
    """DEFAULTS spelled as options (a matrix run hands its own to every architecture)."""
    words: list[str] = []
    for key, value in defaults.items():
        if key not in leave_out:
            words += [BY_KEY[key].option, str(value)]
    return words
