"""OCI images as root file systems: references, registry pulls, flattened squashfs roots."""

from vmrun.oci.manifest import ImageConfig, Platform, platforms_for
from vmrun.oci.pull import RootImage, ensure_root_image
from vmrun.oci.reference import (
    ArchiveRef,
    ImageRef,
    LayoutRef,
    RegistryRef,
    is_image_reference,
    parse_reference,
)

__all__ = [
    "ArchiveRef",
    "ImageConfig",
    "ImageRef",
    "LayoutRef",
    "Platform",
    "RegistryRef",
    "RootImage",
    "ensure_root_image",
    "is_image_reference",
    "parse_reference",
    "platforms_for",
]
