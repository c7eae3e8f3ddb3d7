"""Resumable HTTP downloads checked against a known hash: the image store's and the archive's.

A download writes ``<key>.part`` beside a ``<key>.json`` sidecar (URL, expected hash,
ETag); whoever holds ``<key>.lock`` owns both. A part left by a download that died is
resumed with a Range request by the next attempt at the same URL and hash. Bytes that
do not verify are deleted, so nothing unverified ever reaches a final name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import os
import posixpath
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmrun.cache import key_of, locked, sha256_file
from vmrun.errors import FetchError, VerificationError
from vmrun.progress import Progress

Notice = Callable[[str], None]

TIMEOUT_S = 60.0
# Downloads read big pieces: fewer Python-level loops per byte hashed and written.
_DOWNLOAD_CHUNK = 1 << 20
# Consecutive attempts without new bytes before a download gives up (and stays resumable).
ATTEMPTS = 3
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class Expected:
    """A hash the downloaded bytes must have."""

    algorithm: str  # "sha256" or "sha512"
    hexdigest: str


def _quiet(message: str) -> None:
    pass


def open_url(url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    """GET URL; raises urllib's errors as they come."""
    request = urllib.request.Request(url, headers={"User-Agent": "vmrun", **headers})
    response: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    return response


def _new_hashers(expected: Expected) -> dict[str, Any]:
    hashers: dict[str, Any] = {"sha256": hashlib.sha256()}
    hashers.setdefault(expected.algorithm, hashlib.new(expected.algorithm))
    return hashers


def read_sidecar(path: Path) -> dict[str, Any]:
    """A part's sidecar, or {} when it is missing or unreadable."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_sidecar(path: Path, state: dict[str, Any]) -> None:
    # One writer at a time (the URL's lock), so a fixed temp name will do.
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def _discard(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class _Restart(Exception):
    """The bytes kept cannot be continued: start the file again at once."""


@dataclass
class _Transfer:
    """One file coming in: the part written so far, its running hashes, its sidecar."""

    url: str
    expected: Expected
    part: Path
    sidecar: Path
    label: str
    size: int | None
    progress: Progress | None
    notice: Notice
    state: dict[str, Any] = field(default_factory=dict)
    hashers: dict[str, Any] = field(default_factory=dict)
    done: int = 0

    def resume(self) -> bool:
        """Take up the part left by an earlier attempt of the same file (rehashing it);
        whether there was anything to resume."""
        self.state = read_sidecar(self.sidecar)
        fresh = {"url": self.url, "algorithm": self.expected.algorithm,
                 "expected": self.expected.hexdigest}
        if {k: self.state.get(k) for k in fresh} != fresh or not self.part.is_file():
            # Bytes of another URL or of another version of this one: start again.
            self.part.write_bytes(b"")
            self.state = dict(fresh)
            _write_sidecar(self.sidecar, self.state)
        self.hashers = _new_hashers(self.expected)
        with open(self.part, "rb") as f:
            while chunk := f.read(1 << 20):
                self._hash(chunk)
        if self.done:
            self.notice(f"resuming {self.label} at byte {self.done}")
        return self.done > 0

    def _hash(self, chunk: bytes) -> None:
        for hasher in self.hashers.values():
            hasher.update(chunk)
        self.done += len(chunk)

    def restart(self) -> None:
        self.hashers = _new_hashers(self.expected)
        self.done = 0
        os.truncate(self.part, 0)

    def attempt(self) -> str | None:
        """One request: None when the file is complete, else what went wrong (the caller
        retries). Raises _Restart when the kept bytes cannot be continued, FetchError or
        VerificationError when retrying cannot help."""
        headers: dict[str, str] = {}
        if self.done:
            headers["Range"] = f"bytes={self.done}-"
            if isinstance(self.state.get("etag"), str):
                headers["If-Range"] = self.state["etag"]
        try:
            response = open_url(self.url, headers)
        except urllib.error.HTTPError as err:
            if err.code == 416 and self.done:
                self.restart()  # the part is longer than the file is now
                raise _Restart() from None
            raise FetchError(f"{self.url}: HTTP {err.code} {err.reason}") from None
        except urllib.error.URLError as err:
            return str(err.reason)
        except (OSError, http.client.HTTPException) as err:
            return str(err)
        with response:
            total = self._accept(response)
            problem = self._receive(response, total)
        if self.size is not None and self.done > self.size:
            _discard(self.part, self.sidecar)
            raise VerificationError(f"{self.url}: longer than the expected {self.size} bytes")
        if total is not None and self.done > total:
            self.restart()
            raise FetchError(f"{self.url}: the server sent more than its {total} bytes")
        if problem is None and total is not None and self.done < total:
            problem = f"connection closed after {self.done} of {total} bytes"
        if problem is None and self.progress is not None and total is None:
            self.progress(self.label, self.done, self.done)  # the end, of unknown length
        return problem

    def _accept(self, response: http.client.HTTPResponse) -> int | None:
        """The file's total length as RESPONSE gives it, once its status and range are
        what was asked for (_Restart when they are not); remembers a strong ETag."""
        length = response.headers.get("Content-Length")
        total: int | None = None
        if response.status == 206 and self.done:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if match is None or int(match.group(1)) != self.done:
                self.restart()
                raise _Restart()
            if match.group(3) != "*":
                total = int(match.group(3))
            elif length is not None and length.isdigit():
                total = self.done + int(length)
        elif response.status == 200:
            if self.done:
                self.notice(f"{self.url}: the server ignored the range; downloading from the "
                            "start")
                self.restart()
            total = int(length) if length is not None and length.isdigit() else None
        else:
            raise FetchError(f"{self.url}: unexpected HTTP status {response.status}")
        etag = response.headers.get("ETag")
        if etag and not etag.startswith("W/") and self.state.get("etag") != etag:
            self.state["etag"] = etag
            _write_sidecar(self.sidecar, self.state)
        return total

    def _receive(self, response: http.client.HTTPResponse, total: int | None) -> str | None:
        """Append RESPONSE's body to the part (synced); what broke the stream, if anything."""
        problem = None
        with open(self.part, "r+b") as out:
            out.seek(self.done)
            out.truncate()
            if self.progress is not None:
                self.progress(self.label, self.done, total)
            while True:
                try:
                    chunk = response.read(_DOWNLOAD_CHUNK)
                except (OSError, http.client.HTTPException) as err:
                    problem = str(err) or type(err).__name__
                    break
                if not chunk:
                    break
                out.write(chunk)
                self._hash(chunk)
                if self.size is not None and self.done > self.size:
                    break
                if self.progress is not None:
                    self.progress(self.label, self.done, total)
            out.flush()
            os.fsync(out.fileno())
        return problem


