"""The guest's reseed helper, run for real under qemu-user against the host's
/dev/urandom: it issues RNDRESEEDCRNG on fd 0 and exits with the errno."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vmrun.guest import reseed
from vmrun.qemu.arch import ARCHES, host_arch

ENOTTY = 25
EPERM = 1


# qemu-user's names where they differ from vmrun's.
USER_NAMES = {"armv7": "arm"}


def runner(arch: str) -> list[str]:
    if arch == host_arch():
        return []
    name = USER_NAMES.get(arch, arch)
    user = shutil.which(f"qemu-{name}-static") or shutil.which(f"qemu-{name}")
    if user is None:
        pytest.skip(f"no qemu-{arch}-static (qemu-user-static) here")
    return [user]


def run_helper(arch: str, tmp_path: Path, stdin: str) -> int:
    program = tmp_path / f"vmrun-reseed-{arch}"
    program.write_bytes(reseed.helper(arch) or b"")
    program.chmod(0o755)
    with open(stdin, "rb") as source:
        return subprocess.run([*runner(arch), str(program)], stdin=source,
                              timeout=60).returncode


@pytest.mark.parametrize("arch", sorted(reseed.TARGETS))
def test_the_helper_reseeds_the_hosts_generator(arch: str, tmp_path: Path) -> None:
    allowed = os.geteuid() == 0  # CAP_SYS_ADMIN, as the guest's agent has it
    assert run_helper(arch, tmp_path, "/dev/urandom") == (0 if allowed else EPERM)


@pytest.mark.parametrize("arch", sorted(reseed.TARGETS))
def test_the_helper_says_when_fd_0_is_no_random_device(arch: str, tmp_path: Path) -> None:
    # The right request on the wrong device: ENOTTY (a wrong request number on
    # /dev/urandom would give EINVAL, which the test above would see).
    assert run_helper(arch, tmp_path, "/dev/null") == ENOTTY


@pytest.mark.parametrize("arch", sorted(reseed.TARGETS))
def test_the_helper_is_a_static_executable_of_its_architecture(arch: str) -> None:
    image = reseed.helper(arch)
    assert image is not None
    target = reseed.TARGETS[arch]
    end = ">" if target.big_endian else "<"
    assert image[:4] == b"\x7fELF" and image[4] == (2 if target.bits == 64 else 1)
    e_type, e_machine = struct.unpack_from(end + "HH", image, 16)
    assert (e_type, e_machine) == (2, target.machine)
    if target.bits == 64:
        (entry,) = struct.unpack_from(end + "Q", image, 24)
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            end + "IIQQQQ", image, 64)
    else:
        (entry,) = struct.unpack_from(end + "I", image, 24)
        p_type, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(end + "IIIII",
                                                                          image, 52)
    assert entry == reseed.LOAD_ADDRESS + len(image) - len(target.code)
    assert (p_type, p_offset, p_vaddr, p_filesz) == (1, 0, reseed.LOAD_ADDRESS, len(image))


def test_every_architecture_has_a_helper() -> None:
    assert set(reseed.TARGETS) == set(ARCHES)
    assert reseed.helper("sparc64") is None
