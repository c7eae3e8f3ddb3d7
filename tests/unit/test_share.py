from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vmrun import confine, share
from vmrun.errors import UsageError
from vmrun.qemu.arch import lookup_arch
from vmrun.qemu.argv import ShareKind
from vmrun.spec import Share

C_DAEMON = "/usr/lib/qemu/virtiofsd"
RUST_DAEMON = "/usr/libexec/virtiofsd"

# Each attempt a guest may ask of a file server, run in a child under the filter; it
# prints the errno name it got, or "ok".
PROBE = r"""
import errno, os, sys
os.chdir(sys.argv[1])
def attempt(name, call):
    try:
        call()
        print(name, "ok")
    except OSError as exc:
        print(name, errno.errorcode[exc.errno])
open("plain", "w").close()
attempt("chmod-4755", lambda: os.chmod("plain", 0o4755))
attempt("chmod-2755", lambda: os.chmod("plain", 0o2755))
attempt("chmod-755", lambda: os.chmod("plain", 0o755))
attempt("fchmod-4755", lambda: os.fchmod(os.open("plain", os.O_RDONLY), 0o4755))
attempt("create-6755", lambda: os.close(os.open("made-suid", os.O_CREAT | os.O_WRONLY, 0o6755)))
attempt("create-644", lambda: os.close(os.open("made", os.O_CREAT | os.O_WRONLY, 0o644)))
attempt("open-existing", lambda: os.close(os.open("plain", os.O_RDONLY, 0o6755)))
attempt("mknod-char", lambda: os.mknod("dev-char", 0o644 | 0o020000, os.makedev(1, 3)))
attempt("mknod-block", lambda: os.mknod("dev-block", 0o644 | 0o060000, os.makedev(7, 0)))
attempt("mkfifo", lambda: os.mkfifo("fifo"))
attempt("chown-other", lambda: os.chown("plain", 1234, 1234))
attempt("chown-gid-other", lambda: os.chown("plain", -1, 1234))
attempt("chown-own", lambda: os.chown("plain", os.geteuid(), os.getegid()))
attempt("chown-keep", lambda: os.chown("plain", -1, -1))
attempt("setresuid-other", lambda: os.setresuid(-1, 1234, -1))
attempt("setresuid-own", lambda: os.setresuid(-1, os.geteuid(), -1))
attempt("setxattr", lambda: os.setxattr("plain", "security.capability", b"\x01" * 20))
attempt("setxattr-user", lambda: os.setxattr("plain", "user.x", b"1"))
"""


def run_probe(tmp_path: Path) -> dict[str, str]:
    table = confine.host_table()
    if table is None:
        pytest.skip("no seccomp syscall table for this host")
    program = confine.filter_program(table, os.geteuid(), os.getegid())
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)],
                          preexec_fn=lambda: confine.install(program),
                          capture_output=True, text=True, timeout=60, check=True)
    return dict(line.split() for line in done.stdout.splitlines())


def test_filter_refuses_set_id_modes_devices_and_foreign_ids(tmp_path: Path) -> None:
    got = run_probe(tmp_path)
    refused = {"chmod-4755", "chmod-2755", "fchmod-4755", "create-6755", "mknod-char",
               "mknod-block", "chown-other", "chown-gid-other", "setresuid-other"}
    assert {name: got[name] for name in refused} == dict.fromkeys(refused, "EPERM")
    assert got["setxattr"] == got["setxattr-user"] == errno.errorcode[errno.EOPNOTSUPP]
    # What normal use needs still works: exec bits, plain files, FIFOs, own ids.
    for name in ("chmod-755", "create-644", "open-existing", "mkfifo", "chown-own",
                 "chown-keep", "setresuid-own"):
        assert got[name] == "ok", name
    assert not (tmp_path / "made-suid").exists()
    assert not (tmp_path / "dev-char").exists() and not (tmp_path / "dev-block").exists()
    plain = (tmp_path / "plain").stat()
    assert stat.S_IMODE(plain.st_mode) == 0o755
    assert (plain.st_uid, plain.st_gid) == (os.geteuid(), os.getegid())
    assert stat.S_ISFIFO((tmp_path / "fifo").lstat().st_mode)


def test_filter_is_inherited_by_the_file_servers_children(tmp_path: Path) -> None:
    # QEMU and virtiofsd start threads and may exec helpers: the filter follows them.
    table = confine.host_table()
    if table is None:
        pytest.skip("no seccomp syscall table for this host")
    program = confine.filter_program(table, os.geteuid(), os.getegid())
    target = tmp_path / "f"
    target.touch()
    done = subprocess.run(["sh", "-c", f"chmod 4755 {target}"],
                          preexec_fn=lambda: confine.install(program),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0 and "not permitted" in done.stderr
    assert not target.stat().st_mode & stat.S_ISUID


def test_foreign_architecture_calls_are_refused() -> None:
    table = confine.TABLES["x86_64"]
    program = confine.filter_program(table, 0, 0)
    first = [program[i:i + 8] for i in range(0, 24, 8)]
    # Load the arch, go on only for the host's own, else EPERM.
    assert first[0] == confine._insn(confine.BPF_LD_W_ABS, confine.ARCH_OFFSET)
    assert first[1] == confine._insn(confine.BPF_JEQ_K, table.audit_arch, 1, 0)
    assert first[2] == confine._deny(errno.EPERM)
    assert len(program) % 8 == 0 and len(program) // 8 < 4096


def test_c_virtiofsd_argv_is_chrooted_without_xattrs_or_privileged_caps() -> None:
    argv = share.virtiofsd_argv(C_DAEMON, 7, Path("/work/dir"), 0)
    assert argv == [C_DAEMON, "--fd=7", "-o", "source=/work/dir", "-o", "cache=auto",
                    "-o", "sandbox=chroot", "-o", "no_xattr",
                    "-o", "modcaps=-mknod:-setfcap:-fsetid:-chown"]


def test_rust_virtiofsd_is_sandboxed_never_none() -> None:
    as_root = share.virtiofsd_argv(RUST_DAEMON, 7, Path("/w"), 0)
    as_user = share.virtiofsd_argv(RUST_DAEMON, 7, Path("/w"), 1000)
    assert as_root[-2:] == ["--sandbox", "chroot"]
    assert as_user[-2:] == ["--sandbox", "namespace"]
    assert "none" not in as_root + as_user


def test_virtiofs_as_non_root_with_the_c_daemon_is_a_usage_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(share, "find_virtiofsd", lambda: C_DAEMON)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    arch = lookup_arch("x86_64")
    with pytest.raises(UsageError, match="runs as root only"):
        share.choose_share_kind(Share.RW, "virtiofs", arch)
    assert share.choose_share_kind(Share.RW, "auto", arch) == ShareKind.NINEP
    monkeypatch.setattr(share, "find_virtiofsd", lambda: RUST_DAEMON)
    assert share.choose_share_kind(Share.RW, "virtiofs", arch) == ShareKind.VIRTIOFS
