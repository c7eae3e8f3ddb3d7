"""OCI images as root file systems: references, registry pulls, flattened squashfs roots."""

from __future__ import annotations

from typing import Any

# Imported when first used: the registry client (http.client, the layer readers) costs
# every plain `vmrun -- CMD` tens of milliseconds at start-up, and it needs none of it.
_LAZY = {
    "ImageConfig": "vmrun.oci.manifest", "Platform": "vmrun.oci.manifest",
    "platforms_for": "vmrun.oci.manifest", "RootImage": "vmrun.oci.pull",
    "ensure_root_image": "vmrun.oci.pull", "ArchiveRef": "vmrun.oci.reference",
    "ImageRef": "vmrun.oci.reference", "LayoutRef": "vmrun.oci.reference",
    "RegistryRef": "vmrun.oci.reference", "is_image_reference": "vmrun.oci.reference",
    "parse_reference": "vmrun.oci.reference",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vmrun.oci' has no attribute {name!r}")


__all__ = sorted(_LAZY)
