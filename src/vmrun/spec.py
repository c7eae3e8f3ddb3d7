"""Frozen descriptions of a machine and of a command: what the command line parses into."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from vmrun.errors import UsageError


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    HVF = "hvf"
    TCG = "tcg"


class Share(StrEnum):
    RW = "rw"
    RO = "ro"
    NONE = "none"


class Net(StrEnum):
    USER = "user"
    NONE = "none"


class Boot(StrEnum):
    """How a run with --image boots (without --image it is always vmrun's own guest)."""

    AUTO = "auto"  # FAST when the image has a root partition, else DISK
    FAST = "fast"  # vmrun's kernel and agent; the command runs in the image's root partition
    FULL = "full"  # the image's firmware, bootloader, kernel and init; the command over SSH
    DISK = "disk"  # vmrun's guest with the image attached as a plain disk, /dev/vda


@dataclass(frozen=True)
class MachineSpec:
    """Everything that shapes the VM itself (not the commands run in it)."""

    arch: str | None = None  # None: the host's architecture
    cpus: int = 1
    memory_mib: int = 1024
    boot_timeout: float = 120.0
    share: Share = Share.RW
    share_dir: Path | None = None  # None: the current directory
    net: Net = Net.USER
    accel: Accel = Accel.AUTO
    keep: bool = False
    console: bool = False
    verbose: bool = False
    mirror: str | None = None
    tty: bool = False  # give the VM a terminal port, for commands run with tty=True
    image: str | None = None  # a disk: stored name or digest, image file, or alias
    boot: Boot = Boot.AUTO

    def __post_init__(self) -> None:
        if self.cpus < 1 or self.cpus > 64:
            raise UsageError(f"--cpus must be between 1 and 64, not {self.cpus}")
        if self.memory_mib < 128:
            raise UsageError(f"--memory must be at least 128M, not {self.memory_mib}M")
        if self.boot_timeout <= 0:
            raise UsageError("--boot-timeout must be positive")


@dataclass(frozen=True)
class Command:
    """One command to run in the guest."""

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None  # None: the shared directory's path
    timeout: float | None = None
    tty: bool = False
    input: bytes | None = None  # stdin given up front (API); None: see stdin_stream
    stdin_stream: bool = field(default=False)  # forward the host's stdin, EOF on close

    def __post_init__(self) -> None:
        if not self.argv:
            raise UsageError("no command given", hint="usage: vmrun [OPTIONS] -- COMMAND [ARGS...]")
        for word in (*self.argv, *(k + v for k, v in self.env), self.cwd or ""):
            if "\0" in word:
                raise UsageError("a NUL byte cannot be passed to the guest")
        for key, _ in self.env:
            if not key or "=" in key:
                raise UsageError(f"bad environment variable name {key!r}")
        if self.timeout is not None and self.timeout <= 0:
            raise UsageError("--timeout must be positive")


def parse_memory(text: str) -> int:
    """Parse a memory size like 512M, 2G or 1024 (MiB) into MiB."""
    units = {"": 1, "m": 1, "mb": 1, "mib": 1, "g": 1024, "gb": 1024, "gib": 1024}
    stripped = text.strip().lower()
    number = stripped.rstrip("kmgib")
    unit = stripped[len(number):]
    if not (number.isascii() and number.isdigit()) or unit not in units:
        raise UsageError(f"bad memory size {text!r}", hint="use a number with M or G, like 512M")
    return int(number) * units[unit]


def parse_env(items: list[str], host_env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """--env K=V sets a value; --env K passes the host's value (skipped when unset)."""
    result: list[tuple[str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        if not key:
            raise UsageError(f"bad --env {item!r}", hint="use --env NAME=VALUE or --env NAME")
        if sep:
            result.append((key, value))
        elif key in host_env:
            result.append((key, host_env[key]))
    return tuple(result)
