"""Fetch package indexes and .debs from a Debian mirror, verifying the chain of hashes.

InRelease (its signature checked with gpgv or sqv against the Debian archive keys shipped
in keys/, or $VMRUN_DEBIAN_KEYRING) -> Release's SHA256 of Packages.xz -> Packages'
SHA256 of each .deb. Everything is cached by content; downloads resume.
"""

from __future__ import annotations

import functools
import gzip
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
from vmrun.download import Expected, fetch_verified, remove_dead_parts
from vmrun.errors import FetchError, VerificationError
from vmrun.progress import Progress

# The Debian archive's public keys, shipped with vmrun (keys/README.md says whence).
SHIPPED_KEYRING = Path(__file__).with_name("keys") / "debian-archive-keyring.gpg"
KEYRING_ENV = "VMRUN_DEBIAN_KEYRING"
# A part of a download that died stays this long for the next fetch to resume it.
STALE_PART_AGE_S = 24 * 3600.0


_TIMEOUT_S = 60.0
_INRELEASE_LIMIT = 16 << 20
_VERIFY_TIMEOUT_S = 60.0
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


def _ensure_blob(
    url: str, final: Path, *, size: int, sha256: str, label: str, work: Path,
    progress: Progress | None,
) -> Path:
    """FINAL, verified; downloaded (or a dead download resumed) unless a good copy is there."""
    return fetch_verified(
        url, final, Expected("sha256", sha256), size=size, work=work, progress=progress,
        label=label,
    )


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


@dataclass(frozen=True)
class Verifier:
    """An OpenPGP signature checker found on the host."""

    tool: str  # "gpgv" or "sqv"
    path: str


def find_verifier() -> Verifier | None:
    """gpgv, else sqv, from PATH; None when neither is installed."""
    for tool in ("gpgv", "sqv"):
        path = shutil.which(tool)
        if path is not None:
            return Verifier(tool=tool, path=path)
    return None


def keyring_path(explicit: Path | None = None) -> Path:
    """EXPLICIT, else $VMRUN_DEBIAN_KEYRING, else the keys shipped with vmrun."""
    if explicit is not None:
        return explicit
    env = os.environ.get(KEYRING_ENV)
    return Path(env) if env else SHIPPED_KEYRING


def split_clearsigned(text: str, *, source: str) -> tuple[bytes, bytes]:
    """(signed data, armored signature) of a clearsigned message, for a detached check.

    The data is what RFC 4880 section 7.1 says the signature covers: dash-escapes
    removed, trailing blanks dropped, lines joined by CRLF without a final line ending.
    """
    strip_clearsign(text, source=source)  # refuses text outside the one signed block
    lines = [line.rstrip("\r") for line in text.split("\n")]
    body_start = lines.index("", 1) + 1
    body_end = lines.index(_BEGIN_SIGNATURE, body_start)
    body = [line[2:] if line.startswith("- ") else line for line in lines[body_start:body_end]]
    data = "\r\n".join(line.rstrip(" \t") for line in body).encode("utf-8")
    end = lines.index(_END_SIGNATURE, body_end)
    signature = "\n".join(lines[body_end : end + 1]) + "\n"
    return data, signature.encode("utf-8")


