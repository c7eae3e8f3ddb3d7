"""The Debian cloud-style test images (amd64, arm64), made by vmrun's own builder.

Cloud-image sites are unreachable where vmrun is developed, so the tests make their own
images from Debian packages, the way `vmrun image build` does for users (vmrun.build: GPT,
GRUB for BIOS and UEFI, cloud-init and sshd). They are kept in the test cache's image
store under NAMES, keyed by their inputs and the archive's state, so a fresh clone on the
same machine builds nothing again. arm64's maintainer scripts run through qemu-user, which
`scripts/setup --dev` registers with binfmt_misc on an x86_64 host.

    python -m tests.cloudimage               # build (or find) it and print its path
    python -m tests.cloudimage --arch arm64  # the same for arm64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vmrun.build.image import build_image
from vmrun.errors import ImageError
from vmrun.qemu.arch import lookup_arch

NAMES = {"amd64": "test-cloud-amd64", "arm64": "test-cloud-arm64"}


class EmulationMissing(RuntimeError):
    """A foreign architecture's image cannot be built: no qemu-user registered for it."""


def _say(message: str) -> None:
    print(f"cloudimage: {message}", file=sys.stderr)


def ensure_cloud_image(cache: Path | None = None, *, mirror: str | None = None,
                       arch: str = "amd64") -> Path:
    """The test image's path, built first if the store lacks it (a few minutes; arm64's
    maintainer scripts run under qemu-user, which takes longer)."""
    if arch not in NAMES:
        raise ValueError(f"no test image recipe for {arch!r} (known: {', '.join(NAMES)})")
    try:
        built = build_image(NAMES[arch], arch=lookup_arch(arch), mirror=mirror, cache=cache,
                            notice=_say)
    except ImageError as err:
        if "binfmt_misc" in str(err):
            raise EmulationMissing(f"{err} ({err.hint})") from None
        raise
    return built.image.path


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cloudimage", description=__doc__)
    parser.add_argument("--cache", type=Path, help="cache directory (default vmrun's)")
    parser.add_argument("--arch", choices=sorted(NAMES), default="amd64",
                        help="Debian architecture of the image (default amd64)")
    args = parser.parse_args()
    print(ensure_cloud_image(args.cache, arch=args.arch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
