"""A hostile guest against the shared directory (RELIABILITY case 17), over 9p and virtiofs,
with vmrun as root and as an ordinary user; the host checks what is left afterwards."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.vmtools import vmrun_argv, vmrun_env
from vmrun.guest.build import Guest, _pointer
from vmrun.share import find_virtiofsd

pytestmark = pytest.mark.vm

# Every attempt prints NAME:ok or NAME:refused (what the guest saw); the host's state after
# the run is what the test judges. SECRET is a host file beside the share, outside it.
ATTEMPTS = r"""
try() { name=$1; shift; if "$@" 2>/dev/null; then echo "$name:ok"; else echo "$name:refused"; fi; }
echo x > f-suid; try setuid-file chmod 4755 f-suid
echo x > f-sgid; try setgid-file chmod 2755 f-sgid
cp /bin/busybox bin-suid; try setuid-binary chmod 4755 bin-suid
cp /bin/busybox bin-sgid; try setgid-binary chmod 2755 bin-sgid
try setuid-create sh -c 'umask 0; touch f-created && chmod 6777 f-created'
try char-device mknod dev-char c 1 3
try block-device mknod dev-block b 7 0
try fifo mknod a-fifo p
echo x > f-chown-root; try chown-root chown 0:0 f-chown-root
echo x > f-chown-other; try chown-other chown 1234:1234 f-chown-other
mkdir open && chmod 777 open
echo 'other:x:1234:1234::/:/bin/sh' >> /etc/passwd; echo 'other:x:1234:' >> /etc/group
try create-as-other su other -c 'echo x > open/made-as-1234 && mknod open/fifo-as-1234 p'
echo x > f-exec; try chmod-exec chmod 755 f-exec
ln -s "$SECRET" link-abs; ln -s ../secret link-dotdot; ln -s /etc/shadow link-shadow
try read-abs cat link-abs; try write-abs sh -c 'echo pwned > link-abs'
try read-dotdot cat link-dotdot; try write-dotdot sh -c 'echo pwned >> link-dotdot'
try read-shadow cat link-shadow
mkdir -p race/d; echo inside > race/d/inner
(end=$(($(date +%s) + 2)); while [ "$(date +%s)" -lt $end ]; do
    mv race/d race/real; ln -s .. race/d; rm race/d; ln -s "${SECRET%/*}" race/d; rm race/d
    mv race/real race/d; done) &
end=$(($(date +%s) + 2)); n=0; while [ "$(date +%s)" -lt $end ]; do
    cat race/d/secret race/d/../secret race/d/inner 2>/dev/null | grep host-secret
    echo pwned 2>/dev/null > race/d/secret; n=$((n + 1)); done
