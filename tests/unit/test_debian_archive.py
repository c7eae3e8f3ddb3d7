from __future__ import annotations

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
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from vmrun.debian import DEFAULT_MIRROR, mirror_from_env
from vmrun.debian.archive import (
    PackageIndex,
    compare_versions,
    fetch_deb,
    load_index,
    parse_relations,
    strip_clearsign,
)
from vmrun.debian.deb import read_control
from vmrun.errors import FetchError, VerificationError

SUITE = "bookworm"
ARCH = "amd64"
needs_gpg = pytest.mark.skipif(
    shutil.which("gpg") is None or shutil.which("gpgv") is None, reason="gpg is not installed"
)


# -- fixtures: a throwaway signing key and a real HTTP mirror --


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


@pytest.fixture(scope="session")
def signer() -> Iterator[Signer]:
    if shutil.which("gpg") is None or shutil.which("gpgv") is None:
        pytest.skip("gpg is not installed")
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


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    root = tmp_path / "mirror"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
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


def small_deb(name: str, version: str) -> bytes:
    def tar_gz(files: dict[str, bytes]) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path, data in files.items():
                info = tarfile.TarInfo(path)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    control = f"Package: {name}\nVersion: {version}\nArchitecture: {ARCH}\n".encode()
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.gz", tar_gz({"./control": control})),
        ("data.tar.gz", tar_gz({f"./usr/bin/{name}": b"binary of " + name.encode()})),
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
) -> None:
    root = mirror.root / "debian"
    stanzas = []
    for package in PACKAGES:
        deb = small_deb(package.name, package.version)
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


def no_keyring(tmp_path: Path) -> Path:
    return tmp_path / "no-such-keyring.gpg"


# -- tests --


@needs_gpg
def test_happy_path(tmp_path: Path, mirror: Mirror, signer: Signer) -> None:
    build_archive(mirror, signer=signer)
    cache = tmp_path / "cache"
    notices: list[str] = []
    seen: list[tuple[str, int, int | None]] = []

    def progress(label: str, done: int, total: int | None) -> None:
        seen.append((label, done, total))

    index = load_index(
        mirror=mirror.url,
        suite=SUITE,
        arch=ARCH,
        cache=cache,
        keyring=signer.keyring,
        notice=notices.append,
        progress=progress,
    )
    assert index.signed and notices == []
    assert index.mirror == mirror.url.rstrip("/")
    assert seen and seen[-1][0] == f"main/binary-{ARCH}/Packages.xz" and seen[-1][1] == seen[-1][2]
    record = index.lookup("busybox-static")
    assert record.version == "1:1.35.0-4+b3"
    assert record.depends == (("libc6", "musl"), ("zlib1g",))
    assert index.lookup("libc6").depends == (("libgcc-s1",),)
    assert index.lookup("libc-any").name == "libc6"

    deb = fetch_deb(index, record, cache=cache, progress=progress)
    assert deb == cache / "debs" / f"{record.sha256}.deb"
    assert hashlib.sha256(deb.read_bytes()).hexdigest() == record.sha256
    assert read_control(deb)["Version"] == "1:1.35.0-4+b3"
    assert seen[-1] == (Path(record.filename).name, record.size, record.size)

    # Reused from the cache: the mirror copy is gone and it still works.
    (mirror.root / "debian" / record.filename).unlink()
    assert fetch_deb(index, record, cache=cache) == deb


def test_missing_package(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None)
    index = load_index(
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, keyring=no_keyring(tmp_path)
    )
    with pytest.raises(FetchError, match=f"package nope not found in {SUITE}/{ARCH} at http"):
        index.lookup("nope")


def test_no_keyring_works_with_a_notice(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None)
    notices: list[str] = []
    index = load_index(
        mirror=mirror.url,
        suite=SUITE,
        arch=ARCH,
        cache=tmp_path / "cache",
        keyring=no_keyring(tmp_path),
        notice=notices.append,
    )
    assert not index.signed
    assert len(notices) == 1 and "without a signature check" in notices[0]
    assert "\n" not in notices[0]
    assert index.lookup("zlib1g").version == "1:1.2.13.dfsg-1"


