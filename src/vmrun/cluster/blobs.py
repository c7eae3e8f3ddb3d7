"""Blobs by digest on a worker: its own cache, then a shared directory, then the network.

A unit names the blobs it needs as "sha256:HEX" and its argv says where each goes as
"{sha256:HEX}"; the worker puts the local path there. Each blob is fetched once per node
(a lock per digest, so twenty runs starting together wait for one download) and is
verified before it is kept: wrong bytes are refused, never used.

Sources, tried in order after the caches: ``http://BASE`` or ``https://BASE`` (GET
BASE/sha256:HEX) and ``oci://HOST[:PORT]/REPOSITORY`` (the registry's blob API, as vmrun
pulls and pushes; plain HTTP on loopback).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from vmrun import cache as cachelib
from vmrun.cluster.units import RunUnit
from vmrun.errors import FetchError, UsageError, VerificationError

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
SHARED_ENV = "VMRUN_BLOB_SHARED"  # a directory all nodes see (NFS...), laid out as the cache
SOURCES_ENV = "VMRUN_BLOB_SOURCES"  # space-separated source URLs
CHUNK = 1 << 20
TIMEOUT_S = 60


def _copy_verified(source: IO[bytes], part: Path, digest: str, where: str) -> None:
    hasher = hashlib.sha256()
    with part.open("wb") as out:
        while chunk := source.read(CHUNK):
            hasher.update(chunk)
            out.write(chunk)
    if f"sha256:{hasher.hexdigest()}" != digest:
        raise VerificationError(f"{where}: the blob does not match its digest {digest[:19]}")


def _open_source(source: str, digest: str) -> IO[bytes]:
    if source.startswith("oci://"):
        from vmrun.oci.reference import RegistryRef
        from vmrun.oci.registry import Registry
        host, _, repository = source.removeprefix("oci://").partition("/")
        registry = Registry(RegistryRef(registry=host, repository=repository))
        return registry.open(f"{registry.base}/blobs/{digest}", {})
    try:
        response: IO[bytes] = urllib.request.urlopen(f"{source.rstrip('/')}/{digest}",
                                                     timeout=TIMEOUT_S)
    except urllib.error.URLError as e:
        raise FetchError(f"{source}/{digest}: {getattr(e, 'reason', e)}") from None
    return response


@dataclass(frozen=True)
class BlobStore:
    cache: Path  # this node's: CACHE/sha256/HEX
    shared: Path | None = None
    sources: tuple[str, ...] = ()

    @classmethod
    def for_worker(cls, sources: Sequence[str] = ()) -> BlobStore:
        """This node's store: vmrun's cache, $VMRUN_BLOB_SHARED and $VMRUN_BLOB_SOURCES
        after SOURCES (those the run was given)."""
        shared = os.environ.get(SHARED_ENV)
        return cls(cache=cachelib.cache_dir() / "blobs", shared=Path(shared) if shared else None,
                   sources=(*sources, *os.environ.get(SOURCES_ENV, "").split()))

    def path(self, digest: str) -> Path:
        return self.cache / "sha256" / digest.removeprefix("sha256:")

    def resolve(self, digest: str) -> Path:
        """The verified local path of DIGEST's blob, fetched here at most once."""
        if not DIGEST.fullmatch(digest):
            raise UsageError(f"{digest!r} is not a blob digest (sha256:64 hex digits)")
        final = self.path(digest)
        if final.exists():
            return final
        with cachelib.locked(self.cache / "locks" / digest.removeprefix("sha256:")):
            if final.exists():  # another run on this node fetched it while we waited
                return final
            self._fetch(digest, final)
        return final

    def _fetch(self, digest: str, final: Path) -> None:
        problems: list[str] = []
        refused: VerificationError | None = None
        shared = [] if self.shared is None else [self.shared / "sha256" / final.name]
        for where in (*map(str, shared), *self.sources):
            try:
                with cachelib.staged(final) as part:
                    if where in self.sources:
                        with _open_source(where, digest) as response:
                            _copy_verified(response, part, digest, where)
                    else:
                        with open(where, "rb") as f:
                            _copy_verified(f, part, digest, where)
                return
            except VerificationError as e:
                refused = e
            except (OSError, FetchError) as e:
                problems.append(f"{where}: {e}")
        if refused is not None:
            raise refused
        raise FetchError(f"blob {digest[:19]} is in no cache or source"
                         + (f" ({'; '.join(problems)})" if problems else ""),
                         hint=f"give a source ({SOURCES_ENV}) or a shared directory "
                         f"({SHARED_ENV}) that holds it")

    def substitute(self, unit: RunUnit) -> tuple[str, ...]:
        """UNIT's argv with each "{sha256:HEX}" of its blobs replaced by the local path."""
        paths = {digest: str(self.resolve(digest)) for digest in unit.blobs}
        argv = []
        for arg in unit.argv:
            for digest, path in paths.items():
                arg = arg.replace("{" + digest + "}", path)
            argv.append(arg)
        return tuple(argv)


def copy_into(directory: Path, blob: Path) -> Path:
    """Put BLOB into DIRECTORY under its digest, as a shared directory lays blobs out."""
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    target = directory / "sha256" / digest
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(blob, target)
    return target
