"""A throwaway OpenPGP signing key and a real HTTP Debian mirror, for the archive tests."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import lzma
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

SUITE = "bookworm"
ARCH = "amd64"


@dataclass(frozen=True)
class Signer:
    home: str
    keyring: Path


@dataclass(frozen=True)
class Mirror:
    root: Path
    url: str
    server: http.server.ThreadingHTTPServer

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def have_gpg() -> bool:
    return shutil.which("gpg") is not None and shutil.which("gpgv") is not None


@contextlib.contextmanager
def signing_key() -> Iterator[Signer]:
    """A fresh ed25519 signing key in a temporary GnuPG home, and its public keyring."""
    # Short path: gpg-agent's socket path must fit in sun_path.
    home = tempfile.mkdtemp(prefix="vg", dir="/tmp")
    try:
        gpg = ["gpg", "--homedir", home, "--batch", "--pinentry-mode", "loopback"]
        subprocess.run(
            [*gpg, "--passphrase", "", "--quick-gen-key", "vmrun test <t@vmrun.invalid>"]
            + ["ed25519", "sign", "never"],
            check=True,
            capture_output=True,
        )
        keyring = Path(home) / "keyring.gpg"
        subprocess.run([*gpg, "--output", str(keyring), "--export"], check=True)
        yield Signer(home=home, keyring=keyring)
    finally:
        subprocess.run(["gpgconf", "--homedir", home, "--kill", "all"], check=False)
        shutil.rmtree(home, ignore_errors=True)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve(root: Path, handler: type[http.server.SimpleHTTPRequestHandler] = QuietHandler,
          ) -> Iterator[Mirror]:
    """An HTTP server on 127.0.0.1 serving ROOT, with the mirror at /debian/."""
    root.mkdir(parents=True, exist_ok=True)
    bound = functools.partial(handler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), bound)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    served = Mirror(
        root=root, url=f"http://127.0.0.1:{server.server_address[1]}/debian/", server=server
    )
    try:
        yield served
    finally:
        if server.socket.fileno() != -1:
            served.stop()
        thread.join(timeout=5)


# -- building the archive --


def small_deb(name: str, version: str, files: dict[str, bytes] | None = None) -> bytes:
    """A real .deb holding FILES (default: usr/bin/NAME)."""

    def tar_gz(files: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path, data in files.items():
                info = tarfile.TarInfo(path)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        # mtime=0: the same package built twice has the same bytes.
        return gzip.compress(buffer.getvalue(), mtime=0)

    if files is None:
        files = {f"usr/bin/{name}": b"binary of " + name.encode()}
    tree = {f"./{path}": content for path, content in files.items()}
    control = f"Package: {name}\nVersion: {version}\nArchitecture: {ARCH}\n".encode()
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.gz", tar_gz({"./control": control})),
        ("data.tar.gz", tar_gz(tree)),
    ]
    out = bytearray(b"!<arch>\n")
    for member, data in members:
        out += f"{member + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    extra: str = ""
    files: dict[str, bytes] | None = field(default=None, compare=False)


PACKAGES = [
    Package("busybox-static", "1:1.30-1"),
    Package("busybox-static", "1:1.35.0-4+b3", "Depends: libc6 (>= 2.34) | musl:any, zlib1g\n"),
    Package("busybox-static", "1:1.35.0~rc1-1"),
    Package("libc6", "2.36-9", "Provides: libc-any (= 2.36)\nPre-Depends: libgcc-s1\n"),
    Package("zlib1g", "1:1.2.13.dfsg-1"),
]


def build_archive(
    mirror: Mirror,
    *,
    signer: Signer | None,
    compression: str = "xz",
    suite_field: str = SUITE,
    valid_until: datetime | None = None,
    by_hash: bool = False,
    packages: list[Package] | None = None,
) -> None:
    """Write a Debian archive of PACKAGES under MIRROR, its InRelease signed by SIGNER
    (None: a fake signature)."""
    root = mirror.root / "debian"
    stanzas = []
    for package in PACKAGES if packages is None else packages:
        deb = small_deb(package.name, package.version, package.files)
        upstream = package.version.split(":")[-1]
        filename = (
            f"pool/main/{package.name[0]}/{package.name}/{package.name}_{upstream}_{ARCH}.deb"
        )
        (root / filename).parent.mkdir(parents=True, exist_ok=True)
        (root / filename).write_bytes(deb)
        stanzas.append(
            f"Package: {package.name}\nVersion: {package.version}\nArchitecture: {ARCH}\n"
            f"{package.extra}Filename: {filename}\nSize: {len(deb)}\n"
            f"SHA256: {hashlib.sha256(deb).hexdigest()}\nDescription: test\n multi-line\n"
        )
    plain = "\n".join(stanzas).encode()
    binary = root / "dists" / SUITE / "main" / f"binary-{ARCH}"
    binary.mkdir(parents=True)
    files = {"Packages": plain}
    if compression == "xz":
        files["Packages.xz"] = lzma.compress(plain)
    elif compression == "gz":
        files["Packages.gz"] = gzip.compress(plain)
    lines = []
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (binary / name).write_bytes(data)
        if by_hash:
            (binary / "by-hash" / "SHA256").mkdir(parents=True, exist_ok=True)
            (binary / "by-hash" / "SHA256" / digest).write_bytes(data)
        lines.append(f" {digest} {len(data):>8} main/binary-{ARCH}/{name}")
    if compression != "plain":
        # Like Debian: the plain index is listed but not served.
        (binary / "Packages").unlink()
    now = datetime.now(UTC)
    release = (
        f"Origin: Test\nSuite: {suite_field}\nCodename: {suite_field}\n"
        f"Date: {format_datetime(now, usegmt=True)}\n"
        + (f"Valid-Until: {format_datetime(valid_until, usegmt=True)}\n" if valid_until else "")
        + ("Acquire-By-Hash: yes\n" if by_hash else "")
        + f"Architectures: {ARCH}\nComponents: main\nSHA256:\n"
        + "\n".join(lines)
        + "\n"
    )
    dist = root / "dists" / SUITE
    (dist / "Release").write_text(release)
    if signer is None:
        fake = f"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n{release}"
        fake += "-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n"
        (dist / "InRelease").write_text(fake)
    else:
        subprocess.run(
            ["gpg", "--homedir", signer.home, "--batch", "--yes", "--clearsign"]
            + ["--output", str(dist / "InRelease"), str(dist / "Release")],
            check=True,
            capture_output=True,
        )


@dataclass
class Behaviour:
    """What a recording_handler server does; tests change it between requests."""

    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)
    cut_path: str | None = None  # requests for a path ending so are cut short...
    cuts: int = 0  # ...this many times...
    cut_at: int = 0  # ...after this many bytes of the body
    ranges: bool = True  # whether Range requests are honoured
    fail_after_cut: bool = False  # answer 503 to the cut path once the cuts are spent
    lock: threading.Lock = field(default_factory=threading.Lock)


def recording_handler(behaviour: Behaviour) -> type[QuietHandler]:
    """A file server that logs each GET, honours "Range: bytes=N-" and can cut bodies."""

    class Handler(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            wanted = self.headers.get("Range")
            with behaviour.lock:
                behaviour.requests.append((self.path, wanted))
                cut = (behaviour.cut_path is not None
                       and self.path.endswith(behaviour.cut_path))
                if cut and behaviour.cuts > 0:
                    behaviour.cuts -= 1
                    short = True
                elif cut and behaviour.fail_after_cut:
                    self.send_error(503)
                    return
                else:
                    short = False
            path = Path(self.translate_path(self.path))
            if not path.is_file():
                self.send_error(404)
                return
            data = path.read_bytes()
            start = 0
            if wanted and behaviour.ranges and wanted.startswith("bytes="):
                start = int(wanted[len("bytes="):].rstrip("-"))
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            body = data[start:]
            if short:
                self.wfile.write(body[: behaviour.cut_at])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler
