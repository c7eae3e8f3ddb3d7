"""Test OCI images built in Python, pushed by hand, and real registries to push them to."""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import http.server
import io
import json
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmrun.oci import manifest as mf

BUSYBOX = Path("/bin/busybox")
REGISTRY = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")
HTPASSWD = shutil.which("htpasswd")
TAR2SQFS = shutil.which("tar2sqfs")
SQFS2TAR = shutil.which("sqfs2tar")


# -- tar members --


def _info(name: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, 1_700_000_000
    return info


@dataclass(frozen=True)
class Entry:
    info: tarfile.TarInfo
    data: bytes = b""


def file(name: str, data: bytes | str, mode: int = 0o644, uid: int = 0, gid: int = 0,
         xattrs: dict[str, str] | None = None) -> Entry:
    body = data.encode() if isinstance(data, str) else data
    info = _info(name, tarfile.REGTYPE, mode, uid, gid)
    info.size = len(body)
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return Entry(info, body)


def directory(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(_info(name, tarfile.DIRTYPE, mode, uid, gid))


def symlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.SYMTYPE, 0o777)
    info.linkname = target
    return Entry(info)


def hardlink(name: str, target: str) -> Entry:
    info = _info(name, tarfile.LNKTYPE, 0o644)
    info.linkname = target
    return Entry(info)


def device(name: str, kind: str, major: int, minor: int, mode: int = 0o666) -> Entry:
    info = _info(name, tarfile.CHRTYPE if kind == "c" else tarfile.BLKTYPE, mode)
    info.devmajor, info.devminor = major, minor
    return Entry(info)


def fifo(name: str) -> Entry:
    return Entry(_info(name, tarfile.FIFOTYPE, 0o644))


def whiteout(path: str) -> Entry:
    parent, _, name = path.rpartition("/")
    return file(f"{parent}/.wh.{name}" if parent else f".wh.{name}", b"")


def opaque(directory_path: str) -> Entry:
    return file(f"{directory_path}/.wh..wh..opq", b"")


def tar_of(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            tar.addfile(entry.info, io.BytesIO(entry.data) if entry.info.isreg() else None)
    return out.getvalue()


def compress(tar: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(tar, compresslevel=1, mtime=0)
    if compression == "zstd":
        import zstandard
        return zstandard.ZstdCompressor().compress(tar)
    return tar


# -- images --

_LAYER_TYPES = {"": mf.OCI_LAYER, "gzip": mf.OCI_LAYER_GZIP, "zstd": mf.OCI_LAYER_ZSTD}


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


@dataclass
class Image:
    """An image as blobs: config, layers and the manifest naming them."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifest: bytes = b""
    media_type: str = mf.OCI_MANIFEST

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    def descriptor(self, platform: dict[str, str] | None = None) -> dict[str, Any]:
        described: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                                     "size": len(self.manifest)}
        if platform is not None:
            described["platform"] = platform
        return described


def make_image(layers: list[tuple[list[Entry], str]], *, architecture: str = "amd64",
               config: dict[str, Any] | None = None, docker: bool = False,
               diff_ids: list[str] | None = None) -> Image:
    """An image of LAYERS ((entries, compression) lowest first); DOCKER for schema2 types."""
    image = Image()
    layer_descriptors, ids = [], []
    for entries, compression in layers:
        tar = tar_of(entries)
        blob = compress(tar, compression)
        image.blobs[digest_of(blob)] = blob
        media_type = (mf.DOCKER_LAYER_GZIP if docker and compression == "gzip"
                      else _LAYER_TYPES[compression])
        layer_descriptors.append({"mediaType": media_type, "digest": digest_of(blob),
                                  "size": len(blob)})
        ids.append(digest_of(tar))
    config_blob = json.dumps({
        "architecture": architecture, "os": "linux",
        "config": config or {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids if diff_ids is not None else ids},
    }).encode()
    image.blobs[digest_of(config_blob)] = config_blob
    image.media_type = mf.DOCKER_MANIFEST if docker else mf.OCI_MANIFEST
    image.manifest = json.dumps({
        "schemaVersion": 2, "mediaType": image.media_type,
        "config": {"mediaType": mf.DOCKER_CONFIG if docker else mf.OCI_CONFIG,
                   "digest": digest_of(config_blob), "size": len(config_blob)},
        "layers": layer_descriptors,
    }).encode()
    return image


@dataclass
class Index:
    manifest: bytes
    images: list[Image]
    media_type: str = mf.OCI_INDEX

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)


def make_index(images: dict[str, Image]) -> Index:
    """An index of IMAGES by platform ("arm64/v8", "amd64", ...)."""
    entries = []
    for platform, image in images.items():
        architecture, _, variant = platform.partition("/")
        described = {"os": "linux", "architecture": architecture}
        if variant:
            described["variant"] = variant
        entries.append(image.descriptor(described))
    body = json.dumps({"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": entries})
    return Index(body.encode(), list(images.values()))


def write_layout(path: Path, top: Image | Index, tag: str) -> Path:
    """An OCI image layout at PATH holding TOP under TAG."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    images = top.images if isinstance(top, Index) else [top]
    for image in images:
        for digest, blob in {**image.blobs, image.digest: image.manifest}.items():
            (blobs / digest.removeprefix("sha256:")).write_bytes(blob)
    if isinstance(top, Index):
        (blobs / top.digest.removeprefix("sha256:")).write_bytes(top.manifest)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    described = {"mediaType": top.media_type, "digest": top.digest, "size": len(top.manifest),
                 "annotations": {"org.opencontainers.image.ref.name": tag}}
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2,
                                                 "manifests": [described]}))
    return path


