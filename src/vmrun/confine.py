"""The seccomp filter QEMU and virtiofsd run under: what a guest asks of the share stays safe."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys
from dataclasses import dataclass

# Classic BPF, as seccomp reads it (linux/filter.h, linux/seccomp.h).
BPF_LD_W_ABS = 0x20
BPF_ALU_AND_K = 0x54
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_RET_K = 0x06
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
NR_OFFSET = 0
ARCH_OFFSET = 4
ARGS_OFFSET = 16

S_IFMT = 0o170000
S_IFCHR = 0o020000
S_IFBLK = 0o060000
SET_ID_BITS = 0o6000  # S_ISUID | S_ISGID
O_CREAT = 0o100
O_TMPFILE_BIT = 0o20000000
ANY_ID = 0xFFFFFFFF  # (uid_t)-1: "leave it as it is"
X32_SYSCALL_BIT = 0x40000000
FCHMODAT2 = 452


@dataclass(frozen=True)
class SyscallTable:
    audit_arch: int
    numbers: dict[str, int]
    x32_bit: bool = False


# Only the calls the filter looks at. The generic table (aarch64, riscv64) has no
# chmod/open/mknod/chown: the *at forms cover them.
_GENERIC = {
    "fchmod": 52, "fchmodat": 53, "openat": 56, "openat2": 437, "mknodat": 33,
    "fchownat": 54, "fchown": 55, "setregid": 143, "setgid": 144, "setreuid": 145,
    "setuid": 146, "setresuid": 147, "setresgid": 149, "setfsuid": 151, "setfsgid": 152,
    "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7,
}
TABLES = {
    "x86_64": SyscallTable(0xC000003E, {
        "chmod": 90, "fchmod": 91, "fchmodat": 268, "open": 2, "openat": 257, "creat": 85,
        "openat2": 437, "mknod": 133, "mknodat": 259, "chown": 92, "fchown": 93,
        "lchown": 94, "fchownat": 260, "setuid": 105, "setgid": 106, "setreuid": 113,
        "setregid": 114, "setresuid": 117, "setresgid": 119, "setfsuid": 122,
        "setfsgid": 123, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190,
    }, x32_bit=True),
    "aarch64": SyscallTable(0xC00000B7, _GENERIC),
    "riscv64": SyscallTable(0xC00000F3, _GENERIC),
}


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _ret(action: int) -> bytes:
    return _insn(BPF_RET_K, action)


def _deny(err: int) -> bytes:
    return _ret(SECCOMP_RET_ERRNO | err)


ALLOW = _ret(SECCOMP_RET_ALLOW)


def _load_arg(index: int) -> bytes:
    # The low 32 bits: modes, flags and ids are 32-bit values in a 64-bit slot.
    low = 0 if sys.byteorder == "little" else 4
    return _insn(BPF_LD_W_ABS, ARGS_OFFSET + 8 * index + low)


def _deny_bits(arg: int, bits: int) -> list[bytes]:
    """EPERM when ARG has any of BITS set."""
    return [_load_arg(arg), _insn(BPF_ALU_AND_K, bits), _insn(BPF_JEQ_K, 0, 0, 1), ALLOW,
            _deny(errno.EPERM)]


def _deny_create_bits(flags: int, mode: int) -> list[bytes]:
    """An open that creates a file with the set-id bits in its mode: EPERM."""
    return [_load_arg(flags), _insn(BPF_ALU_AND_K, O_CREAT | O_TMPFILE_BIT),
            _insn(BPF_JEQ_K, 0, 0, 1), ALLOW, *_deny_bits(mode, SET_ID_BITS)]


def _deny_devices(mode: int) -> list[bytes]:
    """Device nodes (character or block) refused; FIFOs, sockets and files allowed."""
    return [_load_arg(mode), _insn(BPF_ALU_AND_K, S_IFMT), _insn(BPF_JEQ_K, S_IFCHR, 2, 0),
            _insn(BPF_JEQ_K, S_IFBLK, 1, 0), ALLOW, _deny(errno.EPERM)]


def _only_own_ids(args: tuple[int, ...], own: int) -> list[bytes]:
    """Each of ARGS is -1 or OWN: no file or thread takes another user's id."""
    out: list[bytes] = []
    for arg in args:
        # Neither -1 nor OWN jumps to the denial after the remaining checks and the ALLOW.
        to_deny = 3 * (len(args) - len(out) // 3 - 1) + 1
        out += [_load_arg(arg), _insn(BPF_JEQ_K, ANY_ID, 1, 0),
                _insn(BPF_JEQ_K, own, 0, to_deny)]
    return [*out, ALLOW, _deny(errno.EPERM)]


def _rules(table: SyscallTable, uid: int, gid: int) -> list[tuple[str, list[bytes]]]:
    set_id = (_deny_bits(1, SET_ID_BITS), _deny_bits(2, SET_ID_BITS))
    rules = [
        ("chmod", set_id[0]), ("fchmod", set_id[0]), ("fchmodat", set_id[1]),
        ("open", _deny_create_bits(1, 2)), ("openat", _deny_create_bits(2, 3)),
        ("creat", set_id[0]),
        # openat2's flags sit behind a pointer the filter cannot read: callers fall back.
        ("openat2", [_deny(errno.ENOSYS)]),
        ("mknod", _deny_devices(1)), ("mknodat", _deny_devices(2)),
        ("chown", _ids(uid, gid, 1)), ("lchown", _ids(uid, gid, 1)),
        ("fchown", _ids(uid, gid, 1)), ("fchownat", _ids(uid, gid, 2)),
        ("setuid", _only_own_ids((0,), uid)), ("setgid", _only_own_ids((0,), gid)),
        ("setreuid", _only_own_ids((0, 1), uid)), ("setregid", _only_own_ids((0, 1), gid)),
        ("setresuid", _only_own_ids((0, 1, 2), uid)),
        ("setresgid", _only_own_ids((0, 1, 2), gid)),
        ("setfsuid", _only_own_ids((0,), uid)), ("setfsgid", _only_own_ids((0,), gid)),
        # A name is behind a pointer too; security.capability would make a host binary
        # privileged, so no extended attribute is set at all ("not supported").
        ("setxattr", [_deny(errno.EOPNOTSUPP)]), ("lsetxattr", [_deny(errno.EOPNOTSUPP)]),
        ("fsetxattr", [_deny(errno.EOPNOTSUPP)]),
    ]
    numbered = [(name, body) for name, body in rules if name in table.numbers]
    return [*numbered, ("fchmodat2", set_id[1])]


def _ids(uid: int, gid: int, first: int) -> list[bytes]:
    """chown's uid at FIRST and gid after it: each -1 or vmrun's own."""
    uid_check = [_load_arg(first), _insn(BPF_JEQ_K, ANY_ID, 1, 0),
                 _insn(BPF_JEQ_K, uid, 0, 4)]
    gid_check = [_load_arg(first + 1), _insn(BPF_JEQ_K, ANY_ID, 1, 0),
                 _insn(BPF_JEQ_K, gid, 0, 1)]
    return [*uid_check, *gid_check, ALLOW, _deny(errno.EPERM)]


def filter_program(table: SyscallTable, uid: int, gid: int) -> bytes:
    """The filter for a process running as UID:GID, as an array of struct sock_filter."""
    out = [_insn(BPF_LD_W_ABS, ARCH_OFFSET),
           _insn(BPF_JEQ_K, table.audit_arch, 1, 0), _deny(errno.EPERM),
           _insn(BPF_LD_W_ABS, NR_OFFSET)]
    if table.x32_bit:
        out += [_insn(BPF_JGE_K, X32_SYSCALL_BIT, 0, 1), _deny(errno.EPERM)]
    for name, body in _rules(table, uid, gid):
        number = FCHMODAT2 if name == "fchmodat2" else table.numbers[name]
        # Not this call: skip its body, and reload the number it clobbered.
        out += [_insn(BPF_JEQ_K, number, 0, len(body)), *body]
        out.append(_insn(BPF_LD_W_ABS, NR_OFFSET))
    out.append(ALLOW)
    return b"".join(out)


def host_table() -> SyscallTable | None:
    if sys.platform != "linux":
        return None
    return TABLES.get(platform.machine().lower().replace("amd64", "x86_64")
                      .replace("arm64", "aarch64"))


def install(program: bytes) -> None:
    """Install PROGRAM on this process and everything it starts; OSError if refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    count = len(program) // 8
    buffer = ctypes.create_string_buffer(program, len(program))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(count, ctypes.addressof(buffer))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.prctl(
            PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def confine() -> None:
    """In a child between fork and exec: install the filter, or end the child with a line
    in its log, since a file server without it could leave setuid files on the host."""
    table = host_table()
    if table is None:
        return  # no seccomp here (macOS) or a host without a syscall table above
    try:
        install(filter_program(table, os.geteuid(), os.getegid()))
    except OSError as exc:
        os.write(2, f"vmrun: cannot install the seccomp filter: {exc.strerror}\n".encode())
        os._exit(126)
