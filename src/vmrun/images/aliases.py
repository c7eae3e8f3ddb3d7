"""Well-known cloud images by short name: ubuntu:noble, debian:12 and friends.

Each alias maps, per architecture, to the publisher's "current" image and the checksum
file published beside it. A mirror (``--mirror`` or ``$VMRUN_IMAGE_MIRROR``) replaces the
publisher's prefix, so ``https://cloud-images.ubuntu.com/noble/current/...`` becomes
``MIRROR/noble/current/...`` and ``https://cloud.debian.org/images/cloud/bookworm/...``
becomes ``MIRROR/bookworm/...``.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from vmrun.errors import UsageError
from vmrun.qemu.arch import host_arch

UBUNTU_BASE = "https://cloud-images.ubuntu.com"
DEBIAN_BASE = "https://cloud.debian.org/images/cloud"

ARCHES = ("amd64", "arm64")
# Other spellings users type for the two architectures cloud images exist for.
_ARCH_SYNONYMS = {"x86_64": "amd64", "aarch64": "arm64"}


@dataclass(frozen=True)
class CloudImage:
    """Where one alias's image lives, relative to its publisher's base URL."""

    base: str
    image_path: str  # with {arch}
    checksums_path: str


def _ubuntu(codename: str) -> CloudImage:
    return CloudImage(
        base=UBUNTU_BASE,
        image_path=f"{codename}/current/{codename}-server-cloudimg-{{arch}}.img",
        checksums_path=f"{codename}/current/SHA256SUMS",
    )


def _debian(number: int, codename: str) -> CloudImage:
    return CloudImage(
        base=DEBIAN_BASE,
        image_path=f"{codename}/latest/debian-{number}-genericcloud-{{arch}}.qcow2",
        checksums_path=f"{codename}/latest/SHA512SUMS",
    )


ALIASES: dict[str, CloudImage] = {
    "ubuntu:noble": _ubuntu("noble"),
    "ubuntu:jammy": _ubuntu("jammy"),
    "debian:12": _debian(12, "bookworm"),
    "debian:bookworm": _debian(12, "bookworm"),
    "debian:13": _debian(13, "trixie"),
    "debian:trixie": _debian(13, "trixie"),
}


def default_arch() -> str:
    """The cloud-image architecture of this host: amd64 or arm64 (else the host's name)."""
    machine = host_arch()
    return _ARCH_SYNONYMS.get(machine, machine)


def normalize_arch(arch: str) -> str:
    """ARCH as the publishers spell it (x86_64 -> amd64); UsageError if none publish it."""
    name = _ARCH_SYNONYMS.get(arch.lower(), arch.lower())
    if name not in ARCHES:
        raise UsageError(
            f"no cloud images for architecture {arch!r}",
            hint=f"choose --arch from {', '.join(ARCHES)}",
        )
    return name


def is_alias(source: str) -> bool:
    """Whether SOURCE names an alias rather than a URL."""
    return "://" not in source


def resolve_alias(alias: str, arch: str, mirror: str | None) -> tuple[str, str]:
    """(image URL, checksums URL) of ALIAS for ARCH, under MIRROR when one is given."""
    image = ALIASES.get(alias.lower())
    if image is None:
        raise UsageError(
            f"unknown image {alias!r}",
            hint=f"known images: {', '.join(sorted(ALIASES))}; or pass an http(s) URL",
        )
    base = image.base
    if mirror:
        parts = urllib.parse.urlsplit(mirror)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UsageError(f"mirror {mirror!r} is not an http(s) URL")
        base = mirror.rstrip("/")
    image_url = f"{base}/{image.image_path.format(arch=normalize_arch(arch))}"
    return image_url, f"{base}/{image.checksums_path}"
