"""`vmrun image`: pull, import, list, remove and prune stored disk images."""

from __future__ import annotations

import argparse
import json
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vmrun.cli.common import Parser, digest_text
from vmrun.errors import ImageError, UsageError
from vmrun.images import store
from vmrun.images.aliases import ALIASES, ARCHES
from vmrun.images.rawdisk import require_disk
from vmrun.oci.reference import is_image_reference
from vmrun.oci.store import OciDisk, OciStored
from vmrun.progress import reporter, size_text

Validate = Callable[[Path], object]


def image_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vmrun image", description="Manage the store of disk images.")
    commands = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    pull = commands.add_parser(
        "pull", help="download an image by URL, alias or image reference and verify it",
        description="Download an image and verify its checksum. Aliases: "
        + ", ".join(sorted(ALIASES)) + ". An image reference (docker://, oci:, "
        "oci-archive:) pulls a VM disk (a disk artifact pushed by vmrun image push, or a "
        "KubeVirt containerDisk) or a container image's root file system.")
    pull.add_argument("source", metavar="URL|ALIAS|REFERENCE")
    pull.add_argument("--name", help="name to store it under (default: the alias, or the "
                      "URL's file name)")
    checksum = pull.add_mutually_exclusive_group()
    checksum.add_argument("--sha256", metavar="HEX", help="the image's expected sha256")
    checksum.add_argument("--checksums", metavar="URL",
                          help="a SHA256SUMS or SHA512SUMS file listing the image")
    pull.add_argument("--arch", help=f"architecture for an alias: {', '.join(ARCHES)} "
                      "(default: the host's)")
    pull.add_argument("--mirror", metavar="URL", help="replaces the publisher's base URL "
                      f"for aliases (default ${store.MIRROR_ENV})")

    pull.add_argument("--insecure-registry", action="append", default=[], metavar="HOST",
                      help="reach this registry over plain HTTP (loopback ones always are)")

    push = commands.add_parser(
        "push", help="publish stored disk images to a registry",
        description="Publish stored disk images as vmrun disk artifacts under one tag. "
        "A baked image goes as one self-contained qcow2. Each image's architecture is "
        "what its GPT root partition type says, or ARCH; several images (one per "
        "architecture) make an index, and --image picks the guest's.")
    push.add_argument("words", nargs="+", metavar="NAME[=ARCH]... DEST",
                      help="stored images, then docker://REGISTRY/REPO[:TAG]")
    push.add_argument("--insecure-registry", action="append", default=[], metavar="HOST",
                      help="reach this registry over plain HTTP (loopback ones always are)")

    imp = commands.add_parser("import", help="copy a local image file into the store")
    imp.add_argument("file", type=Path, metavar="FILE")
    imp.add_argument("--name", help="name to store it under (default: the file's name)")
    imp.add_argument("--format", choices=["raw"], help="FILE is a raw disk, though it has "
                     "no partition table or filesystem vmrun knows")

    ls = commands.add_parser("ls", help="list stored images")
    ls.add_argument("--json", action="store_true", help="one JSON array on stdout")

    rm = commands.add_parser("rm", help="forget an image's name (prune frees the space); "
                             "an OCI image (its reference or digest) is removed at once")
    rm.add_argument("name", metavar="NAME|REFERENCE")

    commands.add_parser("prune", help="remove images no name refers to and no run uses, "
                        "OCI layer downloads and replaced OCI roots, and the leftovers of "
                        "failed downloads")

    inspect = commands.add_parser("inspect", help="read an image's header (no qemu-img)")
    inspect.add_argument("ref", metavar="NAME|FILE")
    inspect.add_argument("--json", action="store_true")
    return parser


def _notice(message: str) -> None:
    print(f"vmrun: {message}", file=sys.stderr, flush=True)


def _describe(image: store.StoredImage) -> dict[str, object]:
    return {"name": image.name, "digest": digest_text(image.digest), "size": image.size,
            "format": image.format, "source": image.source, "created": image.created,
            "path": str(image.path)}