def _run_verifier(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=_VERIFY_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise VerificationError(f"cannot run {argv[0]}: {err}") from None


def _gpgv(verifier: Verifier, inrelease: Path, keyring: Path) -> str | None:
    """None if gpgv finds a good signature by a key in KEYRING, else the reason why not."""
    # An empty home keeps the user's own trustedkeys out of the decision.
    with tempfile.TemporaryDirectory(prefix="vmrun-gpgv-") as home:
        result = _run_verifier([
            verifier.path, "--homedir", home, "--status-fd", "1",
            "--keyring", str(keyring.absolute()), str(inrelease),
        ])
    # GOODSIG, unlike VALIDSIG, is not given for a key that has expired or been revoked.
    good = any(line.startswith("[GNUPG:] GOODSIG ") for line in result.stdout.splitlines())
    if result.returncode == 0 and good:
        return None
    reasons = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    return reasons[-1] if reasons else f"gpgv exited with {result.returncode}"


def _sqv(verifier: Verifier, inrelease: Path, keyring: Path, source: str) -> str | None:
    """None if sqv finds a good signature by a key in KEYRING, else the reason why not."""
    data, signature = split_clearsigned(inrelease.read_text("utf-8", "replace"), source=source)
    with tempfile.TemporaryDirectory(prefix="vmrun-sqv-") as work:
        (Path(work) / "Release").write_bytes(data)
        (Path(work) / "Release.asc").write_bytes(signature)
        result = _run_verifier([
            verifier.path, "--keyring", str(keyring.absolute()),
            str(Path(work) / "Release.asc"), str(Path(work) / "Release"),
        ])
    if result.returncode == 0 and result.stdout.strip():
        return None
    reasons = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    return reasons[-1] if reasons else f"sqv exited with {result.returncode}"


def check_signature(
    inrelease: Path, *, keyring: Path, verifier: Verifier | None, source: str
) -> None:
    """Raise VerificationError unless INRELEASE carries a good signature by KEYRING.

    Fails closed: no VERIFIER, or no KEYRING file, is an error too.
    """
    if verifier is None:
        raise VerificationError(
            f"cannot check the signature of {source}: neither gpgv nor sqv is installed",
            hint="install gpgv or sqv (apt install gpgv; brew install gnupg), or run "
            "with --insecure-unverified-guest to boot a guest nobody vouched for",
        )
    if not keyring.is_file():
        raise VerificationError(
            f"cannot check the signature of {source}: no keyring at {keyring}",
            hint=f"fix ${KEYRING_ENV}, or unset it to use the keys shipped with vmrun",
        )
    if verifier.tool == "sqv":
        reason = _sqv(verifier, inrelease, keyring, source)
    else:
        reason = _gpgv(verifier, inrelease, keyring)
    if reason is not None:
        raise VerificationError(
            f"{source}: signature check against {keyring} failed: {reason}",
            hint="the mirror may be tampered with, or the keyring out of date",
        )


def _verified_release(
    inrelease: Path, *, source: str, suite: str, keyring: Path, insecure_unverified: bool,
) -> tuple[dict[str, str], bool]:
    if not insecure_unverified:
        check_signature(inrelease, keyring=keyring, verifier=find_verifier(), source=source)
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
    return release, not insecure_unverified


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


def _packages_entry(release: Mapping[str, str], *, source: str, component: str, arch: str,
                    suite: str) -> tuple[str, str, int]:
    """The Packages index RELEASE lists for COMPONENT and ARCH (xz, gz or plain, in that
    order): its name, SHA256 and size."""
    hashes = _release_sha256(release, source=source)
    base = f"{component}/binary-{arch}/Packages"
    name = next((n for n in (f"{base}.xz", f"{base}.gz", base) if n in hashes), None)
    if name is None:
        raise FetchError(f"{source}: lists no {base} index",
                         hint=f"check the arch name: is {arch} an architecture of {suite}?")
    sha256, size = hashes[name]
    return name, sha256, size


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
    insecure_unverified: bool = False,
) -> PackageIndex:
    """Fetch and verify MIRROR's Packages index for SUITE/COMPONENT/ARCH.

    InRelease is fetched every time; if the mirror is unreachable, the index verified
    last time for the same mirror/suite/arch/component is used (NOTICE says so). Its
    signature is checked with gpgv or sqv against KEYRING (else $VMRUN_DEBIAN_KEYRING,
    else the keys shipped with vmrun); without either tool, or without the keyring, it
    is refused. INSECURE_UNVERIFIED skips that check (the caller warns the user) and
    leaves only the hash chain. Raises FetchError, or VerificationError for a bad or
    uncheckable signature, a bad hash, size or suite, or an expired Release.
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
        remove_dead_parts(root / "tmp", older_than=STALE_PART_AGE_S)
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
            inrelease, source=source, suite=suite, keyring=keyring_path(keyring),
            insecure_unverified=insecure_unverified,
        )
        name, sha256, size = _packages_entry(release, source=source, component=component,
                                             arch=arch, suite=suite)
        urls = [f"{dists}/{name}"]
        if release.get("Acquire-By-Hash", "").lower() == "yes":
            # By-hash names do not change under us if the mirror updates mid-fetch; but a
            # mirror may lack one (seen: trixie riscv64), and the plain name, verified by
            # the same hash, is as good.
            urls.insert(0, f"{dists}/{posixpath.dirname(name)}/by-hash/SHA256/{sha256}")
        for attempt, url in enumerate(urls):
            try:
                packages = _ensure_blob(
                    url, blobs / sha256, size=size, sha256=sha256, label=name, work=root / "tmp",
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


@dataclass(frozen=True)
class ArchiveState:
    """What a signed Release says about one architecture's packages at one moment."""

    mirror: str
    suite: str
    arch: str
    packages_sha256: str  # of the Packages index: changes exactly when the packages do
    date: str  # the Release's Date field
    signed: bool


def archive_state(*, mirror: str, suite: str, arch: str, cache: Path, component: str = "main",
                  keyring: Path | None = None, insecure_unverified: bool = False) -> ArchiveState:
    """MIRROR's current state of SUITE/COMPONENT for ARCH, from its InRelease, verified as
    load_index verifies it (one small download; the Packages index itself is not fetched).
    Raises FetchError (also when the mirror is unreachable) or VerificationError."""
    mirror = mirror.rstrip("/")
    root = cache / "debian"
    source = f"{mirror}/dists/{suite}/InRelease"
    with locked(root / ".lock"):
        inrelease = _store_bytes(root / "by-hash", _read_url(source, limit=_INRELEASE_LIMIT))
        release, signed = _verified_release(
            inrelease, source=source, suite=suite, keyring=keyring_path(keyring),
            insecure_unverified=insecure_unverified,
        )
    _, sha256, _ = _packages_entry(release, source=source, component=component, arch=arch,
                                   suite=suite)
    return ArchiveState(mirror=mirror, suite=suite, arch=arch, packages_sha256=sha256,
                        date=release.get("Date", ""), signed=signed)


def fetch_deb(
    index: PackageIndex,
    record: PackageRecord,
    *,
    cache: Path,
    progress: Progress | None = None,
    notice: Callable[[str], None] = _ignore,
) -> Path:
    """RECORD's .deb, verified against the index, as cache/debs/<sha256>.deb.

    A copy already there is used only if its bytes still match; a download that died
    is resumed where it stopped. Concurrent callers make one download.
    """
    if not _SHA256_HEX.fullmatch(record.sha256) or _unsafe_filename(record.filename):
        raise FetchError(f"{record.name}: unusable index entry {record.filename!r}")
    debs = cache / "debs"
    with locked(debs / ".lock"):
        remove_stale_parts(debs)  # left by vmrun versions that did not resume
        remove_dead_parts(debs / "tmp", older_than=STALE_PART_AGE_S)
    return fetch_verified(
        f"{index.mirror}/{record.filename}",
        debs / f"{record.sha256}.deb",
        Expected("sha256", record.sha256),
        size=record.size,
        work=debs / "tmp",
        progress=progress,
        notice=notice,
    )
