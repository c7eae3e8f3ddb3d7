"""The guest's packages: resumed downloads, and cached files changed on disk (no VM)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.debian_fixtures import (
    ARCH,
    SUITE,
    Behaviour,
    Mirror,
    Package,
    Signer,
    build_archive,
    have_gpg,
    recording_handler,
    serve,
    signing_key,
)
from vmrun.debian.archive import PackageIndex, PackageRecord, fetch_deb
from vmrun.errors import FetchError, VerificationError
from vmrun.guest.build import ensure_guest
from vmrun.qemu.arch import lookup_arch

BLOB_SIZE = 3 << 20  # three of the downloader's 1 MiB reads
CUT_AT = (1 << 20) + 12345
RELEASE = "6.1.0-test-amd64"
KERNEL_FILES = {
    f"boot/vmlinuz-{RELEASE}": b"not really a kernel\n" * 4096,
    f"boot/config-{RELEASE}": b"CONFIG_VIRTIO=y\n",
    f"lib/modules/{RELEASE}/kernel/drivers/virtio/README": b"no modules here\n",
}
GUEST_PACKAGES = [
    Package("linux-image-amd64", "6.1.0-1", files=KERNEL_FILES),
    Package("busybox-static", "1:1.35.0-4", files={"bin/busybox": b"not really busybox\n"}),
]


@pytest.fixture
def behaviour() -> Behaviour:
    return Behaviour()


@pytest.fixture
def mirror(tmp_path: Path, behaviour: Behaviour) -> Iterator[Mirror]:
    with serve(tmp_path / "mirror", recording_handler(behaviour)) as served:
        yield served


@pytest.fixture(scope="module")
def signer() -> Iterator[Signer]:
    if not have_gpg():
        pytest.skip("gpg is not installed")
    with signing_key() as key:
        yield key


# -- resumed .deb downloads (RELIABILITY case 7) --


def _serve_blob(mirror: Mirror, data: bytes, *, sha256: str | None = None) -> PackageIndex:
    filename = "pool/main/k/kernel/kernel_1_amd64.deb"
    (mirror.root / "debian" / filename).parent.mkdir(parents=True)
    (mirror.root / "debian" / filename).write_bytes(data)
    record = PackageRecord(
        name="kernel", version="1", architecture=ARCH, filename=filename, size=len(data),
        sha256=sha256 or hashlib.sha256(data).hexdigest(), depends=(),
    )
    return PackageIndex(mirror=mirror.url.rstrip("/"), suite=SUITE, arch=ARCH,
                        records={"kernel": record}, signed=True)


def _deb_requests(behaviour: Behaviour) -> list[str | None]:
    return [wanted for path, wanted in behaviour.requests if path.endswith(".deb")]


def test_cut_download_resumes_with_range(
    tmp_path: Path, mirror: Mirror, behaviour: Behaviour
) -> None:
    data = os.urandom(BLOB_SIZE)
    index = _serve_blob(mirror, data)
    behaviour.cut_path, behaviour.cuts, behaviour.cut_at = ".deb", 1, CUT_AT
    notices: list[str] = []
    deb = fetch_deb(index, index.records["kernel"], cache=tmp_path, notice=notices.append)
    assert deb.read_bytes() == data
    assert _deb_requests(behaviour) == [None, f"bytes={CUT_AT}-"]
    assert any("retrying" in n for n in notices)
    assert not list((tmp_path / "debs" / "tmp").glob("*.part"))


def test_server_ignoring_range_still_works(
    tmp_path: Path, mirror: Mirror, behaviour: Behaviour
) -> None:
    data = os.urandom(BLOB_SIZE)
    index = _serve_blob(mirror, data)
    behaviour.cut_path, behaviour.cuts, behaviour.cut_at = ".deb", 1, CUT_AT
    behaviour.ranges = False
    notices: list[str] = []
    deb = fetch_deb(index, index.records["kernel"], cache=tmp_path, notice=notices.append)
    assert deb.read_bytes() == data
    assert _deb_requests(behaviour) == [None, f"bytes={CUT_AT}-"]
    assert any("ignored the range" in n for n in notices)


def test_a_download_that_died_is_resumed_by_the_next_run(
    tmp_path: Path, mirror: Mirror, behaviour: Behaviour
) -> None:
    data = os.urandom(BLOB_SIZE)
    index = _serve_blob(mirror, data)
    behaviour.cut_path, behaviour.cuts, behaviour.cut_at = ".deb", 1, CUT_AT
    behaviour.fail_after_cut = True
    with pytest.raises(FetchError, match="HTTP 503"):
        fetch_deb(index, index.records["kernel"], cache=tmp_path)
    final = tmp_path / "debs" / f"{index.records['kernel'].sha256}.deb"
    assert not final.exists()
    parts = list((tmp_path / "debs" / "tmp").glob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size == CUT_AT
    behaviour.fail_after_cut = False
    notices: list[str] = []
    assert fetch_deb(index, index.records["kernel"], cache=tmp_path,
                     notice=notices.append).read_bytes() == data
    assert _deb_requests(behaviour)[-1] == f"bytes={CUT_AT}-"
    assert any(f"resuming kernel_1_amd64.deb at byte {CUT_AT}" == n for n in notices)


def test_wrong_checksum_never_lands_and_leftovers_go(
    tmp_path: Path, mirror: Mirror, behaviour: Behaviour
) -> None:
    data = os.urandom(BLOB_SIZE)
    index = _serve_blob(mirror, data, sha256="0" * 64)
    behaviour.cut_path, behaviour.cuts, behaviour.cut_at = ".deb", 1, CUT_AT
    with pytest.raises(VerificationError, match="sha256 is .*expected 0000"):
        fetch_deb(index, index.records["kernel"], cache=tmp_path)
    debs = tmp_path / "debs"
    assert not (debs / f"{'0' * 64}.deb").exists()
    assert not list(debs.rglob("*.part")) and not list(debs.rglob("*.json"))
    # What dead writers left: a part nothing can resume, and an old-style temp file.
    (debs / "tmp" / "dead.part").write_bytes(b"half")
    (debs / f".{'1' * 64}.deb.x1y2.part").write_bytes(b"half")
    good = _serve_blob_again(mirror, data)
    assert fetch_deb(good, good.records["kernel"], cache=tmp_path).read_bytes() == data
    assert not list(debs.rglob("*.part"))


def _serve_blob_again(mirror: Mirror, data: bytes) -> PackageIndex:
    shutil.rmtree(mirror.root / "debian")
    return _serve_blob(mirror, data)


# -- the guest built from a signed archive; its cached files changed on disk --


@pytest.fixture
def guest_env(mirror: Mirror, signer: Signer, monkeypatch: pytest.MonkeyPatch) -> Mirror:
    build_archive(mirror, signer=signer, packages=GUEST_PACKAGES)
    monkeypatch.setenv("VMRUN_DEBIAN_KEYRING", str(signer.keyring))
    monkeypatch.delenv("VMRUN_DEBIAN_SUITE", raising=False)
    monkeypatch.delenv("VMRUN_INSECURE_UNVERIFIED_GUEST", raising=False)
    return mirror


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_guest_is_fetched_once_then_served_from_the_cache(
    tmp_path: Path, guest_env: Mirror, behaviour: Behaviour
) -> None:
    arch = lookup_arch("x86_64")
    guest = ensure_guest(arch, mirror=guest_env.url, cache=tmp_path / "cache")
    assert guest.kernel.read_bytes() == KERNEL_FILES[f"boot/vmlinuz-{RELEASE}"]
    assert guest.release == RELEASE
    fetched = len(behaviour.requests)
    assert ensure_guest(arch, mirror=guest_env.url, cache=tmp_path / "cache") == guest
    assert len(behaviour.requests) == fetched


@pytest.mark.parametrize("role", ["kernel", "initrd"])
def test_changed_cached_file_is_rebuilt_not_booted(
    tmp_path: Path, guest_env: Mirror, behaviour: Behaviour, role: str
) -> None:
    arch = lookup_arch("x86_64")
    cache = tmp_path / "cache"
    guest = ensure_guest(arch, mirror=guest_env.url, cache=cache)
    target = guest.kernel if role == "kernel" else guest.initrd
    good = target.read_bytes()
    # At once, same size: neither the size nor the coarse timestamps need to change.
    _flip_a_byte(target)
    fetched = len(behaviour.requests)
    notices: list[str] = []
    again = ensure_guest(arch, mirror=guest_env.url, cache=cache, notice=notices.append)
    assert (again.kernel if role == "kernel" else again.initrd).read_bytes() == good
    assert any(f"cached guest {role}" in n and "changed on disk" in n for n in notices)
    # Rebuilt from the cached packages, which verified: nothing fetched.
    assert len(behaviour.requests) == fetched


def test_changed_kernel_and_package_are_fetched_again(
    tmp_path: Path, guest_env: Mirror, behaviour: Behaviour
) -> None:
    arch = lookup_arch("x86_64")
    cache = tmp_path / "cache"
    guest = ensure_guest(arch, mirror=guest_env.url, cache=cache)
    good = guest.kernel.read_bytes()
    _flip_a_byte(guest.kernel)
    pointer = json.loads((cache / "guests" / "x86_64-bookworm.json").read_text())
    _flip_a_byte(Path(pointer["kernel"]))
    fetched = len(behaviour.requests)
    again = ensure_guest(arch, mirror=guest_env.url, cache=cache)
    assert again.kernel.read_bytes() == good
    new_requests = [path for path, _ in behaviour.requests[fetched:]]
    assert any(path.endswith("linux-image-amd64_6.1.0-1_amd64.deb") for path in new_requests)


def test_changed_kernel_without_a_mirror_is_refused(
    tmp_path: Path, guest_env: Mirror, behaviour: Behaviour
) -> None:
    arch = lookup_arch("x86_64")
    cache = tmp_path / "cache"
    guest = ensure_guest(arch, mirror=guest_env.url, cache=cache)
    _flip_a_byte(guest.kernel)
    for deb in (cache / "debs").glob("*.deb"):
        _flip_a_byte(deb)
    guest_env.stop()
    with pytest.raises(FetchError):
        ensure_guest(arch, mirror=guest_env.url, cache=cache)
    assert not guest.kernel.exists()


def test_unverified_guest_only_with_the_option(
    tmp_path: Path, guest_env: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    arch = lookup_arch("x86_64")
    cache = tmp_path / "cache"
    host_path = os.environ["PATH"]
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # neither gpgv nor sqv
    with pytest.raises(VerificationError, match="neither gpgv nor sqv"):
        ensure_guest(arch, mirror=guest_env.url, cache=cache)
    for _ in range(2):  # the warning comes on every use, cached or not
        notices: list[str] = []
        ensure_guest(arch, mirror=guest_env.url, cache=cache, notice=notices.append,
                     insecure_unverified_guest=True)
        warnings = [n for n in notices if n.startswith("WARNING: --insecure-unverified-guest")]
        assert len(warnings) == 1 and "\n" not in warnings[0]
    monkeypatch.setenv("VMRUN_INSECURE_UNVERIFIED_GUEST", "1")
    assert ensure_guest(arch, mirror=guest_env.url, cache=cache).release == RELEASE
    monkeypatch.delenv("VMRUN_INSECURE_UNVERIFIED_GUEST")
    # The unverified guest is not reused without the option...
    with pytest.raises(VerificationError, match="neither gpgv nor sqv"):
        ensure_guest(arch, mirror=guest_env.url, cache=cache)
    # ...and a verifier on PATH makes it verified from then on.
    monkeypatch.setenv("PATH", host_path)
    assert ensure_guest(arch, mirror=guest_env.url, cache=cache).release == RELEASE
    monkeypatch.setenv("PATH", str(empty))
    assert ensure_guest(arch, mirror=guest_env.url, cache=cache).release == RELEASE
