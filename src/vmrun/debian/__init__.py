"""Fetching and unpacking packages from the Debian archive."""

from __future__ import annotations

import os

DEFAULT_MIRROR = "http://deb.debian.org/debian"


def mirror_from_env() -> str:
    """$VMRUN_DEBIAN_MIRROR, else DEFAULT_MIRROR."""
    return os.environ.get("VMRUN_DEBIAN_MIRROR") or DEFAULT_MIRROR
