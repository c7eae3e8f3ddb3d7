"""mmdebstrap, run for vmrun: a root filesystem of Debian (or Ubuntu) packages, as a tar stream.

Without root privileges mmdebstrap works in a user namespace (--mode=unshare); as root it
needs neither. A foreign architecture's maintainer scripts run through qemu-user, which
the kernel must find through binfmt_misc: that is checked first, because mmdebstrap
fails only after its downloads otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vmrun.errors import ImageError, UsageError
from vmrun.qemu.arch import host_arch, lookup_arch

MMDEBSTRAP = "mmdebstrap"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# A Debian package name (Debian Policy 5.6.1), optionally with =VERSION or /RELEASE.
PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+|/[a-z0-9-]+)?")
SUITE = re.compile(r"[a-z][a-z0-9-]{1,40}")
MAX_PACKAGES = 500
# What a slim root leaves out (as Debian's slim container images do); copyright stays.
SLIM_DPKG_OPTIONS = (
    "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*", "path-exclude=/usr/share/lintian/*",
)
CLEAN_APT = 'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log'
_LOG_TAIL = 2000
STOP_GRACE_S = 60.0
# apt's words for a name it does not know, or knows with nothing to install.
MISSING = re.compile(r"Unable to locate package (\S+)|Package '?([^' ]+)'? has no "
                     r"installation candidate")


@dataclass(frozen=True)
class Bootstrap:
    """What mmdebstrap is asked for; its repr is part of the cache keys built on it."""

    suite: str
    mirror: str
    arch: str  # Debian's name, e.g. amd64
    packages: tuple[str, ...]
    variant: str = "essential"  # essential: no apt in the root; "apt" for images with it
    slim: bool = True
    customize: tuple[str, ...] = ()  # shell hooks run with the root directory as "$1"
    finish: tuple[str, ...] = ()  # hooks run last, after apt's lists and caches are gone

    def argv(self, target: str) -> list[str]:
        mode = "root" if os.geteuid() == 0 else "unshare"
        argv = [MMDEBSTRAP, "--quiet", f"--mode={mode}", f"--variant={self.variant}",
                f"--architectures={self.arch}"]
        if self.packages:
            argv.append("--include=" + ",".join(self.packages))
        if self.slim:
            argv += [f"--dpkgopt={option}" for option in SLIM_DPKG_OPTIONS]
        for hook in (*self.customize, CLEAN_APT, *self.finish):
            argv += ["--customize-hook", hook]
        return [*argv, self.suite, target, self.mirror]


def parse_packages(text: str, option: str = "--packages") -> tuple[str, ...]:
    """A comma-separated package list, checked, without duplicates, sorted (the order
    does not change what apt installs, so it must not change a cache key)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise UsageError(f"{option} names no package", hint=f"{option} python3,git")
    for name in names:
        if not PACKAGE.fullmatch(name):
            raise UsageError(f"bad package name {name!r} in {option}",
                             hint="Debian package names: lower case letters, digits, + - .")
    if len(set(names)) > MAX_PACKAGES:
        raise UsageError(f"{option} names more than {MAX_PACKAGES} packages")
    return tuple(sorted(set(names)))


def check_suite(suite: str) -> str:
    if not SUITE.fullmatch(suite):
        raise UsageError(f"bad suite name {suite!r}", hint="like bookworm, trixie or noble")
    return suite


def check_host(debian_arch: str) -> None:
    """mmdebstrap is there, and a foreign DEBIAN_ARCH's binaries can run (qemu-user)."""
    if shutil.which(MMDEBSTRAP) is None:
        raise ImageError("building from packages needs mmdebstrap",
                         hint="apt install mmdebstrap (and qemu-user-static for other "
                         "architectures)")
    machine = lookup_arch(debian_arch).name
    if machine == host_arch() or (machine == "i386" and host_arch() == "x86_64"):
        return
    entry = BINFMT / f"qemu-{machine}"
    try:
        enabled = entry.read_text().startswith("enabled")
    except OSError:
        enabled = False
    if not enabled:
        raise ImageError(f"building for {debian_arch} needs qemu-{machine} registered with "
                         f"binfmt_misc ({entry} is missing or disabled)",
                         hint="apt install qemu-user-static binfmt-support (it registers "
                         "the emulators); in a container, the host must register them")


def run(bootstrap: Bootstrap, target: str, *, stdout: IO[bytes] | int | None,
        log: Path, tmpdir: Path | None = None) -> subprocess.Popen[bytes]:
    """Start mmdebstrap writing to TARGET ("-": a tar on STDOUT); messages go to LOG. Its
    own working directory goes under TMPDIR (default: the system's). End it with stop()."""
    check_host(bootstrap.arch)
    env = {**os.environ, "TMPDIR": str(tmpdir)} if tmpdir is not None else None
    with open(log, "ab") as log_file:
        return subprocess.Popen(bootstrap.argv(target), stdin=subprocess.DEVNULL,
                                stdout=stdout, stderr=log_file, env=env)


def stop(process: subprocess.Popen[bytes]) -> None:
    """End an interrupted mmdebstrap through its own clean-up: as root it has mounted
    proc, sys and device nodes into its directory, which a SIGKILL would leave behind.
    SIGTERM, then up to STOP_GRACE_S for it to unmount and remove its directory."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def finish(bootstrap: Bootstrap, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait for PROCESS; on an interruption stop() it; ImageError if it failed."""
    try:
        status = process.wait()
    except BaseException:
        stop(process)
        raise
    if status != 0:
        raise failure(bootstrap, status, log)


def failure(bootstrap: Bootstrap, status: int, log: Path) -> ImageError:
    """The error for an mmdebstrap that exited with STATUS, with its last message."""
    text = log.read_text(errors="replace")[-_LOG_TAIL:] if log.exists() else ""
    missing = MISSING.findall(text)
    if missing:
        names = ", ".join(dict.fromkeys(a or b for a, b in missing))
        return ImageError(f"no package {names} in {bootstrap.suite} for {bootstrap.arch} on "
                          f"{bootstrap.mirror}", hint="check the names (apt-cache search, or "
                          "packages.debian.org); nothing was stored")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    # mmdebstrap ends with "E: mmdebstrap failed to run"; what failed is said before it.
    telling = [line for line in lines if not line.startswith(("E: mmdebstrap failed",
                                                              "I: "))]
    last = telling[-1] if telling else lines[-1] if lines else "no message"
    hint = None
    if "Unable to locate package" in text or "has no installation candidate" in text:
        hint = f"check the package names for {bootstrap.suite} on {bootstrap.arch}"
    return ImageError(f"mmdebstrap failed (exit {status}) building {bootstrap.suite} "
                      f"{bootstrap.arch} with {', '.join(bootstrap.packages) or 'no packages'}: "
                      f"{last}", hint=hint)


def describe(packages: Sequence[str]) -> str:
    return ",".join(packages)
