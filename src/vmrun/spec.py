"""Frozen descriptions of a machine and of a command: what the command line parses into."""

from __future__ import annotations

import ipaddress
import math
import os
import posixpath
import re
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
    boot_timeout: float | None = None  # None: default_boot_timeout() for what is booted
    share: Share = Share.RW
    share_dir: Path | None = None  # None: the current directory
    net: Net = Net.USER
    accel: Accel = Accel.AUTO
    keep: bool = False
    console: bool = False
    verbose: bool = False
    mirror: str | None = None
    insecure_unverified_guest: bool = False  # boot a guest whose packages are unsigned
    tty: bool = False  # give the VM a terminal port, for commands run with tty=True
    image: str | None = None  # a disk: stored name or digest, image file, or alias
    boot: Boot = Boot.AUTO
    image_format: str | None = None  # "raw": an image file without a header is a raw disk
    # OCI images (--image docker://..., oci:..., oci-archive:...):
    entrypoint: tuple[str, ...] | None = None  # replaces the image's; () clears it
    insecure_registries: tuple[str, ...] = ()  # HOST[:PORT] reached over plain HTTP
    cold: bool = False  # boot the kernel, never restore a memory template (vmrun.warm)
    # Docker-style options (README "Docker-style options"):
    volumes: tuple[Volume, ...] = ()  # host directories shared besides the working one
    publish: tuple[Publish, ...] = ()  # guest TCP ports forwarded from the host
    name: str | None = None  # shown with verbose, part of the run directory's name
    # A kernel of the user's (--kernel), booted with vmrun's initramfs and agent:
    kernel: Path | None = None  # bzImage, Image or vmlinux; None: vmrun's Debian kernel
    append: str = ""  # added to the kernel command line, after vmrun's own words (any kernel)
    modules: Path | None = None  # lib/modules/RELEASE, or a modules_install tree above it
    # --packages: a root of these Debian packages (vmrun.build.roots), from SUITE (None:
    # the suite of vmrun's guest kernel for the architecture).
    packages: tuple[str, ...] = ()
    suite: str | None = None

    def __post_init__(self) -> None:
        check_count(self.cpus, "--cpus", MAX_CPUS)
        check_docker_options(self)
        if self.memory_mib < MIN_MEMORY_MIB:
            raise UsageError(f"--memory must be at least {MIN_MEMORY_MIB}M, "
                             f"not {self.memory_mib}M")
        ceiling = host_memory_mib()
        if self.memory_mib > ceiling:
            raise UsageError(f"--memory {self.memory_mib}M is more than this host's "
                             f"{ceiling}M of memory",
                             hint="a guest cannot have more memory than its host")
        if self.boot_timeout is not None:
            check_seconds(self.boot_timeout, "--boot-timeout")
        if self.kernel is None and self.modules is not None:
            raise UsageError("--modules goes with --kernel")
        if self.kernel is not None and self.boot == Boot.FULL:
            raise UsageError("--kernel boots vmrun's initramfs; --boot full boots the "
                             "image's own kernel")
        if "\0" in self.append or "\n" in self.append:
            raise UsageError("--append cannot hold a NUL byte or a newline")
        if self.image_format not in (None, "raw"):
            raise UsageError(f"bad --image-format {self.image_format!r}",
                             hint="only 'raw' can be given: other formats have a header")


@dataclass(frozen=True)
class Command:
    """One command to run in the guest.

    An empty ARGV means an OCI image's default command (its Entrypoint and Cmd); a run
    without such an image refuses it.
    """

    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None  # None: the shared directory's path
    timeout: float | None = None
    tty: bool = False
    input: bytes | None = None  # stdin given up front (API); None: see stdin_stream
    stdin_stream: bool = field(default=False)  # forward the host's stdin, EOF on close
    user: User | None = None  # run as these ids (-u); None: root, or an OCI image's user

    def __post_init__(self) -> None:
        if self.cwd is not None and not self.cwd.startswith("/"):
            raise UsageError(f"the working directory must be an absolute path, not "
                             f"{self.cwd!r}", hint="like -w /src")
        for word in (*self.argv, *(k + v for k, v in self.env), self.cwd or ""):
            if "\0" in word:
                raise UsageError("a NUL byte cannot be passed to the guest")
        for key, _ in self.env:
            if not key or "=" in key:
                raise UsageError(f"bad environment variable name {key!r}")
        if self.timeout is not None:
            check_seconds(self.timeout, "--timeout")