def download(
    url: str, expected: Expected, part: Path, sidecar: Path, *,
    progress: Progress | None, notice: Notice, size: int | None = None,
    label: str | None = None,
) -> dict[str, str]:
    """Fetch URL into PART, resuming what is there; returns its verified hex digests.

    The caller holds URL's lock. A wrong hash, or more than SIZE bytes when SIZE is
    known, deletes PART; any other failure leaves it for the next attempt to resume.
    LABEL names the file in progress reports and notices (default: the URL's basename).
    """
    label = label or posixpath.basename(urllib.parse.urlsplit(url).path) or url
    transfer = _Transfer(url, expected, part, sidecar, label, size, progress, notice)
    resumed = transfer.resume()
    high_water, failures = transfer.done, 0
    while True:
        try:
            problem = transfer.attempt()
        except _Restart:
            continue
        if problem is None:
            break
        if transfer.done > high_water:
            high_water, failures = transfer.done, 0
        failures += 1
        if failures >= ATTEMPTS:
            raise FetchError(
                f"{url}: download failed: {problem}",
                hint="run the same command again to resume" if transfer.done else None,
            )
        notice(f"{label}: {problem}; retrying")
        time.sleep(0.2 * failures)

    done = transfer.done
    actual = {algorithm: h.hexdigest() for algorithm, h in transfer.hashers.items()}
    if actual[expected.algorithm] != expected.hexdigest or (size is not None and done != size):
        _discard(part, sidecar)
        if resumed:
            # The bytes kept from before may belong to an older file under the same URL.
            notice(f"{label}: resumed download does not verify; downloading it again")
            return download(url, expected, part, sidecar, progress=progress, notice=notice,
                            size=size, label=label)
        if size is not None and done != size:
            raise VerificationError(f"{url}: got {done} bytes, expected {size}")
        raise VerificationError(
            f"{url}: {expected.algorithm} is {actual[expected.algorithm]}, "
            f"expected {expected.hexdigest}",
            hint="the download was discarded; check the URL and the checksum",
        )
    return actual


@contextlib.contextmanager
def lock_if_free(path: Path) -> Iterator[bool]:
    """Try PATH's flock without waiting; yields whether it was free (and is now held)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            yield False
            return
        yield True
    finally:
        os.close(fd)


def remove_dead_parts(work: Path, *, older_than: float) -> list[Path]:
    """Remove parts in WORK whose lock is free and that are OLDER_THAN seconds old.

    A part that has no sidecar naming its URL cannot be resumed and goes at once.
    Lock files stay: another process may have one open and be waiting on it.
    """
    removed: list[Path] = []
    if not work.is_dir():
        return removed
    now = time.time()
    for part in sorted(work.glob("*.part")):
        sidecar = part.with_suffix(".json")
        resumable = isinstance(read_sidecar(sidecar).get("url"), str)
        with contextlib.suppress(FileNotFoundError):
            if resumable and now - part.stat().st_mtime < older_than:
                continue
        with lock_if_free(part.with_suffix(".lock")) as free:
            if free and part.exists():
                _discard(part, sidecar, sidecar.with_name(f".{sidecar.name}.new"))
                removed.append(part)
    return removed


def fetch_verified(
    url: str, final: Path, expected: Expected, *, size: int | None, work: Path,
    progress: Progress | None = None, notice: Notice = _quiet, label: str | None = None,
) -> Path:
    """FINAL, holding URL's bytes verified against EXPECTED (and SIZE when known).

    A FINAL already there is kept only if it verifies. The download goes through
    WORK/<key>.part under WORK/<key>.lock, so concurrent callers make one download and
    a download that died is resumed. Raises FetchError or VerificationError.
    """
    key = key_of("download", url, expected.algorithm, expected.hexdigest)
    with locked(work / f"{key}.lock"):
        # A good copy, perhaps put there by whoever held the lock before us.
        if _verifies(final, expected, size):
            return final
        part, sidecar = work / f"{key}.part", work / f"{key}.json"
        download(url, expected, part, sidecar, progress=progress, notice=notice, size=size,
                 label=label)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
        _discard(sidecar)
    return final


def _verifies(path: Path, expected: Expected, size: int | None) -> bool:
    """Whether PATH holds the expected bytes; a file that does not is removed."""
    try:
        if size is not None and path.stat().st_size != size:
            path.unlink()
            return False
        actual = _hexdigest(path, expected.algorithm)
    except FileNotFoundError:
        return False
    if actual == expected.hexdigest:
        return True
    _discard(path)
    return False


def _hexdigest(path: Path, algorithm: str) -> str:
    if algorithm == "sha256":
        return sha256_file(path)
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
