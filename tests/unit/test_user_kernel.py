"""--kernel, --modules, --append: kernel header detection, the modules directory forms, the
agent's "missing" line, and how the options reach the spec, the command line and warm."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import pytest

import vmrun.cli.run
from tests.unit.test_kernel import PVH_NOTES, bzimage, fake_kernel
from vmrun import machine
from vmrun.console import Serial
from vmrun.errors import KernelUnfit, UsageError
from vmrun.guest import userkernel
from vmrun.guest.kernelimage import KernelImage, bootable_for, identify, release_of
from vmrun.machine import Machine
from vmrun.qemu.arch import lookup_arch
from vmrun.spec import Boot, MachineSpec
from vmrun.warm import why_cold

README = Path(__file__).resolve().parents[2] / "README.md"
X86, ARM = lookup_arch("x86_64"), lookup_arch("aarch64")


def arm64_image(text_offset: int = 0) -> bytes:
    """An arm64 Image header (Documentation/arch/arm64/booting.rst) and some code."""
    header = bytearray(64)
    header[0:4] = b"MZ@\xfa"  # the EFI stub's "MZ" and a branch
    struct.pack_into("<QQQ", header, 8, text_offset, 1 << 20, 0xA)
    header[0x38:0x3C] = b"ARM\x64"
    return bytes(header) + b"\x1f\x20\x03\xd5" * 1024


def with_machine(elf: bytes, machine: int) -> bytes:
    return elf[:0x12] + struct.pack("<H", machine) + elf[0x14:]


def i386_bzimage() -> bytes:
    image = bytearray(bzimage(b"payload"))
    image[0x236] = 0  # no XLF_KERNEL_64: a 32-bit kernel
    return bytes(image)


def x86_64_bzimage() -> bytes:
    image = bytearray(bzimage(b"payload"))
    image[0x236] = 1
    return bytes(image)


# ---- what a file is ------------------------------------------------------------------

@pytest.mark.parametrize(("data", "fmt", "arch"), [
    (x86_64_bzimage(), "bzImage", "x86_64"),
    (i386_bzimage(), "bzImage", "i386"),
    (arm64_image(), "arm64 Image", "aarch64"),
    (fake_kernel(PVH_NOTES), "ELF vmlinux", "x86_64"),
    (with_machine(fake_kernel(b""), 183), "ELF vmlinux", "aarch64"),
    (fake_kernel(PVH_NOTES, is64=False), "ELF vmlinux", "i386"),
])
def test_identify(data: bytes, fmt: str, arch: str) -> None:
    image = identify(data)
    assert image is not None
    assert (image.format, image.arch) == (fmt, arch)


def test_identify_gzip_arm64_image() -> None:
    image = identify(gzip.compress(arm64_image()))
    assert image == KernelImage("arm64 Image", "aarch64", compressed=True)
    assert bootable_for(image, "aarch64") is None


def test_identify_pvh_note() -> None:
    with_note, without = identify(fake_kernel(PVH_NOTES)), identify(fake_kernel(b""))
    assert with_note is not None and with_note.pvh
    assert without is not None and not without.pvh


@pytest.mark.parametrize("data", [
    b"", b"hello world\n" * 100, bytes(1 << 16), b"\x7fELF",
    gzip.compress(b"not a kernel" * 100), b"\x1f\x8b garbage that is no gzip" * 10,
    b"#!/bin/sh\necho hi\n",
])
def test_identify_garbage(data: bytes) -> None:
    assert identify(data) is None


def test_bootable_matching_arch() -> None:
    for data, arch in ((x86_64_bzimage(), "x86_64"), (arm64_image(), "aarch64"),
                       (fake_kernel(PVH_NOTES), "x86_64")):
        image = identify(data)
        assert image is not None and bootable_for(image, arch) is None


@pytest.mark.parametrize(("data", "arch", "message"), [
    (arm64_image(), "x86_64", "kernel for aarch64 (arm64 Image), not for x86_64: use --arch "
                              "aarch64"),
    (x86_64_bzimage(), "aarch64", "use --arch x86_64"),
    (i386_bzimage(), "x86_64", "use --arch i386"),
    (fake_kernel(b""), "x86_64", "CONFIG_PVH"),
    (with_machine(fake_kernel(b""), 183), "aarch64", "give arch/arm64/boot/Image"),
])
def test_not_bootable(data: bytes, arch: str, message: str) -> None:
    image = identify(data)
    assert image is not None
    why = bootable_for(image, arch)
    assert why is not None and message in why


def test_efi_zboot_refused() -> None:
    data = bytearray(0x100)
    data[0:2], data[4:8] = b"MZ", b"zimg"
    struct.pack_into("<I", data, 0x3C, 0x80)
    data[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<H", data, 0x84, 0xAA64)
    image = identify(bytes(data))
    assert image == KernelImage("EFI zboot image", "aarch64")
    why = bootable_for(image, "aarch64")
    assert why is not None and "arch/arm64/boot/Image" in why


def test_release_of() -> None:
    image = x86_64_bzimage()
    assert release_of(image, KernelImage("bzImage", "x86_64")) == "6.1.0-test"
    elf = fake_kernel(PVH_NOTES) + b"%s version %s\0Linux version 6.9.0-rc1+ (me@host) #1\0"
    assert release_of(elf, KernelImage("ELF vmlinux", "x86_64")) == "6.9.0-rc1+"
    assert release_of(arm64_image(), KernelImage("arm64 Image", "aarch64")) is None


def test_identify_kernel_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel at all" * 100)
    with pytest.raises(KernelUnfit, match="is not a kernel vmrun knows") as info:
        userkernel.identify_kernel(junk, X86)
    assert info.value.exit_code == 118
    arm = tmp_path / "Image"
    arm.write_bytes(arm64_image())
    with pytest.raises(KernelUnfit, match="use --arch aarch64"):
        userkernel.identify_kernel(arm, X86)
    assert userkernel.identify_kernel(arm, ARM)[0].arch == "aarch64"
    with pytest.raises(UsageError, match="cannot read --kernel"):
        userkernel.identify_kernel(tmp_path / "absent", X86)
    with pytest.raises(UsageError, match="is a directory"):
        userkernel.identify_kernel(tmp_path, X86)


# ---- --modules ---------------------------------------------------------------------------

def release_dir(root: Path, release: str, under: str = "lib/modules") -> Path:
    path = root / under / release
    (path / "kernel/drivers").mkdir(parents=True)
    (path / "modules.dep").write_text("")
    return path


def test_modules_tree_root(tmp_path: Path) -> None:
    path = release_dir(tmp_path, "6.9.0")
    assert userkernel.modules_release_dir(tmp_path) == path
    assert userkernel.modules_release_dir(path) == path


def test_modules_usr_lib(tmp_path: Path) -> None:
    path = release_dir(tmp_path, "6.9.0", "usr/lib/modules")
    assert userkernel.modules_release_dir(tmp_path) == path


def test_modules_release_dir_without_modules_dep(tmp_path: Path) -> None:
    (tmp_path / "kernel").mkdir()
    assert userkernel.modules_release_dir(tmp_path) == tmp_path


def test_modules_several_releases(tmp_path: Path) -> None:
    release_dir(tmp_path, "6.8.0")
    wanted = release_dir(tmp_path, "6.9.0")
    assert userkernel.modules_release_dir(tmp_path, "6.9.0") == wanted
    with pytest.raises(UsageError, match="holds modules for 6.8.0, 6.9.0") as info:
        userkernel.modules_release_dir(tmp_path)
    assert info.value.hint is not None and "lib/modules/RELEASE" in info.value.hint
    with pytest.raises(UsageError, match="not for the kernel's 7.0"):
        userkernel.modules_release_dir(tmp_path, "7.0")


@pytest.mark.parametrize("make", ["empty", "file", "absent"])
def test_modules_not_a_tree(tmp_path: Path, make: str) -> None:
    path = tmp_path / "mods"
    if make == "empty":
        path.mkdir()
    elif make == "file":
        path.write_text("x")
    with pytest.raises(UsageError, match=f"--modules {re.escape(str(path))}"):
        userkernel.modules_release_dir(path)


def test_modules_for_another_kernel(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(x86_64_bzimage())  # announces 6.1.0-test
    release_dir(tmp_path / "mods", "6.9.0")
    with pytest.raises(UsageError, match="is for 6.9.0, but the kernel is 6.1.0-test"):
        userkernel.user_guest(kernel, X86, modules=tmp_path / "mods", mirror=None,
                              notice=lambda _: None, progress=None,
                              insecure_unverified_guest=False)


# ---- the agent's line, the error, the README --------------------------------------------

def test_missing_options_from_console() -> None:
    console = (b"[    0.5] random: crng init done\r\n"
               b"vmrun-agent: missing CONFIG_VIRTIO_CONSOLE CONFIG_VIRTIO_MMIO\r\n"
               b"reboot: Power down\r\n")
    assert userkernel.missing_options(console) == ("CONFIG_VIRTIO_CONSOLE",
                                                   "CONFIG_VIRTIO_MMIO")
    assert userkernel.missing_options(b"vmrun-agent: channel ports did not appear\n") == ()
    assert userkernel.missing_options(b"vmrun-agent: missing rm -rf /\n") == ()


def test_unfit_names_options_and_modules() -> None:
    error = userkernel.unfit(Path("/k"), ("CONFIG_A", "CONFIG_B"), modules=None)
    assert "lacks CONFIG_A CONFIG_B" in str(error) and "--modules DIR" in str(error)
    assert error.missing == ("CONFIG_A", "CONFIG_B") and error.exit_code == 118
    with_modules = userkernel.unfit(Path("/k"), ("CONFIG_A",), modules=Path("/m"))
    assert "does not load" in str(with_modules)


def test_readme_lists_every_required_option() -> None:
    section = README.read_text().split("## Your own kernel", 1)[1].split("\n## ", 1)[0]
    for arch in (X86, ARM):
        for option in userkernel.required_options(arch):
            assert option in section, option
    for option in ("CONFIG_VIRTIO_FS", "CONFIG_VIRTIO_PCI"):
        assert option in section


def test_agent_checks_only_when_asked() -> None:
    """The boot-time check runs for --kernel (vmrun.check) only: a normal boot pays one
    test of the command line; every option the agent can name is in the README."""
    agent = (Path(userkernel.__file__).parent / "agent.sh").read_text()
    calls = [line.strip() for line in agent.splitlines() if "check_kernel" in line
             and not line.strip().startswith(("#", "check_kernel()"))]
    assert calls == ['[ "${cmdline#* vmrun.check}" != "$cmdline" ] && check_kernel']
    section = README.read_text().split("## Your own kernel", 1)[1].split("\n## ", 1)[0]
    for option in set(re.findall(r"CONFIG_[A-Z0-9_]+", agent)):
        assert option in section, option


# ---- the spec, the command line, warm starts -------------------------------------------

def test_spec_rules() -> None:
    with pytest.raises(UsageError, match="--modules goes with --kernel"):
        MachineSpec(modules=Path("/m"))
    with pytest.raises(UsageError, match="--boot full"):
        MachineSpec(kernel=Path("/k"), boot=Boot.FULL, image="x.qcow2")
    with pytest.raises(UsageError, match="newline"):
        MachineSpec(kernel=Path("/k"), append="a\nb")
    assert MachineSpec(append="loglevel=7").append == "loglevel=7"


def test_cli_options() -> None:
    args = vmrun.cli.run.run_parser().parse_args(
        ["--kernel", "bzImage", "--append", "foo=1 bar", "--modules", "mods"])
    spec = vmrun.cli.run.machine_spec(args)
    assert (spec.kernel, spec.append, spec.modules) == (Path("bzImage"), "foo=1 bar",
                                                        Path("mods"))


def test_cmdline_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMRUN_KERNEL_APPEND", "from.env")
    user = Machine(MachineSpec(kernel=Path("/k"), append="loglevel=7"), notice=lambda _: None)
    assert user._cmdline_extra() == "vmrun.check from.env loglevel=7"
    monkeypatch.delenv("VMRUN_KERNEL_APPEND")
    assert Machine(MachineSpec(), notice=lambda _: None)._cmdline_extra() == ""


def test_user_kernel_boots_cold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMRUN_COLD", raising=False)
    spec = MachineSpec(kernel=Path("/k"))
    why = why_cold(spec, arch="x86_64", custom_guest=False, share_via="9p")
    assert why.startswith("--kernel boots cold")
    assert why_cold(MachineSpec(), arch="x86_64", custom_guest=False, share_via="9p") == ""



def test_machine_turns_the_agents_line_into_kernel_unfit(tmp_path: Path) -> None:
    line = b"\r\nvmrun-agent: missing CONFIG_VIRTIO_CONSOLE\r\n"
    user = MachineSpec(kernel=Path("/k"))
    serial = Serial(tmp_path / "serial.log")
    serial.feed(b"[ 0.1] booting\n")
    machine._check_kernel_fit(user, serial)  # nothing said yet: nothing raised
    serial.feed(line)
    with pytest.raises(KernelUnfit, match="lacks CONFIG_VIRTIO_CONSOLE") as info:
        machine._check_kernel_fit(user, serial)
    assert info.value.missing == ("CONFIG_VIRTIO_CONSOLE",)
    hint = machine._user_kernel_hint(user, lookup_arch("x86_64"))
    assert hint is not None and "CONFIG_VIRTIO_MMIO" in hint and "--console" in hint
    # vmrun's own kernel: the line means nothing, and no kernel hint is given.
    own = MachineSpec()
    serial = Serial(tmp_path / "own.log")
    serial.feed(line)
    machine._check_kernel_fit(own, serial)
    assert machine._user_kernel_hint(own, lookup_arch("x86_64")) is None