# ---- docker-style options: volumes, published ports, users, names ------------------------

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "unchanged" to setuid(2)


@dataclass(frozen=True)
class Volume:
    """A host directory shared with the guest at GUEST (-v HOST[:GUEST][:ro]), by 9p or
    virtiofs like the working directory; read-only ones are always 9p, which refuses
    writes on the host side."""

    host: Path
    guest: str | None = None  # None: the host directory's absolute path
    readonly: bool = False

    def __post_init__(self) -> None:
        if self.guest is not None and not self.guest.startswith("/"):
            raise UsageError(f"volume {self.host}: the guest path {self.guest!r} is not "
                             "absolute", hint="like -v HOST:/data")
        if "\0" in str(self.host) + (self.guest or ""):
            raise UsageError("a NUL byte cannot be passed to the guest")
        if self.target == "/":
            raise UsageError(f"volume {self.host}: cannot be mounted over the guest's '/'",
                             hint="like -v HOST:/data")

    @property
    def target(self) -> str:
        """Where the guest sees it: a normalized absolute path."""
        if self.guest is None:
            return os.path.abspath(self.host)
        return posixpath.normpath("/" + self.guest.lstrip("/"))


@dataclass(frozen=True)
class Publish:
    """A guest TCP port reached from the host (-p [ADDR:]HOST:GUEST), through QEMU's user
    network; ADDR is the host address it listens on, loopback unless given."""

    host_port: int
    guest_port: int
    address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for port in (self.host_port, self.guest_port):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                raise UsageError(f"--publish: port {port} is not between 1 and 65535")
        try:
            ipaddress.IPv4Address(self.address)
        except ValueError:
            raise UsageError(f"--publish: {self.address!r} is not an IPv4 address",
                             hint="like -p 127.0.0.1:8080:80 or -p 0.0.0.0:8080:80") from None


@dataclass(frozen=True)
class User:
    """Numeric ids a command runs as (-u UID[:GID])."""

    uid: int
    gid: int | None = None  # None: the user's group in an OCI image's /etc/passwd, else 0

    def __post_init__(self) -> None:
        for value in (self.uid, self.gid if self.gid is not None else 0):
            if isinstance(value, bool) or not isinstance(value, int) or \
                    not 0 <= value <= MAX_ID:
                raise UsageError(f"--user: id {value} is out of range (0 to {MAX_ID})")


def check_docker_options(spec: MachineSpec) -> None:
    """SPEC's volumes, ports and name make sense together (paths on the host are checked
    when the machine starts)."""
    if spec.name is not None and not NAME_PATTERN.fullmatch(spec.name):
        raise UsageError(f"bad --name {spec.name!r}",
                         hint="a letter or digit, then up to 63 of A-Z a-z 0-9 _ . -")
    seen: dict[str, Volume] = {}
    for volume in spec.volumes:
        if volume.target in seen:
            raise UsageError(f"volumes {seen[volume.target].host} and {volume.host} are both "
                             f"mounted at {volume.target}", hint="give each its own guest path")
        seen[volume.target] = volume
    if spec.publish and spec.net == Net.NONE:
        raise UsageError("--publish needs the guest network", hint="drop --net none")
    for at, rule in enumerate(spec.publish):
        if any(_same_socket(rule, other) for other in spec.publish[:at]):
            raise UsageError(f"--publish: host port {rule.host_port} is given twice")


def _same_socket(a: Publish, b: Publish) -> bool:
    return a.host_port == b.host_port and (a.address == b.address
                                           or "0.0.0.0" in (a.address, b.address))


