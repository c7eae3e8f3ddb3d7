"""--kernel with real VMs: Debian's own kernel given back to vmrun as a kernel of the user's,
with its modules tree (it runs), and without it (the agent names what is missing)."""

from __future__ import annotations

import secrets
import shutil
import time
from pathlib import Path

import pytest

from tests.integration.vmtools import run_cli
from vmrun.guest.build import Guest, ensure_guest
from vmrun.qemu.arch import lookup_arch

pytestmark = pytest.mark.vm

# Ceilings for a busy 2-core host under TCG, never measurements: a boot takes 5-10 s here.
RUN_CEILING = 240
# The agent reports within a second of starting; the boot timeout (180 s under TCG) is the
# slow path this must stay well clear of.
MISSING_CEILING = 90.0


def kernel_files(guest: Guest) -> tuple[Path, Path]:
    """The Debian kernel's bzImage/Image and the tree that holds its lib/modules."""
    directory = guest.kernel.parent
    return directory / "vmlinuz", directory / "root"


def test_debian_kernel_as_user_kernel(guest: Guest, workdir: Path) -> None:
    vmlinuz, modules = kernel_files(guest)
    marker = f"vmrun.test={secrets.token_hex(4)}"
    done = run_cli("--verbose", "--kernel", str(vmlinuz), "--modules", str(modules),
                   "--append", marker, "--", "sh", "-c", "uname -r; cat /proc/cmdline",
                   cwd=workdir, timeout=RUN_CEILING, env_extra={"VMRUN_KERNEL_APPEND": ""})
    assert done.returncode == 0, done.stderr
    release, cmdline = done.stdout.decode().splitlines()
    assert release == guest.release
    # --append comes after vmrun's own words.
    assert cmdline.endswith(marker), cmdline
    assert cmdline.index("rdinit=/init") < cmdline.index(marker)
    assert b"start: cold (--kernel boots cold" in done.stderr


def test_share_and_exit_code_through_user_kernel(guest: Guest, workdir: Path) -> None:
    vmlinuz, modules = kernel_files(guest)
    release_dir = next((modules / "lib/modules").iterdir())  # the other --modules form
    (workdir / "in.txt").write_text("from the host\n")
    done = run_cli("--kernel", str(vmlinuz), "--modules", str(release_dir), "--share-via",
                   "9p", "--", "sh", "-c", "cat in.txt; echo back > out.txt; exit 7",
                   cwd=workdir, timeout=RUN_CEILING)
    assert done.returncode == 7, done.stderr
    assert done.stdout == b"from the host\n"
    assert (workdir / "out.txt").read_text() == "back\n"


def test_debian_kernel_without_modules_names_missing_options(guest: Guest,
                                                             workdir: Path) -> None:
    vmlinuz, _ = kernel_files(guest)
    started = time.monotonic()
    done = run_cli("--kernel", str(vmlinuz), "--", "true", cwd=workdir,
                   timeout=RUN_CEILING)
    took = time.monotonic() - started
    assert done.returncode == 118, done.stderr
    # Debian builds virtio, virtio-mmio and virtio_console as modules.
    line = done.stderr.decode().splitlines()[0]
    assert "lacks CONFIG_VIRTIO_CONSOLE CONFIG_VIRTIO_MMIO" in line, done.stderr
    assert "--modules" in line
    assert took < MISSING_CEILING, f"{took:.1f}s: reported by the boot timeout, not the agent"


def test_missing_drivers_named_for_the_devices_attached(guest: Guest, tmp_path: Path) -> None:
    """A modules tree without 9p and virtio_net: a run that shares over 9p with a network
    hears which options are off; one with neither device needs none of them."""
    vmlinuz, modules = kernel_files(guest)
    tree = tmp_path / "mods"
    shutil.copytree(modules, tree, symlinks=True)
    kernel_dir = next((tree / "lib/modules").iterdir()) / "kernel"
    shutil.rmtree(kernel_dir / "net/9p")
    shutil.rmtree(kernel_dir / "fs/9p")
    (kernel_dir / "drivers/net/virtio_net.ko").unlink()
    work = tmp_path / "work"
    work.mkdir()
    done = run_cli("--kernel", str(vmlinuz), "--modules", str(tree), "--share-via", "9p",
                   "--", "true", cwd=work, timeout=RUN_CEILING)
    assert done.returncode == 118, done.stderr
    assert b"lacks CONFIG_VIRTIO_NET CONFIG_NET_9P_VIRTIO CONFIG_9P_FS" in done.stderr
    assert b"does not load" in done.stderr  # with --modules, the hint says why it may be
    plain = run_cli("--kernel", str(vmlinuz), "--modules", str(tree), "--share", "none",
                    "--net", "none", "--", "echo", "fine", cwd=work, timeout=RUN_CEILING)
    assert (plain.returncode, plain.stdout) == (0, b"fine\n"), plain.stderr


def test_wrong_arch_and_garbage_refused_before_boot(guest: Guest, tmp_path: Path) -> None:
    vmlinuz, _ = kernel_files(guest)
    wrong = run_cli("--arch", "aarch64", "--kernel", str(vmlinuz), "--", "true",
                    cwd=tmp_path, timeout=60)
    assert wrong.returncode == 118
    assert b"kernel for x86_64 (bzImage), not for aarch64: use --arch x86_64" in wrong.stderr
    junk = tmp_path / "bzImage"
    junk.write_bytes(b"#!/bin/sh\necho not a kernel\n")
    refused = run_cli("--kernel", str(junk), "--", "true", cwd=tmp_path, timeout=60)
    assert refused.returncode == 118
    assert b"is not a kernel vmrun knows" in refused.stderr


def test_aarch64_user_kernel(workdir: Path) -> None:
    arm = ensure_guest(lookup_arch("aarch64"))  # fetched on first use, a few seconds
    image, modules = kernel_files(arm)
    done = run_cli("--arch", "aarch64", "--kernel", str(image), "--modules", str(modules),
                   "--append", "vmrun.arm=1", "--share", "none", "--net", "none", "--",
                   "sh", "-c", "uname -rm; cat /proc/cmdline", cwd=workdir,
                   timeout=RUN_CEILING)
    assert done.returncode == 0, done.stderr
    uname, cmdline = done.stdout.decode().splitlines()
    assert uname == f"{arm.release} aarch64"
    assert cmdline.endswith("vmrun.arm=1")
