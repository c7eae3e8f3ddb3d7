"""mmdebstrap, run for vmrun: a root filesystem of Debian (or Ubuntu) packages, as a tar stream.

Without root privileges mmdebstrap works in a user namespace (--mode=unshare); as root it
needs neither. A foreign architecture's maintainer scripts run through qemu-user, which
the kernel must find through binfmt_misc: that is checked first, because mmdebstrap
fails only after its downloads otherwise.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vmrun.errors import FetchError, ImageError, UsageError
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
_LOG_SCAN = 1 << 20  # where apt's complaint about a name is looked for
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
        from vmrun.debian.archive import KEYRING_ENV

        keyring = os.environ.get(KEYRING_ENV)
        if keyring:  # the archive's keys, as vmrun checks its InRelease (another distribution's)
            argv.append(f"--keyring={keyring}")
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


def check_packages(bootstrap: Bootstrap, cache: Path) -> None:
    """Every package BOOTSTRAP names exists in its suite for its architecture (a real
    package or one some package provides), from the verified Packages index (cached by
    its hash): a typo fails in seconds, naming the package, before any download."""
    from vmrun.debian import archive

    index = archive.load_index(mirror=bootstrap.mirror, suite=bootstrap.suite,
                               arch=bootstrap.arch, cache=cache)
    missing = []
    for package in bootstrap.packages:
        name = re.split(r"[=/]", package, maxsplit=1)[0]
        try:
            index.lookup(name)
        except FetchError:
            missing.append(name)
    if missing:
        raise ImageError(f"no package {', '.join(missing)} in {bootstrap.suite} for "
                         f"{bootstrap.arch} on {bootstrap.mirror}",
                         hint="check the names (apt-cache search, or packages.debian.org); "
                         "nothing was built")


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
        # A process group of its own: stop() signals mmdebstrap with its helpers.
        return subprocess.Popen(bootstrap.argv(target), stdin=subprocess.DEVNULL,
                                stdout=stdout, stderr=log_file, env=env,
                                start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> None:
    """End an interrupted mmdebstrap through its own clean-up: as root it has mounted
    proc, sys and device nodes into its directory, which a SIGKILL would leave behind.
    SIGTERM to its whole group (its setup process, apt, dpkg: mmdebstrap waits for them
    before it cleans up), then up to STOP_GRACE_S for it to unmount and remove its
    directory; SIGKILL to the group after that."""
    if process.poll() is not None:
        return
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def mounts_under(directory: Path) -> list[str]:
    """What is mounted at or below DIRECTORY (from /proc/self/mountinfo)."""
    prefix = os.path.realpath(directory)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = [line.split()[4].encode().decode("unicode_escape") for line in lines]
    return [point for point in points if point == prefix or point.startswith(prefix + "/")]


def remove_work(directory: Path) -> None:
    """Remove a build's work DIRECTORY. What an interrupted mmdebstrap left mounted in it
    (as root: proc, sys, dev/pts, dev/shm of its chroot, all below DIRECTORY) is unmounted
    first, deepest first; should a mount stay, the directory is left, and said so, rather
    than descended into."""
    for point in sorted(mounts_under(directory), key=len, reverse=True):
        subprocess.run(["umount", point], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False)
    left = mounts_under(directory)
    if left:
        raise ImageError(f"{directory} still has {len(left)} mounts ({left[0]}, ...): left "
                         "in place", hint=f"umount them (umount -R {left[0]}), then remove "
                         "the directory")
    shutil.rmtree(directory, ignore_errors=True)


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
    whole = log.read_text(errors="replace")[-_LOG_SCAN:] if log.exists() else ""
    text = whole[-_LOG_TAIL:]
    missing = MISSING.findall(whole)
    if missing:
        names = ", ".join(dict.fromkeys(a or b for a, b in missing))
        return ImageError(f"no package {names} in {bootstrap.suite} for {bootstrap.arch} on "
                          f"{bootstrap.mirror}", hint="check the names (apt-cache search, or "
                          "packages.debian.org); nothing was stored")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    # mmdebstrap ends with "E: mmdebstrap failed to run"; what failed is said before it,
    # on an "E:" line (a failed hook's whole script follows it: its first line is enough).
    errors = [line for line in lines
              if line.startswith("E: ") and not line.startswith("E: mmdebstrap failed")]
    telling = [line for line in lines if not line.startswith(("E: mmdebstrap failed",
                                                              "I: "))]
    last = (errors[-1] if errors else telling[-1] if telling else
            lines[-1] if lines else "no message")[:300]
    hint = None
    if "Unable to locate package" in text or "has no installation candidate" in text:
        hint = f"check the package names for {bootstrap.suite} on {bootstrap.arch}"
    return ImageError(f"mmdebstrap failed (exit {status}) building {bootstrap.suite} "
                      f"{bootstrap.arch} with {', '.join(bootstrap.packages) or 'no packages'}: "
                      f"{last}", hint=hint)


def describe(packages: Sequence[str]) -> str:
    return ",".join(packages)
