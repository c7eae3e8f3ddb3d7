"""What a run's commands run in: vmrun's initramfs, an image's root partition or whole disk,
or a squashfs root (an OCI image's, or a --packages root)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmrun.channel import SQUASHFS_ROOT
from vmrun.errors import UsageError
from vmrun.oci.reference import is_image_reference
from vmrun.progress import Progress
from vmrun.qemu.arch import Arch
from vmrun.spec import MachineSpec

if TYPE_CHECKING:
    from vmrun.images.attach import Base
    from vmrun.oci.run import OciRun

Notice = Callable[[str], None]


@dataclass(frozen=True)
class GuestRoot:
    """The root a run's commands see, and what backs it."""

    oci: OciRun | None = None  # a squashfs root and its config (OCI image, --packages)
    base: Base | None = None  # a disk image, attached on a fresh overlay
    root: int | str | None = None  # the partition (fast boot), SQUASHFS_ROOT, or None


def prepare_root(spec: MachineSpec, arch: Arch, *, notice: Notice, progress: Progress | None,
                 oci: OciRun | None = None) -> GuestRoot:
    """SPEC's root, fetched, built or checked before anything boots. OCI is the spec's OCI
    image when the caller prepared it already (vmrun.oci.run)."""
    if spec.image is not None and is_image_reference(spec.image) and oci is None:
        from vmrun.oci.run import prepare as prepare_oci

        # None: the reference is a VM disk, attached below like any disk image.
        oci = prepare_oci(spec, arch=arch.name, notice=notice, progress=progress)
    if spec.packages and oci is None:
        oci = packages_run(spec, arch, notice)
    if oci is not None:
        return GuestRoot(oci=oci, root=SQUASHFS_ROOT)
    if spec.image is None:
        return GuestRoot()
    from vmrun.images.attach import prepare, root_for_boot

    base = prepare(spec.image, guest_arch=arch.name, debian_arch=arch.debian_arch,
                   notice=notice, progress=progress, image_format=spec.image_format,
                   insecure_registries=spec.insecure_registries)
    # AUTO: the image's root partition when it has one, else a plain disk.
    return GuestRoot(base=base, root=root_for_boot(base, spec.boot, spec.image))


def packages_run(spec: MachineSpec, arch: Arch, notice: Notice) -> OciRun:
    """SPEC's --packages root, built unless cached, made ready to run as an OCI image is."""
    from vmrun.build.roots import ensure_packages_root
    from vmrun.oci.run import Identity, OciRun

    if spec.image is not None:
        raise UsageError("--packages and --image cannot be used together",
                         hint="--packages builds the root the command runs in")
    image = ensure_packages_root(spec.packages, arch=arch, suite=spec.suite,
                                 mirror=spec.mirror, notice=notice)
    return OciRun(image=image, entrypoint=(), identity=Identity())