def busybox_layer() -> list[Entry]:
    return [directory("bin"), file("bin/busybox", BUSYBOX.read_bytes(), 0o755),
            symlink("bin/sh", "busybox"), symlink("bin/ls", "busybox")]


def read_tar(data: bytes) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    entries: dict[str, tuple[tarfile.TarInfo, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            name = info.name.removeprefix("./").rstrip("/") or "."
            assert name not in entries, f"{name} twice"
            body = tar.extractfile(info).read() if info.isreg() else b""  # type: ignore[union-attr]
            entries[name] = (info, body)
    return entries


def marker_image(arch: str) -> Image:
    return make_image([
        (busybox_layer(), "gzip"),
        ([directory("etc"), file("etc/arch", arch), file("etc/gone", "x")], "zstd"),
        ([whiteout("etc/gone")], ""),
    ], architecture=arch.partition("/")[0],
        config={"Env": ["PATH=/bin", "ARCH=" + arch], "Entrypoint": ["/bin/sh"],
                "Cmd": ["-c", "cat /etc/arch"], "WorkingDir": "/etc", "User": "1000"})


def multiarch_layout(path: Path) -> Path:
    index = make_index({p: marker_image(p) for p in ("amd64", "arm64/v8", "s390x")})
    return write_layout(path, index, "multi")


def files_of(image: Path) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    listing = subprocess.run([str(SQFS2TAR), str(image)], check=True,
                             capture_output=True).stdout
    return read_tar(listing)


# -- pushing (monolithic uploads) --


def push(base: str, repository: str, tag: str, top: Image | Index,
         headers: dict[str, str] | None = None) -> None:
    """Push TOP to the registry at BASE (http://host:port) as REPOSITORY:TAG."""
    images = top.images if isinstance(top, Index) else [top]
    for image in images:
        for digest, blob in image.blobs.items():
            _upload(base, repository, digest, blob, headers or {})
        _put_manifest(base, repository, image.digest, image.manifest, image.media_type,
                      headers or {})
    _put_manifest(base, repository, tag, top.manifest, top.media_type, headers or {})


def _upload(base: str, repository: str, digest: str, blob: bytes,
            headers: dict[str, str]) -> None:
    start = urllib.request.Request(f"{base}/v2/{repository}/blobs/uploads/", method="POST",
                                   headers=headers, data=b"")
    with urllib.request.urlopen(start, timeout=30) as response:
        location = response.headers["Location"]
    if location.startswith("/"):
        location = base + location
    url = location + ("&" if "?" in location else "?") + f"digest={digest}"
    put = urllib.request.Request(url, method="PUT", data=blob, headers={
        **headers, "Content-Type": "application/octet-stream"})
    urllib.request.urlopen(put, timeout=30).close()


def _put_manifest(base: str, repository: str, reference: str, body: bytes, media_type: str,
                  headers: dict[str, str]) -> None:
    put = urllib.request.Request(f"{base}/v2/{repository}/manifests/{reference}", method="PUT",
                                 data=body, headers={**headers, "Content-Type": media_type})
    urllib.request.urlopen(put, timeout=30).close()


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# -- servers --


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class RunningRegistry:
    base: str  # http://127.0.0.1:PORT
    host: str  # 127.0.0.1:PORT
    storage: Path


@contextlib.contextmanager
def registry(workdir: Path, *, htpasswd: Path | None = None) -> Iterator[RunningRegistry]:
    """Debian's docker-registry on 127.0.0.1, storage in WORKDIR, killed afterwards."""
    assert REGISTRY is not None
    port = free_port()
    storage = workdir / "storage"
    storage.mkdir(parents=True)
    auth = (f"auth:\n  htpasswd:\n    realm: vmrun-test\n    path: {htpasswd}\n"
            if htpasswd else "")
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{auth}")
    log = open(workdir / "registry.log", "wb")
    process = subprocess.Popen([REGISTRY, "serve", str(config)], stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(base + "/v2/", process, workdir / "registry.log")
        yield RunningRegistry(base, f"127.0.0.1:{port}", storage)
    finally:
        process.kill()
        process.wait()
        log.close()


def _wait_for(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"registry died: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return
        except urllib.error.HTTPError:
            return  # 401: up, and wanting credentials
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"registry did not answer in time: {log.read_text()[-2000:]}")


def write_htpasswd(path: Path, user: str, password: str) -> Path:
    assert HTPASSWD is not None
    subprocess.run([HTPASSWD, "-B", "-b", "-c", str(path), user, password], check=True,
                   capture_output=True)
    return path


@dataclass
class Seen:
    """What a test server was asked: (method, path, headers) per request."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, path: str, headers: dict[str, str]) -> None:
        with self.lock:
            self.requests.append((method, path, headers))


Handler = Callable[[http.server.BaseHTTPRequestHandler, Seen], None]


@contextlib.contextmanager
def serve(handle: Handler) -> Iterator[tuple[str, Seen]]:
    """A threaded HTTP server on 127.0.0.1 calling HANDLE per GET; yields (base, seen)."""
    seen = Seen()

    class _Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            seen.add("GET", self.path, dict(self.headers.items()))
            handle(self, seen)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def reply(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"",
          headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def forward(handler: http.server.BaseHTTPRequestHandler, url: str,
            extra: dict[str, str] | None = None) -> None:
    """Answer HANDLER's GET with what URL answers (headers Accept and Range passed on)."""
    headers = {k: v for k, v in handler.headers.items() if k.lower() in ("accept", "range")}
    request = urllib.request.Request(url, headers={**headers, **(extra or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body, status = response.read(), response.status
            kept = {k: v for k, v in response.headers.items()
                    if k.lower() in ("content-type", "docker-content-digest", "content-range")}
    except urllib.error.HTTPError as err:
        body, status = err.read(), err.code
        kept = {"Content-Type": err.headers.get("Content-Type", "text/plain")}
    reply(handler, status, body, kept)
