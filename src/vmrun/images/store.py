"""The content-addressed image store: pull, import, list, resolve, remove, prune.

Layout under ``cache_dir()/"images"``::

    lock                     flock guarding blobs/, names/ and index/
    blobs/<sha256>           image bytes, verified, then made read-only (0444)
    names/<name>.json        {"digest", "format"?, "source", "size", "created"}
    index/sha512-<hex>       the sha256 of the blob whose sha512 is <hex>
    tmp/<key>.lock           one per download URL (key = sha256 of the URL), or per import
    tmp/<key>.part           a partial download (resumable) or an import in progress
    tmp/<key>.json           the part's URL, expected hash and ETag

Downloads of one URL are serialized by its lock, so a stampede of processes pulling the
same image makes one download; the others wait, then find the blob. Nothing reaches
``blobs/`` before its hash is checked, and a ``.part`` whose lock is free belongs to a
download or import that died: the next pull of that URL resumes it with a Range request;
prune removes it, and so does any pull or import once it is a day old (at once if it
cannot be resumed). A URL's lock file is kept: deleting a lock file that another process
may have open and be waiting on would let two processes hold "the" lock at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import posixpath
import re
import secrets
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmrun.cache import cache_dir, key_of, locked, remove_stale_parts, sha256_file, staged
from vmrun.download import Expected, download, lock_if_free, open_url, read_sidecar
from vmrun.errors import FetchError, ImageError, UsageError, VerificationError
from vmrun.images import aliases
from vmrun.progress import Progress

Validate = Callable[[Path], object]

MIRROR_ENV = "VMRUN_IMAGE_MIRROR"
# A pull leaves other URLs' parts alone for this long, so that they can still be resumed.
STALE_PART_AGE_S = 24 * 3600.0
DIGEST_PREFIX_MIN = 12

_CHUNK = 1 << 16
_CHECKSUMS_LIMIT = 4 << 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+@-]{0,127}")
_HEX = re.compile(r"[0-9a-f]+")
_DIGEST_LENGTHS = {64: "sha256", 128: "sha512"}
_ZERO = bytes(_CHUNK)


@dataclass(frozen=True)
class StoredImage:
    """One image in the store: a blob, and the name that refers to it (None if none does)."""

    name: str | None
    digest: str  # sha256, hex
    path: Path
    size: int
    source: str
    format: str | None = None
    created: str | None = None
    # A baked layer: the digests of the images under it, nearest first; () for a base.
    backing: tuple[str, ...] = ()
    bake_key: str | None = None


def _quiet(message: str) -> None:
    pass


# -- layout --


def _root(cache: Path | None) -> Path:
    return (cache if cache is not None else cache_dir()) / "images"


def store_root(cache: Path | None = None) -> Path:
    """The image store's directory (its tmp/ is where work bound for it is done)."""
    return _root(cache)


def _blob(root: Path, digest: str) -> Path:
    return root / "blobs" / digest


def _name_file(root: Path, name: str) -> Path:
    return root / "names" / f"{name}.json"


def _store_lock(root: Path) -> contextlib.AbstractContextManager[None]:
    return locked(root / "lock")


def check_name(name: str) -> str:
    """NAME, if it can name an image; UsageError otherwise."""
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"bad image name {name!r}",
            hint="use letters, digits and . _ : + @ - (at most 128), starting with a "
            "letter or digit",
        )
    return name


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("digest"), str):
        return None
    return record


def _image_of(root: Path, name: str, record: dict[str, Any]) -> StoredImage:
    digest = record["digest"]
    fmt = record.get("format")
    return StoredImage(
        name=name, digest=digest, path=_blob(root, digest), size=int(record.get("size", 0)),
        source=str(record.get("source", "")), format=fmt if isinstance(fmt, str) else None,
        created=str(record["created"]) if "created" in record else None,
        backing=_backing_of(record),
        bake_key=str(record["bake_key"]) if isinstance(record.get("bake_key"), str) else None,
    )


def _backing_of(record: dict[str, Any]) -> tuple[str, ...]:
    chain = record.get("backing")
    if not isinstance(chain, list) or not all(isinstance(d, str) and _is_digest(d)
                                              for d in chain):
        return ()
    return tuple(chain)


