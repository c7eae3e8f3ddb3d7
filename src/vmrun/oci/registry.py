"""A registry HTTP API v2 client: manifests and blobs, Bearer tokens, Basic credentials.

Loopback registries are spoken to over plain HTTP (as docker does), any other over
HTTPS unless named insecure. Authorization is sent to the registry's own host only: a
redirect to another scheme, host or port (a CDN for blobs) drops it.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from vmrun.errors import FetchError, VerificationError
from vmrun.oci.auth import Credentials
from vmrun.oci.manifest import ACCEPT, MANIFEST_LIMIT, Descriptor
from vmrun.oci.reference import RegistryRef
from vmrun.progress import Progress

TIMEOUT_S = 60.0
ATTEMPTS = 3
_TOKEN_LIMIT = 1 << 20
_CHUNK = 1 << 20
# Blobs larger than this are uploaded in PATCH chunks of this size.
UPLOAD_CHUNK = 16 << 20
_CHALLENGE_PARAM = re.compile(r'\s*([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def is_loopback(host: str) -> bool:
    """Whether HOST (host[:port], IPv6 in brackets) is this machine."""
    if host.startswith("["):
        name = host[1:host.find("]")]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """A WWW-Authenticate header as (scheme, params): Bearer realm="...",service="..."."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        match = _CHALLENGE_PARAM.match(rest, position)
        if match is None or match.end() == position:
            break
        quoted, bare = match.group(2), match.group(3)
        params[match.group(1).lower()] = (re.sub(r"\\(.)", r"\1", quoted) if quoted is not None
                                          else bare or "")
        position = match.end()
    return scheme.lower(), params


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never carry Authorization to another origin, nor to ftp."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if new.scheme not in ("http", "https"):
            raise FetchError(f"{req.full_url}: redirected to {newurl}, not http(s)")
        if old.scheme == "https" and new.scheme == "http" and not is_loopback(new.netloc):
            raise FetchError(f"{req.full_url}: redirected from https to plain http {newurl}")
        request = super().redirect_request(req, fp, code, msg, headers, newurl)
        if request is not None and (old.scheme, old.netloc) != (new.scheme, new.netloc):
            request.remove_header("Authorization")
        return request


_OPENER = urllib.request.build_opener(_Redirects())


