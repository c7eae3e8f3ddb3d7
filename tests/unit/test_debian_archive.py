from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.unit.debian_fixtures import (
    ARCH,
    SUITE,
    Mirror,
    Signer,
    build_archive,
    have_gpg,
    serve,
    signing_key,
    small_deb,
)
from vmrun.debian import DEFAULT_MIRROR, mirror_from_env
from vmrun.debian.archive import (
    SHIPPED_KEYRING,
    PackageIndex,
    Verifier,
    check_signature,
    compare_versions,
    fetch_deb,
    load_index,
    parse_relations,
    split_clearsigned,
    strip_clearsign,
)
from vmrun.debian.deb import read_control
from vmrun.errors import FetchError, VerificationError

needs_gpg = pytest.mark.skipif(not have_gpg(), reason="gpg is not installed")


# -- fixtures: a throwaway signing key and a real HTTP mirror --


@pytest.fixture(scope="session")
def signer() -> Iterator[Signer]:
    if not have_gpg():
        pytest.skip("gpg is not installed")
    with signing_key() as key:
        yield key


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    with serve(tmp_path / "mirror") as served:
        yield served


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
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, insecure_unverified=True
    )
    with pytest.raises(FetchError, match=f"package nope not found in {SUITE}/{ARCH} at http"):
        index.lookup("nope")


def _path_with(tmp_path: Path, tools: tuple[str, ...]) -> str:
    """A PATH holding only TOOLS (links to the host's), as on a host lacking the others."""
    directory = tmp_path / "bin"
    directory.mkdir(exist_ok=True)
    for tool in tools:
        found = shutil.which(tool)
        assert found is not None, tool
        (directory / tool).symlink_to(found)
    return str(directory)


