"""Where manifests and blobs come from: a registry, an OCI layout directory or its tar."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Protocol

from vmrun.errors import ImageError, UsageError, VerificationError
from vmrun.oci.auth import find_credentials
from vmrun.oci.manifest import MANIFEST_LIMIT, Descriptor, parse_descriptor
from vmrun.oci.reference import ArchiveRef, ImageRef, LayoutRef, RegistryRef
from vmrun.oci.registry import Registry
from vmrun.progress import Progress

REF_NAME = "org.opencontainers.image.ref.name"
_CHUNK = 1 << 20


class Source(Protocol):
    def resolve(self) -> tuple[bytes, str | None, str]:
        """The manifest or index the reference names: (bytes, media type if known, digest)."""

    def manifest(self, descriptor: Descriptor) -> bytes:
        """A manifest an index points to, checked against DESCRIPTOR."""

    def blob(self, descriptor: Descriptor, part: Path, progress: Progress | None) -> None:
        """DESCRIPTOR's blob written to PART, verified against its digest and size."""


class RegistrySource:
    def __init__(self, ref: RegistryRef, *, insecure: bool, auth_files: list[Path] | None):
        self.ref = ref
        self.registry = Registry(
            ref, credentials=find_credentials(ref.registry, ref.repository, auth_files),
            insecure=insecure)

    def resolve(self) -> tuple[bytes, str | None, str]:
        return self.registry.manifest(self.ref.reference)

    def manifest(self, descriptor: Descriptor) -> bytes:
        if descriptor.size > MANIFEST_LIMIT:
            raise ImageError(f"{self.ref}: manifest {descriptor.digest} over {MANIFEST_LIMIT} "
                             "bytes")
        data, _, digest = self.registry.manifest(descriptor.digest)
        if len(data) != descriptor.size:
            raise VerificationError(f"{self.ref}: manifest {digest} is not {descriptor.size} "
                                    "bytes")
        return data

    def blob(self, descriptor: Descriptor, part: Path, progress: Progress | None) -> None:
        self.registry.blob(descriptor, part, progress)


class LayoutSource:
    """An OCI image layout, in a directory or in a tar archive (read in place)."""

    def __init__(self, ref: LayoutRef | ArchiveRef) -> None:
        self.ref = ref
        self.tar: tarfile.TarFile | None = None
        if isinstance(ref, ArchiveRef):
            try:
                self.tar = tarfile.open(ref.path, "r:*")
            except (OSError, tarfile.TarError) as err:
                raise UsageError(f"{ref}: cannot read the archive: {err}") from None
        elif not (ref.path / "index.json").is_file():
            raise UsageError(f"{ref}: not an OCI image layout (no index.json)")

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()

    @contextlib.contextmanager
    def _open(self, name: str) -> Iterator[IO[bytes]]:
        try:
            if self.tar is None:
                with open(self.ref.path / name, "rb") as f:
                    yield f
                return
            member = self._member(name)
            stream = self.tar.extractfile(member) if member is not None else None
            if stream is None:
                raise FileNotFoundError(name)
            with stream:
                yield stream
        except (OSError, tarfile.TarError) as err:
            raise ImageError(f"{self.ref}: cannot read {name}: {err}") from None

    def _member(self, name: str) -> tarfile.TarInfo | None:
        assert self.tar is not None
        for candidate in (name, f"./{name}"):
            with contextlib.suppress(KeyError):
                member = self.tar.getmember(candidate)
                return member if member.isfile() else None
        return None

    def _small(self, name: str) -> bytes:
        with self._open(name) as f:
            data = f.read(MANIFEST_LIMIT + 1)
        if len(data) > MANIFEST_LIMIT:
            raise ImageError(f"{self.ref}: {name} is larger than {MANIFEST_LIMIT} bytes")
        return data

    def resolve(self) -> tuple[bytes, str | None, str]:
        try:
            document = json.loads(self._small("index.json"))
        except ValueError:
            raise ImageError(f"{self.ref}: index.json is not JSON") from None
        entries = document.get("manifests") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ImageError(f"{self.ref}: index.json has no manifests list")
        descriptors = [parse_descriptor(e, f"{self.ref} index.json") for e in entries]
        chosen = self._choose(descriptors)
        return self.manifest(chosen), chosen.media_type, chosen.digest

    def _choose(self, descriptors: list[Descriptor]) -> Descriptor:
        tags = [d.annotations.get(REF_NAME) for d in descriptors]
        if self.ref.tag is not None:
            matches = [d for d, t in zip(descriptors, tags, strict=True) if t == self.ref.tag]
        else:
            matches = descriptors if len(descriptors) == 1 else []
        if len(matches) != 1:
            named = sorted({t for t in tags if t})
            raise UsageError(
                f"{self.ref}: " + ("no manifest tagged so" if self.ref.tag else
                                   f"{len(descriptors)} manifests, and no tag to choose one"),
                hint=f"tags in the layout: {', '.join(named) or 'none'}")
        return matches[0]

    def manifest(self, descriptor: Descriptor) -> bytes:
        if descriptor.size > MANIFEST_LIMIT:
            raise ImageError(f"{self.ref}: manifest {descriptor.digest} over {MANIFEST_LIMIT} "
                             "bytes")
        data = self._small(f"blobs/sha256/{descriptor.hex}")
        if len(data) != descriptor.size or (
                f"sha256:{hashlib.sha256(data).hexdigest()}" != descriptor.digest):
            raise VerificationError(f"{self.ref}: blob {descriptor.digest} does not match "
                                    "its digest and size")
        return data

    def blob(self, descriptor: Descriptor, part: Path, progress: Progress | None) -> None:
        hasher = hashlib.sha256()
        done = 0
        label = descriptor.digest[:19]
        with self._open(f"blobs/sha256/{descriptor.hex}") as f, open(part, "wb") as out:
            while chunk := f.read(_CHUNK):
                done += len(chunk)
                if done > descriptor.size:
                    break
                out.write(chunk)
                hasher.update(chunk)
                if progress is not None:
                    progress(label, done, descriptor.size)
            out.flush()
            os.fsync(out.fileno())
        if done != descriptor.size or f"sha256:{hasher.hexdigest()}" != descriptor.digest:
            part.unlink()
            raise VerificationError(f"{self.ref}: blob {descriptor.digest} does not match its "
                                    "digest and size")


@contextlib.contextmanager
def open_source(ref: ImageRef, *, insecure: bool = False,
                auth_files: list[Path] | None = None) -> Iterator[Source]:
    """The Source for REF, closed afterwards."""
    if isinstance(ref, RegistryRef):
        yield RegistrySource(ref, insecure=insecure, auth_files=auth_files)
        return
    source = LayoutSource(ref)
    try:
        yield source
    finally:
        source.close()