class Registry:
    """One repository on one registry, with the token its pulls earned."""

    def __init__(self, ref: RegistryRef, *, credentials: Credentials | None = None,
                 insecure: bool = False, actions: str = "pull") -> None:
        self.ref = ref
        self.credentials = credentials
        self.actions = actions  # the token scope's actions: "pull", or "pull,push"
        scheme = "http" if insecure or is_loopback(ref.api_host) else "https"
        self.base = f"{scheme}://{ref.api_host}/v2/{ref.repository}"
        self.authorization: str | None = None

    # -- requests --

    def _send(self, url: str, headers: dict[str, str], method: str,
              data: bytes | None) -> http.client.HTTPResponse:
        request = urllib.request.Request(url, headers={"User-Agent": "vmrun", **headers},
                                         method=method, data=data)
        if self.authorization is not None:
            request.add_header("Authorization", self.authorization)
        response: http.client.HTTPResponse = _OPENER.open(request, timeout=TIMEOUT_S)
        return response

    def open(self, url: str, headers: dict[str, str], *, method: str = "GET",
             data: bytes | None = None) -> http.client.HTTPResponse:
        """METHOD URL (GET by default), answering one authentication challenge;
        FetchError for HTTP errors."""
        for attempt in range(2):
            try:
                return self._send(url, headers, method, data)
            except urllib.error.HTTPError as err:
                if err.code == 401 and attempt == 0:
                    challenge = err.headers.get("WWW-Authenticate", "")
                    err.close()
                    self._authenticate(url, challenge)
                    continue
                err.close()
                raise self._error(url, err) from None
            except urllib.error.URLError as err:
                raise FetchError(f"{url}: {err.reason}") from None
        raise AssertionError("unreachable")

    def _error(self, url: str, err: urllib.error.HTTPError) -> FetchError:
        if err.code == 401:
            return FetchError(f"{url}: HTTP 401, not authorized",
                              hint="log in with docker login or podman login")
        if err.code == 404:
            return FetchError(f"{url}: HTTP 404, no such image, tag or blob in {self.ref}")
        return FetchError(f"{url}: HTTP {err.code} {err.reason}")

    def _authenticate(self, url: str, challenge: str) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.credentials is None:
                raise FetchError(f"{url}: the registry wants a user name and password",
                                 hint="log in with docker login or podman login")
            self.authorization = _basic(self.credentials)
        elif scheme == "bearer" and params.get("realm"):
            self.authorization = f"Bearer {self._token(params)}"
        else:
            raise FetchError(f"{url}: HTTP 401 with no usable challenge {challenge[:200]!r}")

    def _token(self, params: dict[str, str]) -> str:
        realm = params["realm"]
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise FetchError(f"token realm {realm!r} is not an http(s) URL")
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        query.setdefault("scope", f"repository:{self.ref.repository}:{self.actions}")
        url = realm + ("&" if parts.query else "?") + urllib.parse.urlencode(query)
        headers = {"User-Agent": "vmrun"}
        # Credentials go only where they cannot be read off the wire.
        if self.credentials is not None and (parts.scheme == "https" or is_loopback(
                parts.netloc)):
            headers["Authorization"] = _basic(self.credentials)
        try:
            with _OPENER.open(urllib.request.Request(url, headers=headers),
                              timeout=TIMEOUT_S) as response:
                body = response.read(_TOKEN_LIMIT + 1)
        except urllib.error.HTTPError as err:
            err.close()
            raise FetchError(f"token server {realm}: HTTP {err.code} {err.reason}",
                             hint="check the credentials (docker login)") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            raise FetchError(f"token server {realm}: {err}") from None
        try:
            document = json.loads(body[:_TOKEN_LIMIT])
        except ValueError:
            document = None
        token = (document.get("token") or document.get("access_token")
                 if isinstance(document, dict) else None)
        if not isinstance(token, str) or not token or len(body) > _TOKEN_LIMIT:
            raise FetchError(f"token server {realm}: no token in its answer")
        return token

    # -- the API --

    def manifest(self, reference: str) -> tuple[bytes, str | None, str]:
        """The manifest or index REFERENCE names: (bytes, Content-Type, sha256 digest)."""
        url = f"{self.base}/manifests/{reference}"
        try:
            with self.open(url, {"Accept": ACCEPT}) as response:
                data = response.read(MANIFEST_LIMIT + 1)
                content_type = response.headers.get("Content-Type")
        except (OSError, http.client.HTTPException) as err:
            raise FetchError(f"{url}: {err}") from None
        if len(data) > MANIFEST_LIMIT:
            raise FetchError(f"{url}: manifest larger than {MANIFEST_LIMIT} bytes")
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if reference.startswith("sha256:") and digest != reference:
            raise VerificationError(f"{url}: the manifest's digest is {digest}")
        return data, content_type, digest

    def blob(self, descriptor: Descriptor, part: Path, progress: Progress | None) -> None:
        """Fetch DESCRIPTOR's blob into PART, resuming what PART holds; verified on return.

        The caller holds PART's lock. Wrong bytes delete PART and raise
        VerificationError; a lost connection is retried, then left to resume later.
        """
        url = f"{self.base}/blobs/{descriptor.digest}"
        label = descriptor.digest[:19]
        failures = 0
        while True:
            hasher, done = _hash_part(part, descriptor.size)
            headers = {"Range": f"bytes={done}-"} if done else {}
            try:
                with self.open(url, headers) as response:
                    hasher, done = _receive(response, part, hasher, done, descriptor,
                                            label, progress)
                break
            except (OSError, http.client.HTTPException) as err:
                problem = str(err) or type(err).__name__
            failures += 1
            if failures >= ATTEMPTS:
                raise FetchError(f"{url}: {problem}", hint="run again to resume")
            time.sleep(0.2 * failures)
        if done != descriptor.size or f"sha256:{hasher.hexdigest()}" != descriptor.digest:
            part.unlink()
            raise VerificationError(f"{url}: the blob does not match its digest and size")

    # -- pushing --

    def has_blob(self, descriptor: Descriptor) -> bool:
        """Whether the repository already holds DESCRIPTOR's blob (HEAD, size checked)."""
        url = f"{self.base}/blobs/{descriptor.digest}"
        try:
            with self.open(url, {}, method="HEAD") as response:
                length = response.headers.get("Content-Length")
        except FetchError:
            return False
        except (OSError, http.client.HTTPException) as err:
            raise FetchError(f"{url}: {err}") from None
        return length is None or length == str(descriptor.size)

    def upload_blob(self, path: Path, descriptor: Descriptor,
                    progress: Progress | None = None) -> None:
        """Upload the file PATH as DESCRIPTOR's blob: one PUT when it is small, else PATCH
        chunks and a closing PUT; the registry checks the digest."""
        label = descriptor.digest[:19]
        location = self._start_upload()
        done = 0
        with open(path, "rb") as f:
            if descriptor.size > UPLOAD_CHUNK:
                while chunk := f.read(UPLOAD_CHUNK):
                    location = self._upload_chunk(location, chunk, done)
                    done += len(chunk)
                    if progress is not None:
                        progress(label, done, descriptor.size)
                body = b""
            else:
                body = f.read()
                done = len(body)
        if done != descriptor.size:
            raise FetchError(f"{path}: changed while it was being pushed")
        separator = "&" if urllib.parse.urlsplit(location).query else "?"
        url = f"{location}{separator}digest={urllib.parse.quote(descriptor.digest)}"
        self._request(url, "PUT", body, {"Content-Type": "application/octet-stream"})
        if progress is not None:
            progress(label, descriptor.size, descriptor.size)

    def _start_upload(self) -> str:
        url = f"{self.base}/blobs/uploads/"
        location = self._request(url, "POST", b"", {}).get("Location")
        if not location:
            raise FetchError(f"{url}: the registry gave no upload location")
        return urllib.parse.urljoin(url, location)

    def _upload_chunk(self, location: str, chunk: bytes, start: int) -> str:
        headers = self._request(location, "PATCH", chunk, {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{start}-{start + len(chunk) - 1}"})
        return urllib.parse.urljoin(location, headers.get("Location") or location)

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> str:
        """PUT DATA (a manifest or index of MEDIA_TYPE) as REFERENCE (a tag or its digest);
        returns its digest."""
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        url = f"{self.base}/manifests/{reference}"
        answered = self._request(url, "PUT", data, {"Content-Type": media_type}).get(
            "Docker-Content-Digest")
        if answered and answered != digest:
            raise VerificationError(f"{url}: the registry stored digest {answered}, "
                                    f"not {digest}")
        return digest

    def _request(self, url: str, method: str, data: bytes,
                 headers: dict[str, str]) -> http.client.HTTPMessage:
        try:
            with self.open(url, headers, method=method, data=data) as response:
                response.read(MANIFEST_LIMIT)
                return response.headers
        except (OSError, http.client.HTTPException) as err:
            raise FetchError(f"{method} {url}: {err}") from None


def _basic(credentials: Credentials) -> str:
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _hash_part(part: Path, size: int) -> tuple[Any, int]:
    hasher = hashlib.sha256()
    done = 0
    if part.is_file() and part.stat().st_size > size:
        os.truncate(part, 0)
    if part.is_file():
        with open(part, "rb") as f:
            while chunk := f.read(_CHUNK):
                hasher.update(chunk)
                done += len(chunk)
    else:
        part.touch()
    return hasher, done


def _receive(response: http.client.HTTPResponse, part: Path, hasher: Any, done: int,
             descriptor: Descriptor, label: str, progress: Progress | None) -> tuple[Any, int]:
    """Append RESPONSE's body to PART (from the start if the server ignored the range)."""
    if done and response.status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
        if match is None or int(match.group(1)) != done:
            raise FetchError(f"{label}: the server answered the wrong range")
    elif done:
        hasher, done = hashlib.sha256(), 0
    with open(part, "r+b") as out:
        out.seek(done)
        out.truncate()
        if progress is not None:
            progress(label, done, descriptor.size)
        while chunk := response.read(_CHUNK):
            done += len(chunk)
            if done > descriptor.size:
                out.truncate(0)
                raise VerificationError(f"{label}: longer than its {descriptor.size} bytes")
            out.write(chunk)
            hasher.update(chunk)
            if progress is not None:
                progress(label, done, descriptor.size)
        out.flush()
        os.fsync(out.fileno())
    if done < descriptor.size:
        raise ConnectionError(f"connection closed after {done} of {descriptor.size} bytes")
    return hasher, done