@needs_gpg
def test_missing_keyring_is_refused(
    tmp_path: Path, mirror: Mirror, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: "no keyring at ...: trusting ... by its hashes only" and an unsigned index.
    build_archive(mirror, signer=signer)
    monkeypatch.setenv("VMRUN_DEBIAN_KEYRING", str(no_keyring(tmp_path)))
    notices: list[str] = []
    with pytest.raises(VerificationError, match="no keyring at .*no-such-keyring") as caught:
        load_index(mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path / "cache",
                   notice=notices.append)
    assert "VMRUN_DEBIAN_KEYRING" in (caught.value.hint or "")
    assert notices == []


def test_no_verifier_is_refused(
    tmp_path: Path, mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: "gpgv is not installed: trusting ... by its hashes only" and on it went.
    build_archive(mirror, signer=None)
    monkeypatch.setenv("PATH", _path_with(tmp_path, ()))
    with pytest.raises(VerificationError, match="neither gpgv nor sqv is installed") as caught:
        load_index(mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path / "cache")
    assert "install gpgv or sqv" in (caught.value.hint or "")
    assert "--insecure-unverified-guest" in (caught.value.hint or "")
    assert "\n" not in str(caught.value)


def test_insecure_unverified_reads_an_unsigned_archive(
    tmp_path: Path, mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_archive(mirror, signer=None)
    monkeypatch.setenv("PATH", _path_with(tmp_path, ()))
    index = load_index(mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path / "cache",
                       insecure_unverified=True)
    assert not index.signed
    assert index.lookup("zlib1g").version == "1:1.2.13.dfsg-1"


@needs_gpg
def test_shipped_keys_are_the_default(
    tmp_path: Path, mirror: Mirror, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Signed, but by a key vmrun does not ship: refused without a keyring named.
    build_archive(mirror, signer=signer)
    monkeypatch.delenv("VMRUN_DEBIAN_KEYRING", raising=False)
    with pytest.raises(VerificationError, match=f"against {SHIPPED_KEYRING}"):
        load_index(mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path)


@pytest.mark.skipif(shutil.which("sqv") is None, reason="sqv is not installed "
                    "(apt install sqv)")
@pytest.mark.skipif(not have_gpg(), reason="gpg is not installed")
def test_sqv_alone_verifies_and_refuses(
    tmp_path: Path, mirror: Mirror, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqv_only = _path_with(tmp_path, ("sqv",))

    def load(cache: str) -> PackageIndex:
        with monkeypatch.context() as patch:
            patch.setenv("PATH", sqv_only)
            return load_index(mirror=mirror.url, suite=SUITE, arch=ARCH,
                              cache=tmp_path / cache, keyring=signer.keyring)

    build_archive(mirror, signer=signer)
    index = load("a")
    assert index.signed and "libc6" in index.records
    inrelease = mirror.root / "debian/dists" / SUITE / "InRelease"
    inrelease.write_text(inrelease.read_text().replace("Origin: Test", "Origin: Evil"))
    with pytest.raises(VerificationError, match="signature check against .* failed"):
        load("b")
    # Signed by a key outside the keyring: refused too.
    shutil.rmtree(mirror.root / "debian")
    with signing_key() as stranger:
        build_archive(mirror, signer=stranger)
        with pytest.raises(VerificationError, match="signature check"):
            load("c")


def _real_inrelease(tmp_path: Path) -> Path:
    """A real bookworm InRelease: from the test cache if one is there, else from Debian."""
    cache = Path(os.environ.get("VMRUN_CACHE_DIR", "")) / "debian" / "by-hash"
    for blob in sorted(cache.glob("*")) if cache.is_dir() else []:
        with open(blob, "rb") as f:
            head = f.read(400)
        if head.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----") and b"bookworm" in head:
            return blob
    try:
        socket.create_connection(("deb.debian.org", 80), timeout=5).close()
    except OSError:
        pytest.skip("no bookworm InRelease cached and deb.debian.org is unreachable")
    out = tmp_path / "InRelease"
    with urllib.request.urlopen(f"{DEFAULT_MIRROR}/dists/bookworm/InRelease", timeout=60) as r:
        out.write_bytes(r.read())
    return out


@pytest.mark.parametrize("tool", ["gpgv", "sqv"])
def test_shipped_keys_verify_a_real_debian_inrelease(tmp_path: Path, tool: str) -> None:
    found = shutil.which(tool)
    if found is None:
        if tool == "sqv":
            pytest.skip("sqv is not installed (apt install sqv)")
        pytest.fail("gpgv is not installed: the test host needs it")
    verifier = Verifier(tool=tool, path=found)
    inrelease = _real_inrelease(tmp_path)
    check_signature(inrelease, keyring=SHIPPED_KEYRING, verifier=verifier, source="real")
    tampered = tmp_path / "tampered"
    tampered.write_text(inrelease.read_text().replace("Origin: Debian", "Origin: Debiam", 1))
    with pytest.raises(VerificationError, match="signature check against"):
        check_signature(tampered, keyring=SHIPPED_KEYRING, verifier=verifier, source="t")


def test_split_clearsigned_gives_what_was_signed() -> None:
    signed = (
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA512\n\nSuite: x  \n- -dashed\n"
        "-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n"
    )
    data, signature = split_clearsigned(signed, source="t")
    assert data == b"Suite: x\r\n-dashed"
    assert signature == b"-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n"
    with pytest.raises(VerificationError):
        split_clearsigned(signed + "Suite: evil\n", source="t")


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
            mirror=mirror.url, suite=SUITE, arch=ARCH, cache=cache, insecure_unverified=True
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
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=cache, insecure_unverified=True
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
    # Neither the bytes nor a part of them is kept: only lock files remain.
    left = [p for p in (cache / "debs").rglob("*") if p.is_file()]
    assert left and all(p.name.endswith(".lock") for p in left), left


def test_truncated_deb_is_a_size_mismatch(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None)
    index = load_index(
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, insecure_unverified=True
    )
    record = index.lookup("zlib1g")
    served = mirror.root / "debian" / record.filename
    served.write_bytes(served.read_bytes() + b"extra")
    with pytest.raises(VerificationError, match="longer than"):
        fetch_deb(index, record, cache=tmp_path)


def test_corrupt_cached_deb_is_fetched_again(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None)
    index = load_index(
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, insecure_unverified=True
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
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=cache, insecure_unverified=True
    )
    mirror.stop()
    notices: list[str] = []
    again = load_index(
        mirror=mirror.url,
        suite=SUITE,
        arch=ARCH,
        cache=cache,
        insecure_unverified=True,
        notice=notices.append,
    )
    assert again.records == first.records
    assert any("verified earlier" in n and "InRelease" in n for n in notices)
    # A different architecture was never fetched, so there is nothing to fall back on.
    with pytest.raises(FetchError, match="InRelease"):
        load_index(
            mirror=mirror.url, suite=SUITE, arch="arm64", cache=cache, insecure_unverified=True
        )


def test_http_error_is_not_treated_as_offline(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None)
    load_index(
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, insecure_unverified=True
    )
    (mirror.root / "debian/dists" / SUITE / "InRelease").unlink()
    with pytest.raises(FetchError, match="HTTP 404"):
        load_index(
            mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, insecure_unverified=True
        )


@pytest.mark.parametrize("compression", ["gz", "plain"])
def test_index_compression_fallback(tmp_path: Path, mirror: Mirror, compression: str) -> None:
    build_archive(mirror, signer=None, compression=compression)
    index = load_index(
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, insecure_unverified=True
    )
    assert index.lookup("busybox-static").version == "1:1.35.0-4+b3"


def test_acquire_by_hash(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None, by_hash=True)
    (mirror.root / "debian/dists" / SUITE / f"main/binary-{ARCH}/Packages.xz").unlink()
    index = load_index(
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, insecure_unverified=True
    )
    assert "libc6" in index.records


def test_wrong_suite(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None, suite_field="trixie")
    with pytest.raises(VerificationError, match="not 'bookworm'"):
        load_index(
            mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, insecure_unverified=True
        )


def test_expired_release(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None, valid_until=datetime.now(UTC) - timedelta(days=1))
    with pytest.raises(VerificationError, match="Valid-Until"):
        load_index(
            mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, insecure_unverified=True
        )


def test_valid_until_in_the_future(tmp_path: Path, mirror: Mirror) -> None:
    build_archive(mirror, signer=None, valid_until=datetime.now(UTC) + timedelta(days=7))
    index = load_index(
        mirror=mirror.url, suite=SUITE, arch=ARCH, cache=tmp_path, insecure_unverified=True
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
