"""The guest's reseed helper: a minimal static ELF per architecture, written here, that
makes Linux reseed its CRNG from its input pool (ioctl RNDRESEEDCRNG on fd 0)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

# A restored copy of a template must not go on drawing from its template's CRNG state. The
# agent writes host entropy to /dev/urandom (mixed into the input pool, never used by the
# CRNG until it reseeds), then runs `vmrun-reseed < /dev/urandom`; busybox has no way to
# issue the ioctl. The program is two system calls, assembled by hand below (each word's
# assembly beside it) so that no cross toolchain is needed:
#     r = ioctl(0, RNDRESEEDCRNG, 0); exit(r < 0 ? -r : r)
# Its exit status is the errno (0: reseeded; 1 EPERM without CAP_SYS_ADMIN; 25 ENOTTY when
# fd 0 is not a random device). tests/unit/test_reseed.py runs each under qemu-user.

# RNDRESEEDCRNG is _IO('R', 0x07): 0x5207, but 0x20005207 on powerpc, whose _IO has a
# direction field of 1 (_IOC_NONE). System call numbers: ioctl 16, 29 or 54; exit 60, 93, 1.
LOAD_ADDRESS = 0x400000


@dataclass(frozen=True)
class Target:
    machine: int  # e_machine
    big_endian: bool
    flags: int  # e_flags (ppc64le: ELF ABI v2, so the entry is code, not a descriptor)
    code: bytes
    bits: int = 64  # ELFCLASS64, or 32 for i386 and armv7

    @property
    def headers(self) -> int:
        """Bytes before the code: the ELF header and one program header."""
        return 64 + 56 if self.bits == 64 else 52 + 32


def _words(fmt: str, *words: int) -> bytes:
    return b"".join(struct.pack(fmt, word) for word in words)


TARGETS: dict[str, Target] = {
    "x86_64": Target(62, False, 0, bytes.fromhex(
        "31ff"          # xor edi, edi
        "be07520000"    # mov esi, 0x5207
        "31d2"          # xor edx, edx
        "b810000000"    # mov eax, 16 (ioctl)
        "0f05"          # syscall
        "f7d8"          # neg eax
        "89c7"          # mov edi, eax
        "b83c000000"    # mov eax, 60 (exit)
        "0f05"          # syscall
    )),
    "i386": Target(3, False, 0, bytes.fromhex(
        "31db"          # xor ebx, ebx
        "b907520000"    # mov ecx, 0x5207
        "31d2"          # xor edx, edx
        "b836000000"    # mov eax, 54 (ioctl)
        "cd80"          # int 0x80
        "f7d8"          # neg eax
        "89c3"          # mov ebx, eax
        "b801000000"    # mov eax, 1 (exit)
        "cd80"          # int 0x80
    ), bits=32),
    "armv7": Target(40, False, 0x05000000, _words(  # e_flags: EABI version 5
        "<I",
        0xE3A00000,  # mov r0, #0
        0xE3051207,  # movw r1, #0x5207
        0xE3A02000,  # mov r2, #0
        0xE3A07036,  # mov r7, #54 (ioctl)
        0xEF000000,  # svc #0
        0xE2600000,  # rsb r0, r0, #0
        0xE3A07001,  # mov r7, #1 (exit)
        0xEF000000,  # svc #0
    ), bits=32),
    "aarch64": Target(183, False, 0, _words(
        "<I",
        0xD2800000,  # movz x0, #0
        0xD28A40E1,  # movz x1, #0x5207
        0xD2800002,  # movz x2, #0
        0xD28003A8,  # movz x8, #29 (ioctl)
        0xD4000001,  # svc #0
        0xCB0003E0,  # neg x0, x0
        0xD2800BA8,  # movz x8, #93 (exit)
        0xD4000001,  # svc #0
    )),
    "riscv64": Target(243, False, 0x5, _words(  # e_flags: RVC, double-float ABI
        "<I",
        0x00000513,  # addi a0, zero, 0
        0x000055B7,  # lui a1, 0x5
        0x20758593,  # addi a1, a1, 0x207
        0x00000613,  # addi a2, zero, 0
        0x01D00893,  # addi a7, zero, 29 (ioctl)
        0x00000073,  # ecall
        0x40A00533,  # sub a0, zero, a0
        0x05D00893,  # addi a7, zero, 93 (exit)
        0x00000073,  # ecall
    )),
    "s390x": Target(22, True, 0, bytes.fromhex(
        "a7290000"      # lghi %r2, 0
        "a7395207"      # lghi %r3, 0x5207
        "a7490000"      # lghi %r4, 0
        "0a36"          # svc 54 (ioctl)
        "b9030022"      # lcgr %r2, %r2
        "0a01"          # svc 1 (exit)
    )),
    "ppc64le": Target(21, False, 2, _words(
        "<I",
        0x38000036,  # li r0, 54 (ioctl)
        0x38600000,  # li r3, 0
        0x3C802000,  # lis r4, 0x2000
        0x60845207,  # ori r4, r4, 0x5207
        0x38A00000,  # li r5, 0
        0x44000002,  # sc (an error: r3 = errno, CR0.SO set)
        0x38000001,  # li r0, 1 (exit)
        0x44000002,  # sc
    )),
}


def helper(arch: str) -> bytes | None:
    """The reseed program for ARCH (an Arch name); None where there is none."""
    target = TARGETS.get(arch)
    return None if target is None else elf(target)


def elf(target: Target) -> bytes:
    """A static ELF executable: one loadable segment holding the headers and the code."""
    end = ">" if target.big_endian else "<"
    size = target.headers + len(target.code)
    entry = LOAD_ADDRESS + target.headers
    ident = bytes([0x7F, *b"ELF", 2 if target.bits == 64 else 1,
                   2 if target.big_endian else 1, 1, 0]) + bytes(8)
    if target.bits == 64:
        header = struct.pack(end + "HHIQQQIHHHHHH", 2, target.machine, 1,  # ET_EXEC
                             entry, 64, 0, target.flags, 64, 56, 1, 0, 0, 0)
        program = struct.pack(end + "IIQQQQQQ", 1, 5,  # PT_LOAD, PF_R | PF_X
                              0, LOAD_ADDRESS, LOAD_ADDRESS, size, size, 0x10000)
    else:  # ELF32: the same fields, narrower, and p_flags after p_memsz
        header = struct.pack(end + "HHIIIIIHHHHHH", 2, target.machine, 1,
                             entry, 52, 0, target.flags, 52, 32, 1, 0, 0, 0)
        program = struct.pack(end + "IIIIIIII", 1, 0, LOAD_ADDRESS, LOAD_ADDRESS,
                              size, size, 5, 0x10000)
    return ident + header + program + target.code
