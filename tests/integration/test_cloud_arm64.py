"""An arm64 cloud image booted in full: AAVMF (edk2) firmware, the image's own GRUB
(EFI/BOOT/BOOTAA64.EFI), kernel, systemd and cloud-init, and the command over SSH.

The image is tests/cloudimage.py's arm64 variant, built from Debian packages once and
cached (mmdebstrap runs its maintainer scripts through qemu-user on an x86_64 host: about
14 minutes on 2 cores). An aarch64 full boot under TCG takes over a minute (70 s to the
command there), so this module boots once.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.cloudimage import EmulationMissing, ensure_cloud_image
from tests.integration.vmtools import run_cli

pytestmark = pytest.mark.vm

# Seconds. Firmware, GRUB, the kernel and systemd up to sshd take 70 s under TCG on a
# 2-core x86_64 host; the limits leave room for a CI machine ten times slower.
BOOT_TIMEOUT = 900
RUN_TIMEOUT = 1200
PHASES = ("prepare", "booting", "port ready", "sshd started", "ssh ready", "command",
          "power-off")


@pytest.fixture(scope="session")
def arm64_image() -> Path:
    """The arm64 test image, built (minutes, far more under emulation) or found cached."""
    t = time.monotonic()
    try:
        image = ensure_cloud_image(arch="arm64")
    except EmulationMissing as e:  # scripts/setup warned: a container that forbids it
        pytest.skip(str(e))
    print(f"arm64 test image ready in {time.monotonic() - t:.0f}s: {image}")
    return image


def phase_times(stderr: str) -> dict[str, float]:
    """The `vmrun: PHASE: 1.234s` lines of a --verbose run, by phase."""
    return {name: float(seconds) for name, seconds
            in re.findall(r"^vmrun: ([a-z -]+): ([0-9.]+)s$", stderr, re.MULTILINE)}


def test_aarch64_full_boot_through_uefi(arm64_image: Path, tmp_path: Path) -> None:
    done = run_cli("--arch", "aarch64", "--image", str(arm64_image), "--boot", "full",
                   "--share", "none", "--verbose", "--boot-timeout", str(BOOT_TIMEOUT),
                   "--", "sh", "-c", "uname -m; exit 3", cwd=tmp_path, timeout=RUN_TIMEOUT)
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 3, err[-3000:]
    assert done.stdout == b"aarch64\n"
    # The image has an EFI system partition only; aarch64 has no BIOS to fall back to.
    assert re.search(r"^vmrun: firmware: uefi; qemu argv: \S*qemu-system-aarch64 ", err,
                     re.MULTILINE), err[-3000:]
    assert "if=pflash" in err and "AAVMF" in err
    times = phase_times(err)
    assert set(PHASES) <= set(times), err[-3000:]
    up = sum(times[name] for name in PHASES[:PHASES.index("ssh ready") + 1])
    print(f"aarch64 full boot: command started after {up:.1f}s, "
          f"{sum(times.values()):.1f}s in all: {times}")