def no_command() -> UsageError:
    return UsageError("no command given", hint="usage: vmrun [OPTIONS] -- COMMAND [ARGS...]")


MAX_CPUS = 64  # vmrun's ceiling on every architecture (QEMU's arm virt machines take 8)
MIN_MEMORY_MIB = 128
# Where the host's memory cannot be read, the most that any supported architecture's
# QEMU machine takes: 16 TiB.
FALLBACK_MEMORY_CEILING_MIB = 16 << 20
# A year: longer than any run, and far inside what select() takes as a timeout.
MAX_SECONDS = 365 * 24 * 3600

# Default seconds until the guest is ready, by (boot mode, hardware accelerated). Measured
# on a 2-core host under TCG: an x86_64 fast boot takes 3-10 s, a full boot of a cloud
# image 50-75 s idle and more than 120 s with the host busy. Each is a ceiling with room
# for a loaded host, never a measurement.
_BOOT_TIMEOUT_S = {(False, True): 60.0, (False, False): 180.0,
                   (True, True): 180.0, (True, False): 600.0}
# Emulated, these boot several times slower than x86_64 or aarch64 guests do.
_TCG_SLOWDOWN = {"s390x": 2.0, "ppc64le": 2.0, "riscv64": 2.0}


def default_boot_timeout(boot: Boot, accel: Accel, arch: str) -> float:
    """Seconds a boot may take unless --boot-timeout says: by boot mode (FULL runs the
    image's firmware and init), by accelerator (KVM, HVF or TCG; AUTO counts as TCG) and,
    under TCG, by architecture."""
    hardware = accel in (Accel.KVM, Accel.HVF)
    seconds = _BOOT_TIMEOUT_S[(boot == Boot.FULL, hardware)]
    return seconds if hardware else seconds * _TCG_SLOWDOWN.get(arch, 1.0)


def boot_timeout_for(spec: MachineSpec, accel: Accel, arch: str) -> float:
    """SPEC's --boot-timeout when given, else the default for what it boots and how."""
    if spec.boot_timeout is not None:
        return spec.boot_timeout
    return default_boot_timeout(spec.boot, accel, arch)


BOOT_TIMEOUT_HELP = ("seconds until the guest is ready (default: 180 under TCG, 60 with KVM "
                     "or HVF; --boot full: 600 and 180; twice as long for s390x, ppc64le "
                     "and riscv64 under TCG)")


def check_seconds(value: float, option: str) -> float:
    """VALUE when it is a usable number of seconds for OPTION: finite, above 0, at most
    MAX_SECONDS (nan would never expire, inf would overflow the wait)."""
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or not 0 < value <= MAX_SECONDS:
        raise UsageError(f"{option} must be a number of seconds above 0 and at most "
                         f"{MAX_SECONDS}, not {value}")
    return float(value)


def check_count(value: int, option: str, most: int) -> int:
    """VALUE when it is a whole number from 1 to MOST."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise UsageError(f"{option} must be between 1 and {most}, not {value}")
    return value


def parse_seconds(text: str, option: str) -> float:
    """Parse OPTION's value, a number of seconds like 30 or 2.5."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{option} takes a number of seconds, not {text!r}",
                         hint="like 30 or 2.5") from None
    return check_seconds(value, option)


def parse_count(text: str, option: str, most: int) -> int:
    """Parse OPTION's value, a whole number from 1 to MOST."""
    stripped = text.strip()
    if not (stripped.isascii() and stripped.isdigit()):
        raise UsageError(f"{option} takes a whole number, not {text!r}",
                         hint=f"a number from 1 to {most}")
    return check_count(int(stripped), option, most)


def host_memory_mib() -> int:
    """The host's physical memory in MiB, or a fixed ceiling where it cannot be read."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return FALLBACK_MEMORY_CEILING_MIB
    if pages <= 0 or page_size <= 0:
        return FALLBACK_MEMORY_CEILING_MIB
    return min(pages * page_size >> 20, FALLBACK_MEMORY_CEILING_MIB)


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