@needs_gpg
def test_keyring_from_environment(
    tmp_path: Path, mirror: Mirror, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_archive(mirror, signer=signer)
    monkeypatch.setenv("VMRUN_DEBIAN_KEYRING", str(signer.keyring))
    index = load_index(mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path)
    assert index.signed


@needs_gpg
def test_bad_signature(tmp_path: Path, mirror: Mirror, signer: Signer) -> None:
    build_archive(mirror, signer=signer)
    inrelease = mirror.root / "debian/dists" / SUITE / "InRelease"
    inrelease.write_text(inrelease.read_text().replace("Origin: Test", "Origin: Evil"))
    with pytest.raises(VerificationError, match="InRelease: signature check"):
        load_index(
            mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, keyring=signer.keyring
        )


@needs_gpg
def test_unsigned_inrelease_refused_when_keyring_present(
    tmp_path: Path, mirror: Mirror, signer: Signer
) -> None:
    build_archive(mirror, signer=None)
    with pytest.raises(VerificationError, match="signature check"):
        load_index(
            mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, keyring=signer.keyring
        )


def test_tampered_packages_index(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None)
    packages = mirror.root / "debian/dists" / SUITE / f"main/binary-{ARCH}/Packages.xz"
    data = lzma.decompress(packages.read_bytes()).replace(b"Size: ", b"Size: 1")
    packages.write_bytes(lzma.compress(data))
    cache = tmp_path / "cache"
    with pytest.raises(VerificationError, match="Packages.xz"):
        load_index(
            mirror=mirror.url, suite=SUITE, arch=ARCH, cache=cache, keyring=no_keyring(tmp_path)
        )
    blobs = cache / "debian" / "by-hash"
    assert [p.name for p in blobs.iterdir() if not p.name.startswith(".")] == [
        hashlib.sha256(
            (mirror.root / "debian/dists" / SUITE / "InRelease").read_bytes()
        ).hexdigest()
    ]
    assert not list(blobs.glob("*.part"))


def test_tampered_deb(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None)
    cache = tmp_path / "cache"
    index = load_index(
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=cache, keyring=no_keyring(tmp_path)
    )
    record = index.lookup("zlib1g")
    served = mirror.root / "debian" / record.filename
    data = bytearray(served.read_bytes())
    data[-5] ^= 0x01
    served.write_bytes(bytes(data))
    with pytest.raises(VerificationError) as caught:
        fetch_deb(index, record, cache=cache)
    message = str(caught.value)
    assert record.filename.split("/")[-1] in message and record.sha256 in message
    assert hashlib.sha256(data).hexdigest() in message
    assert not (cache / "debs" / f"{record.sha256}.deb").exists()
    assert [p.name for p in (cache / "debs").iterdir()] == [".lock"]


def test_truncated_deb_is_a_size_mismatch(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None)
    index = load_index(
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, keyring=no_keyring(tmp_path)
    )
    record = index.lookup("zlib1g")
    served = mirror.root / "debian" / record.filename
    served.write_bytes(served.read_bytes() + b"extra")
    with pytest.raises(VerificationError, match="longer than"):
        fetch_deb(index, record, cache=tmp_path)


def test_corrupt_cached_deb_is_fetched_again(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None)
    index = load_index(
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, keyring=no_keyring(tmp_path)
    )
    record = index.lookup("zlib1g")
    deb = fetch_deb(index, record, cache=tmp_path)
    deb.write_bytes(b"x" * record.size)
    assert fetch_deb(index, record, cache=tmp_path).read_bytes() == small_deb(
        "zlib1g", record.version
    )


def test_offline_reuses_the_verified_index(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None)
    cache = tmp_path / "cache"
    first = load_index(
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=cache, keyring=no_keyring(tmp_path)
    )
    mirror.stop()
    notices: list[str] = []
    again = load_index(
        mirror=mirror.url,
        suite=SUITE,
        arch=ARCH,
        cache=cache,
        keyring=no_keyring(tmp_path),
        notice=notices.append,
    )
    assert again.records == first.records
    assert any("verified earlier" in n and "InRelease" in n for n in notices)
    # A different architecture was never fetched, so there is nothing to fall back on.
    with pytest.raises(FetchError, match="InRelease"):
        load_index(
            mirror=mirror.url, suite=SUITE, arch="arm64", cache=cache, keyring=no_keyring(tmp_path)
        )


def test_http_error_is_not_treated_as_offline(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None)
    load_index(
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, keyring=no_keyring(tmp_path)
    )
    (mirror.root / "debian/dists" / SUITE / "InRelease").unlink()
    with pytest.raises(FetchError, match="HTTP 404"):
        load_index(
            mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, keyring=no_keyring(tmp_path)
        )


@pytest.mark.parametrize("compression", ["gz", "plain"])
def test_index_compression_fallback(tmp_path: Path, mirror: Mirror, compression: str) -> None:
    build_archive(mirror, signer=None, compression=compression)
    index = load_index(
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, keyring=no_keyring(tmp_path)
    )
    assert index.lookup("busybox-static").version == "1:1.35.0-4+b3"


def test_acquire_by_hash(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None, by_hash=True)
    (mirror.root / "debian/dists" / SUITE / f"main/binary-{ARCH}/Packages.xz").unlink()
    index = load_index(
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, keyring=no_keyring(tmp_path)
    )
    assert "libc6" in index.records


def test_wrong_suite(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None, suite_field="trixie")
    with pytest.raises(VerificationError, match="not 'bookworm'"):
        load_index(
            mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, keyring=no_keyring(tmp_path)
        )


def test_expired_release(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None, valid_until=datetime.now(UTC) - timedelta(days=1))
    with pytest.raises(VerificationError, match="Valid-Until"):
        load_index(
            mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, keyring=no_keyring(tmp_path)
        )


def test_valid_until_in_the_future(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None, valid_until=datetime.now(UTC) + timedelta(days=7))
    index = load_index(
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, keyring=no_keyring(tmp_path)
    )
    assert isinstance(index, PackageIndex)


def test_unreachable_without_cache(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"http://127\.0\.0\.1:9/dists/bookworm/InRelease"):
        load_index(mirror="http://127.0.0.1:9", suite=SUITE, arch=ARCH, cache=tmp_path)


def test_other_schemes_refused(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="only http and https"):
        load_index(mirror="file:///srv/debian", suite=SUITE, arch=ARCH, cache=tmp_path)


def test_mirror_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMRUN_DEBIAN_MIRROR", raising=False)
    assert mirror_from_env() == DEFAULT_MIRROR == "http://deb.debian.org/debian"
    monkeypatch.setenv("VMRUN_DEBIAN_MIRROR", "https://mirror.example/debian")
    assert mirror_from_env() == "https://mirror.example/debian"


# -- pure helpers --


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("1.0", "1.0", 0),
        ("1.0", "1.0-0", 0),
        ("1.0-1", "1.0-2", -1),
        ("1.0", "1.1", -1),
        ("1.10", "1.9", 1),
        ("1.01", "1.1", 0),
        ("1:0.1", "2.0", 1),
        ("0:2.0", "2.0", 0),
        ("1.0~rc1", "1.0", -1),
        ("1.0~rc1", "1.0~rc2", -1),
        ("1.0~~", "1.0~", -1),
        ("1.0~", "1.0", -1),
        ("1.0", "1.0+b1", -1),
        ("1.0a", "1.0+", -1),
        ("1.0a", "1.0", 1),
        ("1.0.", "1.0+", 1),
        ("1.35.0-4", "1.35.0-4+b3", -1),
        ("2.36-9", "2.36-9+deb12u1", -1),
        ("1:1.2.13.dfsg-1", "1:1.2.13-1", 1),
        ("1.2-3-4", "1.2-3-5", -1),
        ("10", "9", 1),
        ("a", "b", -1),
    ],
)
def test_compare_versions(a: str, b: str, expected: int) -> None:
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected
    if shutil.which("dpkg") is not None and a[0].isdigit() and b[0].isdigit():
        relation = {-1: "lt", 0: "eq", 1: "gt"}[expected]
        assert subprocess.run(["dpkg", "--compare-versions", a, relation, b]).returncode == 0


def test_parse_relations() -> None:
    text = "libc6 (>= 2.34) [amd64], foo:any | bar (<< 2) <!nocheck>,  baz"
    assert parse_relations(text) == (("libc6",), ("foo", "bar"), ("baz",))
    assert parse_relations("") == ()


def test_strip_clearsign() -> None:
    signed = (
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nSuite: x\n- -dashed\n"
        "-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n"
    )
    assert strip_clearsign(signed, source="t") == "Suite: x\n-dashed\n"
    with pytest.raises(VerificationError, match="around the signed message"):
        strip_clearsign(signed + "Suite: evil\n", source="t")
    with pytest.raises(VerificationError, match="not a clearsigned"):
        strip_clearsign("Suite: x\n", source="t")
    with pytest.raises(VerificationError):
        strip_clearsign(signed + signed, source="t")
