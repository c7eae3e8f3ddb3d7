"""Fetch package indexes and .debs from a Debian mirror, verifying the chain of hashes.

InRelease (signature checked with gpgv when a keyring is available) -> Release's SHA256
of Packages.xz -> Packages' SHA256 of each .deb. Everything is cached by content.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import json
import lzma
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path

from vmrun.cache import key_of, locked, remove_stale_parts, sha256_bytes, sha256_file, staged
from vmrun.debian.deb import parse_stanzas
from vmrun.errors import FetchError, VerificationError

DEFAULT_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")

Progress = Callable[[str, int, int | None], None]

_TIMEOUT_S = 60.0
_INRELEASE_LIMIT = 16 << 20
_CHUNK = 1 << 16
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_RELATION_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9+.\-]*)")
_BEGIN_SIGNED = "-----BEGIN PGP SIGNED MESSAGE-----"
_BEGIN_SIGNATURE = "-----BEGIN PGP SIGNATURE-----"
_END_SIGNATURE = "-----END PGP SIGNATURE-----"


@dataclass(frozen=True)
class PackageRecord:
    """One binary package as the verified Packages index describes it."""

    name: str
    version: str
    architecture: str
    filename: str
    size: int
    sha256: str
    # Alternative groups, names only: "a (>= 1) | b:any, c" -> (("a", "b"), ("c",)).
    depends: tuple[tuple[str, ...], ...]
    provides: tuple[str, ...] = ()


@dataclass(frozen=True)
class PackageIndex:
    """The newest version of every package in one mirror/suite/architecture."""

    mirror: str
    suite: str
    arch: str
    records: Mapping[str, PackageRecord]
    signed: bool

    def lookup(self, name: str) -> PackageRecord:
        """The package NAME, or else the first (by name) real package that Provides it."""
        record = self.records.get(name)
        if record is not None:
            return record
        providers = sorted(r.name for r in self.records.values() if name in r.provides)
        if providers:
            return self.records[providers[0]]
        raise FetchError(f"package {name} not found in {self.suite}/{self.arch} at {self.mirror}")


class _Unreachable(FetchError):
    """The server could not be reached at all (as opposed to answering with an error)."""


def _ignore(message: str) -> None:
    pass


# -- Debian version comparison (as dpkg does it) --


def _order(char: str) -> int:
    if char == "~":
        return -1
    if char.isascii() and char.isalpha():
        return ord(char)
    return ord(char) + 256


def _compare_part(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            bc = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ac != bc:
                return -1 if ac < bc else 1
            i += 1
            j += 1
        start_i = i
        while i < len(a) and a[i].isdigit():
            i += 1
        start_j = j
        while j < len(b) and b[j].isdigit():
            j += 1
        na = int(a[start_i:i] or "0")
        nb = int(b[start_j:j] or "0")
        if na != nb:
            return -1 if na < nb else 1
    return 0


def _split_version(version: str) -> tuple[int, str, str]:
    epoch, sep, rest = version.partition(":")
    if not sep:
        epoch, rest = "0", version
    upstream, sep, revision = rest.rpartition("-")
    if not sep:
        upstream, revision = rest, ""
    try:
        return int(epoch or "0"), upstream, revision
    except ValueError:
        raise FetchError(f"invalid Debian version {version!r}") from None


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version A sorts before, equal to or after B."""
    epoch_a, upstream_a, revision_a = _split_version(a)
    epoch_b, upstream_b, revision_b = _split_version(b)
    if epoch_a != epoch_b:
        return -1 if epoch_a < epoch_b else 1
    return _compare_part(upstream_a, upstream_b) or _compare_part(revision_a, revision_b)


version_key = functools.cmp_to_key(compare_versions)


# -- downloads --