def _named(root: Path) -> dict[str, dict[str, Any]]:
    names_dir = root / "names"
    if not names_dir.is_dir():
        return {}
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(names_dir.glob("*.json")):
        name = path.name[: -len(".json")]
        if path.name.startswith(".") or not _NAME.fullmatch(name):
            continue
        record = _read_record(path)
        if record is not None:
            records[name] = record
    return records


def _write_name(
    root: Path, name: str, *, digest: str, source: str, size: int, fmt: str | None,
    extra: dict[str, Any] | None = None,
) -> StoredImage:
    """Point NAME at DIGEST (caller holds the store lock)."""
    record: dict[str, Any] = {"digest": digest, "source": source, "size": size,
                              "created": datetime.now(UTC).isoformat(timespec="seconds"),
                              **(extra or {})}
    if fmt is not None:
        record["format"] = fmt
    with staged(_name_file(root, name)) as tmp:
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return _image_of(root, name, record)


def _format_for(root: Path, digest: str) -> str | None:
    """The format some other name records for DIGEST, if any."""
    for record in _named(root).values():
        if record["digest"] == digest and isinstance(record.get("format"), str):
            return str(record["format"])
    return None


def _format_of(checked: object) -> str | None:
    """The image format a validate hook reported: a str, or a .format attribute or key."""
    if isinstance(checked, str):
        return str(checked)  # a StrEnum member becomes its value
    value = checked.get("format") if isinstance(checked, dict) else getattr(
        checked, "format", None)
    return str(value) if isinstance(value, str) else None


def _known_digest(root: Path, expected: Expected) -> str | None:
    """The sha256 of a stored blob with the EXPECTED hash, if the store has one."""
    if expected.algorithm == "sha256":
        digest: str | None = expected.hexdigest
    else:
        try:
            digest = (root / "index" / f"{expected.algorithm}-{expected.hexdigest}").read_text()
        except OSError:
            return None
        digest = digest.strip()
        if not _is_digest(digest):
            return None
    if digest is not None and _blob(root, digest).is_file():
        return digest
    return None


def _is_digest(text: str) -> bool:
    return len(text) == 64 and _HEX.fullmatch(text) is not None


def _install_blob(root: Path, part: Path, digest: str, others: dict[str, str]) -> None:
    """Move the verified PART to blobs/DIGEST, read-only (caller holds the store lock)."""
    final = _blob(root, digest)
    final.parent.mkdir(parents=True, exist_ok=True)
    existing = final.stat().st_size if final.is_file() else None
    if existing is not None and existing == part.stat().st_size:
        # Same bytes already there, perhaps under a running VM: leave that file alone.
        part.unlink()
    else:
        os.chmod(part, 0o444)
        os.replace(part, final)
    for algorithm, hexdigest in others.items():
        with staged(root / "index" / f"{algorithm}-{hexdigest}") as tmp:
            tmp.write_text(digest + "\n")


# -- locks and leftovers --


def _clean_leftovers(root: Path, *, older_than: float | None) -> list[Path]:
    """Remove what dead writers left behind; returns the removed parts.

    Parts (and sidecars) in tmp/ go when their lock is free; with OLDER_THAN, a download's
    part that could still be resumed stays until it is that many seconds old.
    """
    removed: list[Path] = []
    if root.is_dir():
        with _store_lock(root):
            for sub in ("blobs", "names", "index"):
                remove_stale_parts(root / sub)
    tmp = root / "tmp"
    if not tmp.is_dir():
        return removed
    now = time.time()
    keys = {p.stem for p in tmp.iterdir() if p.suffix in (".part", ".json")}
    keys |= {p.stem for p in tmp.glob("import-*.lock")}
    keys |= {p.name[1:].split(".")[0] for p in tmp.glob(".*.json.new")}
    for key in sorted(keys):
        part, sidecar, lock = tmp / f"{key}.part", tmp / f"{key}.json", tmp / f"{key}.lock"
        sidecar_new = tmp / f".{key}.json.new"
        resumable = (not key.startswith("import-") and part.is_file()
                     and isinstance(read_sidecar(sidecar).get("url"), str))
        if older_than is not None and resumable:
            mtimes = []
            for leftover in (part, sidecar, sidecar_new):
                with contextlib.suppress(FileNotFoundError):
                    mtimes.append(leftover.stat().st_mtime)
            if mtimes and now - max(mtimes) < older_than:
                continue
        with lock_if_free(lock) as free:
            if not free:
                continue
            if part.exists():
                removed.append(part)
            for leftover in (part, sidecar, sidecar_new):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
            if key.startswith("import-"):
                # A random key nobody else will ever wait on, so its lock can go too.
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
    return removed


