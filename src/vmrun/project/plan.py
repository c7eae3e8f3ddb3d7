"""The runs a project makes: one per profile, architecture and shard, each a vmrun argv."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vmrun.errors import UsageError
from vmrun.project.config import Profile, Project
from vmrun.spec import Boot

RESULTS_DIR = Path(".vmrun") / "results"
VMRUN = (sys.executable, "-m", "vmrun")  # how every argv of a plan starts


@dataclass(frozen=True)
class RunUnit:
    """One run: PROFILE on ARCH, shard SHARD (1-based) of SHARDS. ARGV performs it from the
    project root (`python -m vmrun test --unit ID`: a private copy of the project, the VM,
    the collected files into RESULTS); RUN_ARGV is the `vmrun run` part it runs inside that
    copy. BAKE, when the profile bakes, is the `vmrun image bake` argv to run first (cached:
    a second run of it bakes nothing)."""

    id: str
    profile: str
    arch: str
    shard: int
    shards: int
    root: str
    results: str  # relative to ROOT
    argv: tuple[str, ...]
    run_argv: tuple[str, ...]
    bake: tuple[str, ...] = ()
    collect: tuple[str, ...] = ()  # globs, relative to the project's copy
    junit: tuple[str, ...] = ()  # collected JUnit XML files, relative to RESULTS
    copy: str = "auto"  # what of the project the run's private copy holds (runner)
    memory_mib: int = 1024  # the guest's memory and CPUs: what a cluster node must offer
    cpus: int = 1

    @property
    def vmrun_args(self) -> tuple[str, ...]:
        """ARGV without its `python -m vmrun`: what a cluster engine's RunUnit holds."""
        return vmrun_args(self.argv)

    def as_json(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunUnit:
        fields: dict[str, Any] = {key: tuple(value) if isinstance(value, list) else value
                                  for key, value in data.items()}
        return cls(**fields)


def vmrun_args(argv: Sequence[str]) -> tuple[str, ...]:
    """ARGV (`PYTHON -m vmrun ARGS`, whichever Python planned it) as its ARGS."""
    if tuple(argv[1:3]) != ("-m", "vmrun"):
        raise ValueError(f"not a vmrun argv: {argv!r}")
    return tuple(argv[3:])


def unit_id(profile: str, arch: str, shard: int, shards: int) -> str:
    return f"{profile}/{arch}" + (f"/{shard}" if shards > 1 else "")


def baked_name(project: Project, profile: Profile, arch: str) -> str:
    """The stored name a profile's bake goes to: one per project, profile and arch."""
    where = hashlib.sha256(str(project.root).encode()).hexdigest()[:8]
    return f"project-{where}-{profile.name}-{arch}"[:64]


def run_options(project: Project, profile: Profile, arch: str) -> list[str]:
    """`vmrun run` options for PROFILE on ARCH (the command and environment excepted)."""
    options = ["--arch", arch, "--cpus", str(profile.cpus),
               "--memory", f"{profile.memory_mib}M", "--net", profile.net.value,
               "--boot", profile.boot.value]
    if profile.bake is not None:
        options += ["--image", baked_name(project, profile, arch)]
    elif profile.image is not None:
        options += ["--image", profile.image]
    if profile.packages:
        options += ["--packages", ",".join(profile.packages)]
    if profile.suite is not None:
        options += ["--suite", profile.suite]
    if profile.timeout is not None:
        options += ["--timeout", repr(profile.timeout)]
    if profile.boot_timeout is not None:
        options += ["--boot-timeout", repr(profile.boot_timeout)]
    for volume in profile.volumes:
        text = f"{volume.host}" + (f":{volume.guest}" if volume.guest else "")
        options += ["--volume", text + (":ro" if volume.readonly else "")]
    for kind, pattern in profile.sync:
        options += ["--sync", f"{'+' if kind == 'include' else '-'} {pattern}"]
    if profile.boot == Boot.FULL:
        for glob in profile.collect:
            options += ["--collect", glob]
    return options


def bake_argv(project: Project, profile: Profile, arch: str) -> tuple[str, ...]:
    if profile.bake is None or profile.image is None:
        return ()
    return (*VMRUN, "image", "bake", profile.image,
            "--user-data", str(profile.bake), "--name", baked_name(project, profile, arch),
            "--arch", arch, "--quiet")


def _unit(project: Project, profile: Profile, arch: str, shard: int,
          extra: Sequence[str]) -> RunUnit:
    command = profile.command_for(shard, profile.shards, extra)
    env = [word for key, value in command.env for word in ("--env", f"{key}={value}")]
    ident = unit_id(profile.name, arch, shard, profile.shards)
    results = RESULTS_DIR / profile.name / arch
    if profile.shards > 1:
        results /= str(shard)
    return RunUnit(
        id=ident, profile=profile.name, arch=arch, shard=shard, shards=profile.shards,
        root=str(project.root), results=str(results),
        argv=(*VMRUN, "test", "--project", str(project.path.resolve()),
              "--unit", ident, *(("--", *extra) if extra else ())),
        run_argv=("run", *run_options(project, profile, arch), *env, "--", *command.argv),
        bake=bake_argv(project, profile, arch), collect=profile.collect, junit=profile.junit,
        copy=profile.copy, memory_mib=profile.memory_mib,
        cpus=profile.cpus)


def parse_shard(text: str) -> tuple[int, int]:
    """--shard I/N: the I-th (1-based) of N slices."""
    index, sep, count = text.partition("/")
    if not (sep and index.isascii() and index.isdigit() and count.isascii()
            and count.isdigit() and 1 <= int(index) <= int(count)):
        raise UsageError(f"bad --shard {text!r}", hint="I/N with 1 <= I <= N, like 2/4")
    return int(index), int(count)


def plan(project: Project, names: Sequence[str] = (), shard: tuple[int, int] | None = None,
         extra: Sequence[str] = ()) -> list[RunUnit]:
    """The runs of the profiles NAMES (all when empty), in profile, arch, shard order;
    SHARD (I, N) keeps the I-th of N near-equal contiguous slices of that list."""
    for name in names:
        if name not in project.profiles:
            raise UsageError(f"no profile {name!r} in {project.path}",
                             hint=f"profiles: {', '.join(project.profiles)}")
    chosen = [project.profiles[name] for name in (dict.fromkeys(names) or project.profiles)]
    units = [_unit(project, profile, arch, index, extra)
             for profile in chosen for arch in profile.arches
             for index in range(1, profile.shards + 1)]
    if shard is None:
        return units
    index, count = shard
    return units[(index - 1) * len(units) // count: index * len(units) // count]
