"""The run options a docker user types (-v, -w, -u, --env-file, -i, --rm, -p, --name)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

from vmrun.errors import UsageError
from vmrun.spec import Publish, User, Volume
from vmrun.userfiles import read_user_file

# An env file holds variables, not data: a megabyte is far more than any real one.
ENV_FILE_LIMIT = 1 << 20


def add_docker_options(parser: argparse.ArgumentParser) -> None:
    """The docker-style options of `vmrun run` (the other spellings are in run.py)."""
    group = parser.add_argument_group("docker-style options")
    group.add_argument("-v", "--volume", action="append", default=[], type=parse_volume,
                       dest="volumes", metavar="HOST[:GUEST][:ro]",
                       help="share the host directory HOST at GUEST (default: the same path), "
                       "read-only with :ro; repeatable")
    group.add_argument("-w", "--workdir", metavar="DIR",
                       help="the guest directory the command starts in (default: the shared "
                       "working directory)")
    group.add_argument("-u", "--user", type=parse_user, metavar="UID[:GID]",
                       help="run the command with these numeric ids (GID default: the OCI "
                       "image's group for UID, else 0)")
    group.add_argument("--env-file", action="append", default=[], type=Path, metavar="FILE",
                       help="set variables from FILE: KEY=VALUE lines, KEY alone passes the "
                       "host's, # comments (-e wins over it)")
    group.add_argument("-i", "--interactive", action="store_true",
                       help="stream stdin to the command even from a terminal (without -i, "
                       "stdin is streamed when it is not a terminal); -it adds a terminal")
    group.add_argument("--rm", action="store_true",
                       help="accepted for docker's habit: every run is removed anyway "
                       "(--keep keeps its run directory)")
    group.add_argument("--name", help="a name for the run: shown with --verbose, part of "
                       "the run directory's name")
    group.add_argument("-p", "--publish", action="append", default=[], type=parse_publish,
                       metavar="[ADDR:]HOST:GUEST[/tcp]",
                       help="forward host TCP port HOST to the guest's GUEST, listening on "
                       "127.0.0.1 unless ADDR is given; repeatable")


def parse_volume(text: str) -> Volume:
    """-v HOST[:GUEST][:ro|rw]; HOST is checked when the machine starts."""
    parts = text.split(":")
    mode = "rw"
    if len(parts) > 1 and parts[-1] in ("ro", "rw"):
        mode = parts.pop()
    if len(parts) > 2 or not parts[0] or (len(parts) == 2 and not parts[1]):
        raise UsageError(f"bad --volume {text!r}", hint="use -v HOST[:GUEST][:ro] (paths "
                         "with ':' cannot be given here; the Python API takes them)")
    return Volume(Path(parts[0]), parts[1] if len(parts) == 2 else None,
                  readonly=mode == "ro")


def parse_publish(text: str) -> Publish:
    """-p [ADDR:]HOST:GUEST[/tcp]."""
    body, _, protocol = text.partition("/")
    if protocol not in ("", "tcp"):
        raise UsageError(f"bad --publish {text!r}: only tcp ports can be forwarded")
    parts = body.split(":")
    if len(parts) not in (2, 3) or not all(p.isascii() and p.isdigit() for p in parts[-2:]):
        raise UsageError(f"bad --publish {text!r}", hint="use -p [ADDR:]HOST:GUEST, like "
                         "-p 8080:80 or -p 0.0.0.0:8080:80")
    address = parts[0] if len(parts) == 3 else "127.0.0.1"
    return Publish(int(parts[-2]), int(parts[-1]), address)


def parse_user(text: str) -> User:
    """-u UID[:GID], numeric."""
    uid, sep, gid = text.partition(":")
    if not all(p.isascii() and p.isdigit() for p in (uid, *([gid] if sep else []))):
        raise UsageError(f"bad --user {text!r}", hint="use numeric ids: -u UID or -u UID:GID")
    return User(int(uid), int(gid) if sep else None)


def read_env_file(path: Path, host_env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The variables of docker's env-file format: KEY=VALUE (the value as written, quotes
    and all), KEY alone for the host's value (left out when unset), # comments."""
    data = read_user_file(path, "--env-file", limit=ENV_FILE_LIMIT)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise UsageError(f"--env-file {path} is not UTF-8 text") from None
    result: list[tuple[str, str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not key or any(c.isspace() for c in key) or "\0" in line:
            raise UsageError(f"{path}:{number}: bad variable {key.strip()[:40]!r}",
                             hint="write KEY=VALUE or KEY (names without spaces)")
        if sep:
            result.append((key, value))
        elif key in host_env:
            result.append((key, host_env[key]))
    return tuple(result)