# -- checksums --


def parse_checksums(text: str) -> dict[str, str]:
    """File name -> hex digest from a SHA256SUMS / SHA512SUMS file.

    Lines are ``HEX  name`` (text mode) or ``HEX *name`` (binary mode); blank lines and
    ``#`` comments are ignored, and so is anything else that is not such a line.
    """
    entries: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([0-9A-Fa-f]{64}|[0-9A-Fa-f]{128}) [ *](.+)", line)
        if match is None:
            continue
        name = match.group(2).strip()
        entries[name.removeprefix("./")] = match.group(1).lower()
    return entries


def _expected_from(checksums_url: str, image_url: str) -> Expected:
    basename = urllib.parse.unquote(posixpath.basename(urllib.parse.urlsplit(image_url).path))
    text = _read_small(checksums_url, limit=_CHECKSUMS_LIMIT).decode("utf-8", "replace")
    hexdigest = parse_checksums(text).get(basename)
    if hexdigest is None:
        raise VerificationError(
            f"{checksums_url} has no checksum for {basename!r}",
            hint="check the URL, or pass --sha256 HEX",
        )
    return Expected(_DIGEST_LENGTHS[len(hexdigest)], hexdigest)


def _expected_given(sha256: str) -> Expected:
    hexdigest = sha256.lower().removeprefix("sha256:")
    if not _is_digest(hexdigest):
        raise UsageError(f"--sha256 {sha256!r} is not 64 hex digits")
    return Expected("sha256", hexdigest)


# -- HTTP --


def _check_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        hint = "use vmrun image import FILE for a local file" if parts.scheme in (
            "", "file") else None
        raise UsageError(f"{url}: only http and https URLs can be pulled", hint=hint)
    return url