wait; echo "race-opens:$n"
echo done-attempts
"""


@dataclass(frozen=True)
class HostUser:
    name: str
    uid: int
    gid: int


ROOT = HostUser("root", 0, 0)


@dataclass(frozen=True)
class Setup:
    base: Path  # owned by the user: the share and the secret beside it
    share: Path
    secret: Path
    secret_text: str
    cache: Path


def _user(name: str) -> HostUser:
    entry = pwd.getpwnam(name)
    return HostUser(name, entry.pw_uid, entry.pw_gid)


def _paths_in(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _paths_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _paths_in(item)


def _private_cache(guest: Guest, cache: Path, user: HostUser) -> None:
    """A cache of the user's own holding the warm guest (the built kernel and initramfs,
    with the pointer that names them), so that user boots it offline."""
    root_cache = Path(os.environ["VMRUN_CACHE_DIR"])
    text = _pointer(root_cache, guest.arch).read_text()
    for name in _paths_in(json.loads(text).get("built", {})):
        source = Path(name)
        if source.is_relative_to(root_cache) and source.is_file():
            target = cache / source.relative_to(root_cache)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    pointer = _pointer(cache, guest.arch)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(text.replace(str(root_cache), str(cache)))
    for directory, _, files in os.walk(cache):
        for entry in (directory, *(os.path.join(directory, f) for f in files)):
            os.chown(entry, user.uid, user.gid)


@pytest.fixture
def setup_for(guest: Guest) -> Iterator[object]:
    made: list[Path] = []

    def make(user: HostUser) -> Setup:
        # Under /tmp with open parents: the ordinary user must reach it.
        base = Path(tempfile.mkdtemp(prefix="vmrun-escape-", dir="/tmp"))
        made.append(base)
        base.chmod(0o755)
        share = base / "share"
        share.mkdir()
        secret = base / "secret"
        text = f"host-secret-{secrets.token_hex(8)}\n"
        secret.write_text(text)
        secret.chmod(0o666)  # the user may write it: only an escape can change it
        cache = base / "cache"
        if user != ROOT:
            _private_cache(guest, cache, user)
        for path in (base, share, secret):
            os.chown(path, user.uid, user.gid)
        return Setup(base, share, secret, text, cache)

    yield make
    for base in made:
        shutil.rmtree(base, ignore_errors=True)


def _run(setup: Setup, user: HostUser, via: str) -> subprocess.CompletedProcess[bytes]:
    env = vmrun_env()
    env["SECRET"] = str(setup.secret)
    argv = vmrun_argv("--share-via", via, "--env", "SECRET", "--", "sh", "-c", ATTEMPTS)
    if user != ROOT:
        env.update(HOME=str(setup.base), VMRUN_CACHE_DIR=str(setup.cache))
        env.pop("VMRUN_RUNS_DIR", None)
        argv = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
                *argv]
    return subprocess.run(argv, cwd=setup.share, env=env, capture_output=True,
                          timeout=400, check=False)


def _leftovers(share: Path, user: HostUser) -> list[str]:
    """Everything in SHARE a guest must not be able to leave on the host."""
    found = []
    for directory, dirs, files in os.walk(share):
        for name in (*dirs, *files):
            path = Path(directory, name)
            st = path.lstat()
            where = str(path.relative_to(share))
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                found.append(f"{where}: mode {stat.filemode(st.st_mode)}")
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                found.append(f"{where}: device node {stat.filemode(st.st_mode)}")
            if (st.st_uid, st.st_gid) != (user.uid, user.gid):
                found.append(f"{where}: owned by {st.st_uid}:{st.st_gid}")
    return found


def _virtiofs_needs_root() -> bool:
    daemon = find_virtiofsd()
    return daemon is not None and daemon.startswith("/usr/lib/qemu")


@pytest.mark.parametrize("user_name", ["root", "nobody"])
@pytest.mark.parametrize("via", ["9p", "virtiofs"])
def test_guest_cannot_escape_the_share(setup_for: object, via: str, user_name: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("creating the test's users and files needs root")
    if via == "virtiofs" and find_virtiofsd() is None:
        pytest.skip("no virtiofsd on this host")
    user = ROOT if user_name == "root" else _user(user_name)
    setup = setup_for(user)  # type: ignore[operator]
    done = _run(setup, user, via)
    if via == "virtiofs" and user != ROOT and _virtiofs_needs_root():
        # QEMU 7's C virtiofsd sandboxes itself with chroot/namespaces: root only.
        assert done.returncode == 125, done.stderr
        assert b"virtiofs" in done.stderr and b"root" in done.stderr
        return
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0 and "done-attempts" in out, (done.stdout, done.stderr)
    assert setup.secret_text.strip() not in out + done.stderr.decode(errors="replace")
    assert setup.secret.read_text() == setup.secret_text
    assert sorted(p.name for p in setup.base.iterdir()) == sorted(
        ["share", "secret", *(["cache"] if user != ROOT else [])])
    leftovers = _leftovers(setup.share, user)
    assert leftovers == [], "\n".join([*leftovers, out])
    # Normal use still works: files, exec bits, symlinks and FIFOs land as the user's own.
    assert (setup.share / "f-suid").read_text() == "x\n"
    assert stat.S_IMODE((setup.share / "f-exec").stat().st_mode) == 0o755
    assert os.readlink(setup.share / "link-dotdot") == "../secret"
    if via == "virtiofs":  # QEMU 7.2's 9p server answers ENXIO to every mknod, FIFOs too
        assert stat.S_ISFIFO((setup.share / "a-fifo").lstat().st_mode)
    assert "race-opens:" in out