def _open_url(url: str) -> http.client.HTTPResponse:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise FetchError(f"{url}: only http and https mirrors are supported")
    request = urllib.request.Request(url, headers={"User-Agent": "vmrun"})
    try:
        response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        raise FetchError(f"{url}: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise _Unreachable(f"{url}: {err.reason}") from None
    except (OSError, http.client.HTTPException) as err:
        raise _Unreachable(f"{url}: {err}") from None
    return response


def _read_url(url: str, *, limit: int) -> bytes:
    with _open_url(url) as response:
        try:
            data = response.read(limit + 1)
        except (OSError, http.client.HTTPException) as err:
            raise _Unreachable(f"{url}: {err}") from None
    if len(data) > limit:
        raise FetchError(f"{url}: larger than {limit} bytes")
    return data


def _download(
    url: str, out: Path, *, size: int, sha256: str, label: str, progress: Progress | None
) -> None:
    """Write URL to OUT, checking it is SIZE bytes with digest SHA256."""
    digest = hashlib.sha256()
    done = 0
    with _open_url(url) as response, open(out, "wb") as f:
        if progress is not None:
            progress(label, 0, size)
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as err:
                raise FetchError(f"{url}: {err}") from None
            if not chunk:
                break
            done += len(chunk)
            if done > size:
                raise VerificationError(f"{url}: longer than the expected {size} bytes")
            digest.update(chunk)
            f.write(chunk)
            if progress is not None:
                progress(label, done, size)
    if done != size:
        raise VerificationError(f"{url}: got {done} bytes, expected {size}")
    actual = digest.hexdigest()
    if actual != sha256:
        raise VerificationError(f"{url}: sha256 is {actual}, expected {sha256}")


def _ensure_blob(
    url: str, final: Path, *, size: int, sha256: str, label: str, progress: Progress | None
) -> Path:
    """FINAL, verified; downloaded from URL unless a good copy is there (caller locks)."""
    if final.is_file():
        if final.stat().st_size == size and sha256_file(final) == sha256:
            return final
        final.unlink()
    with staged(final) as tmp:
        _download(url, tmp, size=size, sha256=sha256, label=label, progress=progress)
    return final


# -- Release --


def strip_clearsign(text: str, *, source: str) -> str:
    """The signed text of a clearsigned message; refuses anything outside the one block."""
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or lines[0] != _BEGIN_SIGNED:
        raise VerificationError(f"{source}: not a clearsigned message")
    if lines[-1] != _END_SIGNATURE or lines.count(_BEGIN_SIGNED) != 1:
        # Text after the signature, or a second message, would be parsed but not signed.
        raise VerificationError(f"{source}: unexpected text around the signed message")
    try:
        body_start = lines.index("", 1) + 1
        body_end = lines.index(_BEGIN_SIGNATURE, body_start)
    except ValueError:
        raise VerificationError(f"{source}: malformed clearsigned message") from None
    body: list[str] = []
    for line in lines[body_start:body_end]:
        if line.startswith("- "):
            body.append(line[2:])
        elif line.startswith("-"):
            raise VerificationError(f"{source}: malformed dash-escaping in signed text")
        else:
            body.append(line)
    return "\n".join(body) + "\n"


def _check_signature(inrelease: Path, keyring: Path, gpgv: str, *, source: str) -> None:
    # An empty home keeps the user's own trustedkeys out of the decision.
    with tempfile.TemporaryDirectory(prefix="vmrun-gpgv-") as home:
        argv = [gpgv, "--homedir", home, "--status-fd", "1", "--keyring", str(keyring.absolute())]
        result = subprocess.run(
            [*argv, str(inrelease)], capture_output=True, text=True, check=False
        )
    if result.returncode != 0 or "[GNUPG:] GOODSIG " not in result.stdout:
        reasons = [line for line in result.stderr.splitlines() if line.strip()]
        reason = reasons[-1] if reasons else f"gpgv exited with {result.returncode}"
        raise VerificationError(
            f"{source}: signature check against {keyring} failed: {reason}",
            hint="the mirror may be tampered with, or the keyring out of date",
        )


def _keyring_path(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    env = os.environ.get("VMRUN_DEBIAN_KEYRING")
    return Path(env) if env else DEFAULT_KEYRING


def _verified_release(
    inrelease: Path,
    *,
    source: str,
    suite: str,
    keyring: Path,
    notice: Callable[[str], None],
) -> tuple[dict[str, str], bool]:
    gpgv = shutil.which("gpgv")
    if gpgv is not None and keyring.is_file():
        _check_signature(inrelease, keyring, gpgv, source=source)
        signed = True
    else:
        missing = "gpgv is not installed" if gpgv is None else f"no keyring at {keyring}"
        notice(f"{missing}: trusting {source} by its hashes only, without a signature check")
        signed = False
    text = strip_clearsign(inrelease.read_text("utf-8", "replace"), source=source)
    stanzas = parse_stanzas(text, source=source)
    if not stanzas:
        raise VerificationError(f"{source}: empty Release")
    release = stanzas[0]
    if suite not in (release.get("Suite"), release.get("Codename")):
        raise VerificationError(
            f"{source}: is for suite {release.get('Suite')!r} "
            f"(codename {release.get('Codename')!r}), not {suite!r}"
        )
    valid_until = release.get("Valid-Until")
    if valid_until:
        try:
            until = parsedate_to_datetime(valid_until)
        except (TypeError, ValueError):
            raise VerificationError(f"{source}: unreadable Valid-Until {valid_until!r}") from None
        if until.tzinfo is None:
            until = until.replace(tzinfo=UTC)
        if until < datetime.now(UTC):
            raise VerificationError(f"{source}: expired on {valid_until} (Valid-Until)")
    return release, signed


def _release_sha256(release: Mapping[str, str], *, source: str) -> dict[str, tuple[str, int]]:
    entries: dict[str, tuple[str, int]] = {}
    for line in release.get("SHA256", "").split("\n"):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or not _SHA256_HEX.fullmatch(fields[0]) or not fields[1].isdigit():
            raise VerificationError(f"{source}: malformed SHA256 line {line!r}")
        entries[fields[2]] = (fields[0], int(fields[1]))
    return entries


# -- Packages --


def parse_relations(text: str) -> tuple[tuple[str, ...], ...]:
    """Package names of a Depends-style field, grouped by alternatives."""
    groups: list[tuple[str, ...]] = []
    for group in text.split(","):
        names: list[str] = []
        for alternative in group.split("|"):
            match = _RELATION_NAME.match(alternative)
            if match is not None:
                names.append(match.group(1))
        if names:
            groups.append(tuple(names))
    return tuple(groups)


def _record(stanza: Mapping[str, str]) -> PackageRecord | None:
    try:
        name = stanza["Package"]
        version = stanza["Version"]
        filename = stanza["Filename"]
        size = int(stanza["Size"])
        sha256 = stanza["SHA256"].lower()
    except (KeyError, ValueError):
        # Without a name, a location and a hash the entry cannot be fetched safely.
        return None
    if not _SHA256_HEX.fullmatch(sha256) or _unsafe_filename(filename):
        return None
    depends = stanza.get("Pre-Depends", "") + "," + stanza.get("Depends", "")
    provides = tuple(group[0] for group in parse_relations(stanza.get("Provides", "")))
    return PackageRecord(
        name=name,
        version=version,
        architecture=stanza.get("Architecture", ""),
        filename=filename,
        size=size,
        sha256=sha256,
        depends=parse_relations(depends),
        provides=provides,
    )


def _unsafe_filename(filename: str) -> bool:
    return filename.startswith("/") or ".." in filename.split("/") or "://" in filename


def _read_packages(path: Path, name: str) -> str:
    if name.endswith(".xz"):
        data = lzma.decompress(path.read_bytes())
    elif name.endswith(".gz"):
        data = gzip.decompress(path.read_bytes())
    else:
        data = path.read_bytes()
    return data.decode("utf-8", "replace")


def _parse_packages(path: Path, name: str, *, source: str) -> dict[str, PackageRecord]:
    try:
        text = _read_packages(path, name)
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise FetchError(f"{source}: cannot decompress: {err}") from None
    records: dict[str, PackageRecord] = {}
    for stanza in parse_stanzas(text, source=source):
        record = _record(stanza)
        if record is None:
            continue
        known = records.get(record.name)
        if known is None or compare_versions(record.version, known.version) > 0:
            records[record.name] = record
    return records


# -- public entry points --


def _cached_inrelease(pointer: Path, blobs: Path) -> Path | None:
    try:
        digest = json.loads(pointer.read_text())["inrelease"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
        return None
    path = blobs / digest
    if not path.is_file() or sha256_file(path) != digest:
        return None
    return path


def _store_bytes(blobs: Path, data: bytes) -> Path:
    final = blobs / sha256_bytes(data)
    if not final.is_file():
        with staged(final) as tmp:
            tmp.write_bytes(data)
    return final


def load_index(
    *,
    mirror: str,
    suite: str,
    arch: str,
    component: str = "main",
    cache: Path,
    keyring: Path | None = None,
    notice: Callable[[str], None] = _ignore,
    progress: Progress | None = None,
) -> PackageIndex:
    """Fetch and verify MIRROR's Packages index for SUITE/COMPONENT/ARCH.

    InRelease is fetched every time; if the mirror is unreachable, the index verified
    last time for the same mirror/suite/arch/component is used (NOTICE says so).
    Without gpgv or a keyring (KEYRING, else $VMRUN_DEBIAN_KEYRING, else Debian's),
    only the hash chain is checked and NOTICE says so. Raises FetchError, or
    VerificationError for a bad signature, hash, size, suite or an expired Release.
    """
    mirror = mirror.rstrip("/")
    root = cache / "debian"
    blobs = root / "by-hash"
    pointer = root / "indexes" / f"{key_of(mirror, suite, arch, component)}.json"
    dists = f"{mirror}/dists/{suite}"
    source = f"{dists}/InRelease"
    with locked(root / ".lock"):
        remove_stale_parts(blobs)
        remove_stale_parts(pointer.parent)
        online = True
        try:
            inrelease = _store_bytes(blobs, _read_url(source, limit=_INRELEASE_LIMIT))
        except _Unreachable as err:
            cached = _cached_inrelease(pointer, blobs)
            if cached is None:
                raise
            notice(f"{err}; using the index verified earlier")
            inrelease, online = cached, False
        release, signed = _verified_release(
            inrelease, source=source, suite=suite, keyring=_keyring_path(keyring), notice=notice
        )
        hashes = _release_sha256(release, source=source)
        base = f"{component}/binary-{arch}/Packages"
        name = next((n for n in (f"{base}.xz", f"{base}.gz", base) if n in hashes), None)
        if name is None:
            raise FetchError(f"{source}: lists no {base} index", hint="check the arch name")
        sha256, size = hashes[name]
        urls = [f"{dists}/{name}"]
        if release.get("Acquire-By-Hash", "").lower() == "yes":
            # By-hash names do not change under us if the mirror updates mid-fetch; but a
            # mirror may lack one (seen: trixie riscv64), and the plain name, verified by
            # the same hash, is as good.
            urls.insert(0, f"{dists}/{posixpath.dirname(name)}/by-hash/SHA256/{sha256}")
        for attempt, url in enumerate(urls):
            try:
                packages = _ensure_blob(
                    url, blobs / sha256, size=size, sha256=sha256, label=name,
                    progress=progress,
                )
                break
            except _Unreachable:
                raise
            except FetchError:
                if attempt == len(urls) - 1:
                    raise
        if online:
            with staged(pointer) as tmp:
                tmp.write_text(json.dumps({"inrelease": inrelease.name, "packages": sha256}))
    records = _parse_packages(packages, name, source=f"{dists}/{name}")
    return PackageIndex(mirror=mirror, suite=suite, arch=arch, records=records, signed=signed)


def fetch_deb(
    index: PackageIndex,
    record: PackageRecord,
    *,
    cache: Path,
    progress: Progress | None = None,
) -> Path:
    """RECORD's .deb, verified against the index, as cache/debs/<sha256>.deb."""
    if not _SHA256_HEX.fullmatch(record.sha256) or _unsafe_filename(record.filename):
        raise FetchError(f"{record.name}: unusable index entry {record.filename!r}")
    debs = cache / "debs"
    url = f"{index.mirror}/{record.filename}"
    with locked(debs / ".lock"):
        remove_stale_parts(debs)
        return _ensure_blob(
            url,
            debs / f"{record.sha256}.deb",
            size=record.size,
            sha256=record.sha256,
            label=posixpath.basename(record.filename),
            progress=progress,
        )