def _describe_oci(root: OciStored) -> dict[str, object]:
    return {"name": root.reference, "digest": digest_text(root.digest), "size": root.size,
            "format": "squashfs", "source": root.reference, "created": root.created,
            "path": str(root.path), "kind": "oci", "arch": root.arch,
            "manifest_digest": digest_text(root.manifest_digest)}


def _is_store_name(name: str) -> bool:
    """Whether NAME is a disk image's name in the store (else it may be an OCI digest)."""
    try:
        store.resolve(name)
    except ImageError:
        return False
    return True


def _describe_disk(found: OciDisk) -> dict[str, object]:
    return {"name": found.reference, "digest": digest_text(found.digest), "size": found.size,
            "format": found.format, "source": found.reference, "created": found.created,
            "path": str(found.path), "kind": found.kind, "arch": found.arch,
            "manifest_digest": digest_text(found.manifest_digest)}


def _print_table(images: list[store.StoredImage], roots: list[OciStored],
                 disks: list[OciDisk]) -> None:
    rows = [("NAME", "DIGEST", "SIZE", "FORMAT", "CREATED", "SOURCE")]
    for image in images:
        rows.append((image.name or "<none>", digest_text(image.digest, short=True),
                     size_text(image.size),
                     image.format or "-", image.created or "-", image.source or "-"))
    for root in roots:
        rows.append((root.reference, digest_text(root.digest, short=True),
                     size_text(root.size), f"squashfs ({root.arch})", root.created or "-",
                     f"{root.reference}@{root.digest}"))
    for found in disks:
        rows.append((found.reference, digest_text(found.digest, short=True),
                     size_text(found.size), f"{found.format} ({found.arch})",
                     found.created or "-", f"{found.reference}@{found.digest}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())


def cmd_image(
    argv: Sequence[str],
    validate: Validate | None = None,
    in_use: Callable[[], set[str]] | None = None,
    in_use_paths: Callable[[], set[str]] | None = None,
) -> int:
    """Run `vmrun image ARGV...`; VALIDATE checks new images, IN_USE names live bases
    (IN_USE_PATHS by path: OCI root images)."""
    from vmrun.oci import store as oci_store

    args = image_parser().parse_args(list(argv))
    if args.action == "pull" and is_image_reference(args.source):
        _pull_reference(args.source, args.arch, args.insecure_registry, args.name)
    elif args.action == "push":
        _push(args.words, args.insecure_registry)
    elif args.action == "pull":
        with reporter() as progress:
            image = store.pull(args.source, name=args.name, sha256=args.sha256,
                               checksums_url=args.checksums, arch=args.arch,
                               mirror=args.mirror, progress=progress, notice=_notice,
                               validate=validate)
        print(f"{image.name}  {digest_text(image.digest)}")
    elif args.action == "import":
        _require_disk_file(args.file, args.format)
        image = store.import_image(args.file, name=args.name, validate=validate)
        print(f"{image.name}  {digest_text(image.digest)}")
    elif args.action == "ls":
        images = store.list_images()
        roots = oci_store.list_roots()
        disks = oci_store.list_disks()
        if args.json:
            print(json.dumps([*map(_describe, images), *map(_describe_oci, roots),
                              *map(_describe_disk, disks)], indent=2))
        else:
            _print_table(images, roots, disks)
    elif args.action == "rm":
        if is_image_reference(args.name) or not _is_store_name(args.name):
            oci_store.remove(args.name)
        else:
            store.remove(args.name)
    elif args.action == "prune":
        removed = store.prune(in_use=in_use if in_use is not None else set)
        for digest in removed:
            print(f"removed {digest_text(digest)}")
        for what in oci_store.prune(in_use=in_use_paths if in_use_paths is not None else set):
            print(f"removed {what}")
    elif args.action == "inspect":
        _inspect(args.ref, as_json=args.json)
    return 0


def _insecure(given: Sequence[str]) -> tuple[str, ...]:
    import os

    from vmrun.oci.reference import insecure_registries

    return insecure_registries(given, os.environ)


def _pull_reference(source: str, arch: str | None, insecure: Sequence[str],
                    name: str | None) -> None:
    """Pull an OCI reference into the OCI store: a VM disk, or a container image's root."""
    from vmrun.oci.disks import PulledDisk
    from vmrun.oci.pull import ensure_image
    from vmrun.oci.reference import parse_reference
    from vmrun.oci.run import reference_insecure
    from vmrun.qemu.arch import host_arch, lookup_arch

    if name is not None:
        raise UsageError("--name does not apply to an image reference",
                         hint="it is stored, listed and run under its reference")
    ref = parse_reference(source)
    with reporter() as progress:
        image = ensure_image(ref, arch=lookup_arch(arch or host_arch()).name,
                             progress=progress, notice=_notice,
                             insecure=reference_insecure(ref, _insecure(insecure)))
    if isinstance(image, PulledDisk):
        print(f"{image.origin.reference}  {digest_text(image.origin.digest)}  {image.format} disk "
              f"({image.origin.arch})")
    else:
        print(f"{image.reference}  {digest_text(image.digest)}  root file system ({image.arch})")


def _push(words: Sequence[str], insecure: Sequence[str]) -> None:
    from vmrun.oci.push import parse_source, push_disks
    from vmrun.oci.reference import parse_reference
    from vmrun.oci.run import reference_insecure

    if len(words) < 2:
        raise UsageError("push needs images and a destination",
                         hint="vmrun image push NAME[=ARCH]... docker://REGISTRY/REPO:TAG")
    destination = words[-1]
    with reporter() as progress:
        pushed = push_disks([parse_source(word) for word in words[:-1]], destination,
                            insecure=reference_insecure(parse_reference(destination),
                                                        _insecure(insecure)),
                            progress=progress, notice=_notice)
    print(f"{pushed.reference}@{digest_text(pushed.digest)}")


def _require_regular(path: Path) -> None:
    """Refuse PATH unless it is a regular file (a FIFO would hang the first read)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ImageError(f"{path} does not exist") from None
    except OSError as err:
        raise ImageError(f"{path}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        raise ImageError(f"{path} is not a regular file")


def _require_disk_file(path: Path, declared: str | None) -> None:
    """Refuse PATH unless it is a disk image (see rawdisk) or DECLARED raw."""
    from vmrun.images.formats import detect_format

    _require_regular(path)
    require_disk(path, str(detect_format(path)), declared, "--format")


def _inspect(ref: str, *, as_json: bool) -> None:
    from vmrun.images.formats import inspect_image

    path = Path(ref)
    if "/" in ref or path.exists() or path.is_symlink():
        _require_regular(path)
    else:
        path = store.resolve(ref).path
    info = inspect_image(path).to_json()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    qcow2 = info.pop("qcow2", None)
    for key, value in info.items():
        print(f"{key:<20}{value}")
    if isinstance(qcow2, dict):
        for key, value in qcow2.items():
            if value not in (None, 0, [], ()):
                print(f"{key:<20}{value}")


def cmd_image_checked(argv: Sequence[str]) -> int:
    """`vmrun image ...`, with the header check on every image taken in, and prune
    sparing the bases that live runs stand on."""
    from vmrun.images.attach import live_bases, live_digests
    from vmrun.images.formats import check_foreign_image
    from vmrun.rundir import runs_root

    if argv[:1] in (["build"], ["export"]):
        from vmrun.cli.build import cmd_build, cmd_export

        return (cmd_build if argv[0] == "build" else cmd_export)(argv[1:])
    if argv[:1] == ["bake"]:
        from vmrun.cli.bake import cmd_bake

        return cmd_bake(argv[1:])
    return cmd_image(argv, validate=check_foreign_image,
                     in_use=lambda: live_digests(runs_root()),
                     in_use_paths=lambda: live_bases(runs_root()))