def _read_small(url: str, *, limit: int) -> bytes:
    _check_url(url)
    try:
        with open_url(url, {}) as response:
            data = response.read(limit + 1)
            length = response.headers.get("Content-Length")
    except urllib.error.HTTPError as err:
        raise FetchError(f"{url}: HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise FetchError(f"{url}: {err.reason}") from None
    except (OSError, http.client.HTTPException) as err:
        raise FetchError(f"{url}: {err}") from None
    if len(data) > limit:
        raise FetchError(f"{url}: larger than {limit} bytes")
    if length is not None and length.isdigit() and int(length) != len(data):
        raise FetchError(f"{url}: got {len(data)} of {length} bytes")
    return data


# -- the API --


def pull(
    source: str,
    *,
    name: str | None = None,
    sha256: str | None = None,
    checksums_url: str | None = None,
    cache: Path | None = None,
    progress: Progress | None = None,
    notice: Callable[[str], None] = _quiet,
    validate: Validate | None = None,
    arch: str | None = None,
    mirror: str | None = None,
) -> StoredImage:
    """Download SOURCE (an http(s) URL or an alias like ubuntu:noble) into the store.

    The bytes are checked against SHA256, or against the entry for the URL's basename in
    the SHA256SUMS / SHA512SUMS file at CHECKSUMS_URL (an alias brings its own), then by
    VALIDATE (called on the complete file; if it raises, nothing is stored). NAME defaults
    to the alias (with -ARCH when not the host's) or the URL's basename. CACHE replaces
    cache_dir(); MIRROR (default $VMRUN_IMAGE_MIRROR) replaces an alias's base URL.
    """
    if sha256 is not None and checksums_url is not None:
        raise UsageError("give either a sha256 or a checksums URL, not both")
    if aliases.is_alias(source):
        chosen = aliases.normalize_arch(arch) if arch else aliases.default_arch()
        url, alias_checksums = aliases.resolve_alias(
            source, chosen, mirror or os.environ.get(MIRROR_ENV) or None)
        if checksums_url is None and sha256 is None:
            checksums_url = alias_checksums
        default_name = source.lower()
        if chosen != aliases.default_arch():
            default_name += f"-{chosen}"
    else:
        url = _check_url(source)
        default_name = urllib.parse.unquote(posixpath.basename(urllib.parse.urlsplit(url).path))
    if name is None and not default_name:
        raise UsageError(f"{url}: no file name to name the image by", hint="pass --name NAME")
    name = check_name(name if name is not None else default_name)
    if sha256 is not None:
        expected = _expected_given(sha256)
    elif checksums_url is not None:
        expected = _expected_from(_check_url(checksums_url), url)
    else:
        raise UsageError(
            f"{url}: no checksum to verify it against",
            hint="pass --sha256 HEX, or --checksums URL of a SHA256SUMS or SHA512SUMS file",
        )

    root = _root(cache)
    root.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(root, older_than=STALE_PART_AGE_S)
    if (found := _link_known(root, name, expected, url)) is not None:
        return found

    key = key_of("image-url", url)
    tmp = root / "tmp"
    with locked(tmp / f"{key}.lock"):
        # Whoever held the lock before us may have stored it.
        if (found := _link_known(root, name, expected, url)) is not None:
            notice(f"{name}: already in the store")
            return found
        part, sidecar = tmp / f"{key}.part", tmp / f"{key}.json"
        notice(f"downloading {url}")
        digests = download(url, expected, part, sidecar, progress=progress, notice=notice)
        try:
            checked = validate(part) if validate is not None else None
        except BaseException:
            part.unlink()
            sidecar.unlink()
            raise
        digest = digests.pop("sha256")
        size = part.stat().st_size
        with _store_lock(root):
            _install_blob(root, part, digest, digests)
            image = _write_name(root, name, digest=digest, source=url, size=size,
                                fmt=_format_of(checked) or _format_for(root, digest))
        sidecar.unlink()
    return image


def _link_known(root: Path, name: str, expected: Expected, source: str) -> StoredImage | None:
    if _known_digest(root, expected) is None:
        return None
    with _store_lock(root):
        digest = _known_digest(root, expected)
        if digest is None:
            return None
        current = _read_record(_name_file(root, name))
        if current is not None and current["digest"] == digest:
            return _image_of(root, name, current)
        return _write_name(root, name, digest=digest, source=source,
                           size=_blob(root, digest).stat().st_size,
                           fmt=_format_for(root, digest))


def _sparse_copy(source: Path, target: Path) -> tuple[str, int]:
    """Copy SOURCE to TARGET leaving holes where SOURCE has zero blocks; (sha256, size)."""
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as fin, open(target, "wb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if chunk == (_ZERO if len(chunk) == _CHUNK else bytes(len(chunk))):
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
        fout.truncate(size)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest(), size


def import_image(
    path: Path,
    *,
    name: str | None = None,
    cache: Path | None = None,
    validate: Validate | None = None,
    origin: str | None = None,
    inputs_key: str | None = None,
) -> StoredImage:
    """Copy the local file PATH into the store (keeping it sparse), named NAME.

    NAME defaults to PATH's file name; VALIDATE is called on the copy before it is stored.
    ORIGIN (default: PATH) is what `image ls` shows as its source; INPUTS_KEY, the key of
    the inputs it was built from, lets find_baked find it again (see vmrun.build).
    """
    source = Path(path)
    try:
        if not stat.S_ISREG(source.stat().st_mode):
            raise ImageError(f"{source}: not a regular file")
    except OSError as err:
        raise ImageError(f"{source}: {err.strerror}") from None
    name = check_name(name if name is not None else source.name)
    root = _root(cache)
    root.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(root, older_than=STALE_PART_AGE_S)
    key = f"import-{secrets.token_hex(8)}"
    tmp = root / "tmp"
    part, lock = tmp / f"{key}.part", tmp / f"{key}.lock"
    with locked(lock):
        try:
            try:
                digest, size = _sparse_copy(source, part)
            except OSError as err:
                raise ImageError(f"{source}: {err.strerror or err}") from None
            checked = validate(part) if validate is not None else None
            with _store_lock(root):
                _install_blob(root, part, digest, {})
                return _write_name(root, name, digest=digest,
                                   source=origin or str(source.absolute()), size=size,
                                   fmt=_format_of(checked) or _format_for(root, digest),
                                   extra={"bake_key": inputs_key} if inputs_key else None)
        finally:
            for leftover in (part, lock):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()


def list_images(cache: Path | None = None) -> list[StoredImage]:
    """Every named image, then every blob no name refers to (with name None)."""
    root = _root(cache)
    images = [_image_of(root, name, record) for name, record in _named(root).items()]
    named = {image.digest for image in images}
    blobs = root / "blobs"
    if blobs.is_dir():
        for blob in sorted(blobs.iterdir()):
            if _is_digest(blob.name) and blob.name not in named:
                images.append(StoredImage(name=None, digest=blob.name, path=blob,
                                          size=blob.stat().st_size, source=""))
    return images


def resolve(ref: str, cache: Path | None = None) -> StoredImage:
    """The image named REF, or whose sha256 is or starts with REF (at least 12 hex digits)."""
    root = _root(cache)
    image: StoredImage | None = None
    if _NAME.fullmatch(ref):
        record = _read_record(_name_file(root, ref))
        if record is not None:
            image = _image_of(root, ref, record)
    prefix = ref.lower().removeprefix("sha256:")
    if image is None and len(prefix) >= DIGEST_PREFIX_MIN and _HEX.fullmatch(prefix):
        blobs = root / "blobs"
        matches = sorted(p.name for p in blobs.glob(f"{prefix}*") if _is_digest(p.name)) \
            if blobs.is_dir() else []
        if len(matches) > 1:
            raise ImageError(f"image digest prefix {ref!r} is ambiguous",
                             hint="give more digits; see vmrun image ls")
        if matches:
            digest = matches[0]
            names = [(n, r) for n, r in _named(root).items() if r["digest"] == digest]
            if names:
                image = _image_of(root, *names[0])
            else:
                blob = _blob(root, digest)
                image = StoredImage(name=None, digest=digest, path=blob,
                                    size=blob.stat().st_size, source="")
    if image is None:
        raise ImageError(f"no image {ref!r} in the store",
                         hint="see vmrun image ls, or vmrun image pull / import one")
    if not image.path.is_file():
        raise ImageError(f"image {ref!r}: its blob {image.digest[:12]} is missing",
                         hint=f"pull or import it again; see vmrun image rm {ref}")
    return image


def remove(name: str, cache: Path | None = None) -> None:
    """Forget NAME (its blob stays until prune finds nothing else uses it)."""
    root = _root(cache)
    if not _NAME.fullmatch(name):
        raise ImageError(f"no image named {name!r}", hint="see vmrun image ls")
    with _store_lock(root):
        try:
            _name_file(root, name).unlink()
        except FileNotFoundError:
            raise ImageError(f"no image named {name!r}", hint="see vmrun image ls") from None


def prune(
    cache: Path | None = None, *, in_use: Callable[[], set[str]] = lambda: set()
) -> list[str]:
    """Remove blobs that no name refers to and no live run uses; returns their digests.

    IN_USE gives the digests that live runs hold. Parts of downloads and imports that
    died (their lock is free) are removed too.
    """
    root = _root(cache)
    if not root.is_dir():
        return []
    _clean_leftovers(root, older_than=None)
    removed: list[str] = []
    with _store_lock(root):
        named = _named(root).values()
        keep = {record["digest"] for record in named} | set(in_use())
        keep |= {digest for record in named for digest in _backing_of(record)}
        blobs = root / "blobs"
        if blobs.is_dir():
            for blob in sorted(blobs.iterdir()):
                if _is_digest(blob.name) and blob.name not in keep:
                    blob.unlink()
                    removed.append(blob.name)
        index = root / "index"
        if index.is_dir():
            for entry in index.iterdir():
                target = entry.read_text().strip() if entry.is_file() else ""
                if not (_is_digest(target) and _blob(root, target).is_file()):
                    entry.unlink()
    return removed


def verify_blob(image: StoredImage) -> None:
    """Re-hash IMAGE's blob; ImageError if it no longer has its digest."""
    try:
        actual = sha256_file(image.path)
    except OSError as err:
        raise ImageError(f"base image {image.name or image.digest[:12]}: {err.strerror}",
                         hint="pull or import it again") from None
    if actual != image.digest:
        raise ImageError(
            f"base image changed: refusing {image.name or image.digest[:12]} "
            f"({image.path}: sha256 is {actual}, expected {image.digest})",
            hint="something wrote to the store; vmrun image rm its names and vmrun image "
            "prune, then pull or import it again",
        )


def check_unchanged(digest: str, path: Path) -> None:
    """verify_blob for a blob known only by DIGEST and PATH."""
    verify_blob(StoredImage(name=None, digest=digest, path=path, size=0, source=""))


# -- baked layers --


def add_layer(layer: Path, *, name: str, under: StoredImage, bake_key: str, source: str,
              cache: Path | None = None) -> StoredImage:
    """Store the qcow2 LAYER, whose backing file is UNDER, as NAME (a baked image).

    LAYER's header must already name UNDER by its digest alone (a name relative to the
    blobs directory), so the stored chain holds together by content, not by path.
    """
    from vmrun.images.disk import check_overlay

    root = _root(cache)
    root.mkdir(parents=True, exist_ok=True)
    check_name(name)
    check_overlay(layer)  # a run's overlay, written by a guest: intact before it is kept
    tmp = root / "tmp"
    key = f"layer-{secrets.token_hex(8)}"
    part = tmp / f"{key}.part"
    try:
        digest, size = _sparse_copy(layer, part)
        with _store_lock(root):
            _install_blob(root, part, digest, {})
            return _write_name(root, name, digest=digest, source=source, size=size,
                               fmt="qcow2", extra={"backing": [under.digest, *under.backing],
                                                   "bake_key": bake_key})
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()


def alias_name(name: str, image: StoredImage, cache: Path | None = None) -> StoredImage:
    """Point NAME at the same stored image (and chain) as IMAGE."""
    root = _root(cache)
    check_name(name)
    extra: dict[str, Any] = {}
    if image.backing:
        extra = {"backing": list(image.backing), "bake_key": image.bake_key}
    with _store_lock(root):
        return _write_name(root, name, digest=image.digest, source=image.source,
                           size=image.size, fmt=image.format, extra=extra)


def find_baked(bake_key: str, cache: Path | None = None) -> StoredImage | None:
    """A stored image baked (or built, see vmrun.build) from the inputs BAKE_KEY stands
    for, if one is complete."""
    root = _root(cache)
    for name, record in _named(root).items():
        image = _image_of(root, name, record)
        if image.bake_key == bake_key and image.path.is_file() and all(
                _blob(root, digest).is_file() for digest in image.backing):
            return image
    return None


def check_layer_chain(image: StoredImage, *, validate: Callable[[Path, bool], object],
                      cache: Path | None = None) -> None:
    """Check a baked image and everything under it before anything reads them.

    Each layer must pass VALIDATE (the header check, with a same-directory backing name
    allowed for layers), name exactly the next digest as its backing file, and still
    hash to its digest.
    """
    from vmrun.images.formats import inspect_image

    root = _root(cache)
    chain = [image.digest, *image.backing]
    for index, digest in enumerate(chain):
        path = _blob(root, digest)
        if not path.is_file():
            raise ImageError(f"image {image.name or image.digest[:12]}: layer "
                             f"{digest[:12]} is missing from the store",
                             hint="bake it again")
        below = chain[index + 1] if index + 1 < len(chain) else None
        validate(path, below is not None)
        header = inspect_image(path).qcow2
        named = header.backing_file if header is not None else None
        if named != below:
            raise ImageError(f"image {image.name or image.digest[:12]}: layer {digest[:12]} "
                             f"has backing file {named!r}, the store says {below!r}",
                             hint="bake it again")
        check_unchanged(digest, path)
