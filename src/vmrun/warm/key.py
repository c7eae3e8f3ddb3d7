"""What shapes a template, and the key it is stored under."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from vmrun import __version__
from vmrun import cache as cachelib
from vmrun.qemu import process

# Bumped whenever how a template is made or restored changes (agent protocol, argv).
RECIPE = "2"


@dataclass(frozen=True)
class Shape:
    """Everything a template depends on: a restore with any of it different is refused."""

    arch: str
    accel: str
    cpus: int
    memory_mib: int
    share: str  # "9p" or "none": the device, never the path (9p's path is not device state)
    net: bool
    tty: bool
    # The block device's kind: "" none, "overlay" (a disk image's per-run qcow2 overlay,
    # read-write) or "root-image" (an OCI image's squashfs, read-only). Never the file:
    # each run attaches its own under the same drive id, and a template is taken before
    # the guest binds a driver to the device, so it holds nothing read from it.
    disk: str
    guest: str  # content key of the kernel and initramfs (vmrun.guest.build.Guest.key)
    kernel: str
    initrd: str
    cmdline: str  # holds the TSC rate an x86 guest under TCG is told
    tsc_khz: int | None
    host_cpu: str  # KVM/HVF: the host CPU's model and flags (-cpu host); "" under TCG
    qemu: str
    qemu_version: str
    qemu_identity: str  # inode, size and mtime of the binary
    sandbox: bool
    volumes: int = 0  # how many more 9p devices (-v): no paths, as for share
    vmrun: str = __version__
    recipe: str = RECIPE

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def template_key(shape: Shape) -> str:
    return cachelib.key_of("vmrun-template", json.dumps(shape.to_json(), sort_keys=True))[:32]


def binary_identity(path: str) -> str:
    try:
        info = os.stat(path)
    except OSError:
        return ""
    return f"{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"


def qemu_version_cached(qemu: str) -> str:
    """QEMU's version, asked once per binary (a process start costs tens of ms)."""
    record = cachelib.cache_dir() / "probes" / cachelib.key_of(
        "qemu-version", qemu, binary_identity(qemu))
    with contextlib.suppress(OSError):
        return record.read_text()
    version = process.qemu_version(qemu)
    with contextlib.suppress(OSError), cachelib.staged(record) as tmp:
        tmp.write_text(version)
    return version


def host_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """A digest of the first CPU's model and feature lines: -cpu host follows them."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "unknown"
    first = text.split("\n\n", 1)[0]
    wanted = [line for line in first.splitlines()
              if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part",
                                                "cpu", "vendor_id")]
    return hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:16]
