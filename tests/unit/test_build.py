"""Images from packages: names, recipes and keys, the disk layout, and the --packages cache
(against a real signed mirror served over HTTP; mmdebstrap kept out of reach where a test
must show that nothing is built)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.debian_fixtures import (
    Mirror,
    Package,
    Signer,
    build_archive,
    have_gpg,
    serve,
    signing_key,
)
from vmrun.build import debootstrap, disk, roots
from vmrun.build.debootstrap import Bootstrap, parse_packages
from vmrun.debian import archive
from vmrun.errors import FetchError, ImageError, UsageError
from vmrun.images import partitions
from vmrun.images.partitions import find_root_partition, gpt_partitions, head_arch, read_head
from vmrun.oci import manifest as mf
from vmrun.oci.pull import RootImage, oci_root, record_root, root_path
from vmrun.qemu.arch import lookup_arch
from vmrun.qemu.firmware import Firmware, bootable_by

needs_gpg = pytest.mark.skipif(not have_gpg(), reason="gpg is not installed")
X86 = lookup_arch("x86_64")


# -- names and recipes --


def test_packages_are_checked_sorted_and_unique() -> None:
    assert parse_packages("python3, git,python3,libc6=2.36-9") == (
        "git", "libc6=2.36-9", "python3")


@pytest.mark.parametrize("text", ["", " , ", "Python3", "py thon", "-x", "a;rm -rf /",
                                  "python3,$(id)"])
def test_bad_package_lists_are_refused(text: str) -> None:
    with pytest.raises(UsageError, match="--packages"):
        parse_packages(text)


@pytest.mark.parametrize("suite", ["", "Bookworm", "../x", "a b", "x" * 50])
def test_bad_suites_are_refused(suite: str) -> None:
    with pytest.raises(UsageError, match="suite"):
        debootstrap.check_suite(suite)


def test_mmdebstrap_argv() -> None:
    boot = Bootstrap(suite="bookworm", mirror="http://m/debian", arch="arm64",
                     packages=("git", "python3"), customize=("echo one",), finish=("echo two",))
    argv = boot.argv("-")
    assert argv[0] == "mmdebstrap"
    assert f"--mode={'root' if os.geteuid() == 0 else 'unshare'}" in argv
    assert "--variant=essential" in argv and "--architectures=arm64" in argv
    assert "--include=git,python3" in argv
    assert "--dpkgopt=path-exclude=/usr/share/man/*" in argv
    hooks = [argv[i + 1] for i, word in enumerate(argv) if word == "--customize-hook"]
    assert hooks == ["echo one", debootstrap.CLEAN_APT, "echo two"]
    assert argv[-3:] == ["bookworm", "-", "http://m/debian"]


def test_a_foreign_architecture_needs_binfmt(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debootstrap, "BINFMT", tmp_path)
    with pytest.raises(ImageError, match="qemu-s390x registered with binfmt_misc") as info:
        debootstrap.check_host("s390x")
    assert "qemu-user-static" in (info.value.hint or "")
    (tmp_path / "qemu-s390x").write_text("enabled\ninterpreter /usr/libexec/qemu-s390x\n")
    debootstrap.check_host("s390x")
    debootstrap.check_host("amd64")  # the host's own: nothing needed


def test_missing_mmdebstrap_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ImageError, match="needs mmdebstrap") as info:
        debootstrap.check_host("amd64")
    assert "apt install mmdebstrap" in (info.value.hint or "")


def state(sha: str = "a" * 64) -> archive.ArchiveState:
    return archive.ArchiveState(mirror="http://m", suite="bookworm", arch="amd64",
                                packages_sha256=sha, date="", signed=True)


def test_disk_recipe_and_its_key() -> None:
    base = disk.recipe(X86, suite="bookworm", mirror="http://m/", packages=("git",))
    assert base.firmware == ("bios", "uefi")
    assert {"git", "linux-image-cloud-amd64", "grub-pc-bin", "cloud-init"} <= set(
        base.bootstrap.packages)
    assert base.bootstrap.mirror == "http://m" and base.bootstrap.variant == "apt"
    keys = {base.key(state()), base.key(state("b" * 64))}
    for changed in (disk.recipe(X86, suite="trixie", mirror="http://m", packages=("git",)),
                    disk.recipe(X86, suite="bookworm", mirror="http://n", packages=("git",)),
                    disk.recipe(X86, suite="bookworm", mirror="http://m", packages=("vim",)),
                    disk.recipe(lookup_arch("aarch64"), suite="bookworm", mirror="http://m",
                                packages=("git",)),
                    disk.recipe(X86, suite="bookworm", mirror="http://m", packages=("git",),
                                size=3 << 30),
                    disk.recipe(X86, suite="bookworm", mirror="http://m", packages=("git",),
                                firmware=["uefi"])):
        keys.add(changed.key(state()))
    assert len(keys) == 8  # every input changes the key
    assert base.key(state()) == disk.recipe(X86, suite="bookworm", mirror="http://m",
                                            packages=("git",)).key(state())


def test_disk_recipe_refuses_what_the_architecture_cannot_boot() -> None:
    with pytest.raises(UsageError, match="aarch64 images cannot boot with bios"):
        disk.recipe(lookup_arch("aarch64"), suite="bookworm", mirror="http://m",
                    firmware=["bios"])
    with pytest.raises(UsageError, match="s390x images cannot boot with uefi"):
        disk.recipe(lookup_arch("s390x"), suite="bookworm", mirror="http://m",
                    firmware=["uefi"])
    assert disk.recipe(lookup_arch("s390x"), suite="bookworm", mirror="http://m").firmware == ()
    with pytest.raises(UsageError, match="--size"):
        disk.recipe(X86, suite="bookworm", mirror="http://m", size=1 << 20)


def test_assembled_disk_has_the_partitions_and_grub_in_the_mbr(tmp_path: Path) -> None:
    root = tmp_path / "root.img"
    root.write_bytes(b"R" * (4 << 20))
    esp = tmp_path / "esp.img"
    esp.write_bytes(b"E" * disk.ESP_SIZE)
    core = tmp_path / "core.img"
    core.write_bytes(b"C" * 4096)
    boot = bytes(range(256)) * 2
    raw = tmp_path / "disk.raw"
    disk.assemble(raw, arch="x86_64", core_img=core, esp_img=esp, root_img=root,
                  boot_img=_file(tmp_path / "boot.img", boot))
    head = raw.read_bytes()[: partitions.HEAD_SECTORS * 512]
    types = partitions.gpt_type_guids(head)
    assert types[:3] == [partitions.BIOS_BOOT, partitions.ESP, partitions.DPS_ROOT["x86_64"]]
    data = raw.read_bytes()
    core_lba = disk.MIB // disk.SECTOR
    assert data[:0x5C] == boot[:0x5C] and data[0x68:440] == boot[0x68:440]
    assert int.from_bytes(data[0x5C:0x64], "little") == core_lba  # where core.img starts
    assert data[510:512] == b"\x55\xaa"  # the protective MBR stays
    assert data[core_lba * 512: core_lba * 512 + 4] == b"CCCC"
    esp_at = disk.MIB + disk.BIOS_BOOT_SIZE
    assert data[esp_at: esp_at + 4] == b"EEEE"
    root_at = esp_at + disk.ESP_SIZE
    assert data[root_at: root_at + 4] == b"RRRR"


def test_an_image_without_boot_loader_has_the_root_partition_only(tmp_path: Path) -> None:
    root = _file(tmp_path / "root.img", b"R" * (1 << 20))
    raw = tmp_path / "disk.raw"
    disk.assemble(raw, arch="s390x", core_img=None, esp_img=None, root_img=root,
                  boot_img=tmp_path / "none")
    types = partitions.gpt_type_guids(raw.read_bytes()[: partitions.HEAD_SECTORS * 512])
    assert types[:1] == [partitions.DPS_ROOT["s390x"]] and len(types) == 1


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- the archive's state and the --packages cache, against a real signed mirror --


@pytest.fixture(scope="module")
def signer() -> Iterator[Signer]:
    if not have_gpg():
        pytest.skip("gpg is not installed")
    with signing_key() as key:
        yield key


@pytest.fixture
def mirror(tmp_path: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mirror]:
    monkeypatch.setenv("VMRUN_DEBIAN_KEYRING", str(signer.keyring))
    with serve(tmp_path / "mirror") as served:
        build_archive(served, signer=signer)
        yield served


@needs_gpg
def test_archive_state_follows_the_packages_index(tmp_path: Path, mirror: Mirror,
                                                  signer: Signer) -> None:
    url = mirror.url.rstrip("/")
    first = archive.archive_state(mirror=url, suite="bookworm", arch="amd64", cache=tmp_path)
    assert first.signed and len(first.packages_sha256) == 64 and first.date
    assert archive.archive_state(mirror=url, suite="bookworm", arch="amd64",
                                 cache=tmp_path) == first
    rebuild(mirror, signer, [Package("zlib1g", "1:1.3-1")])
    second = archive.archive_state(mirror=url, suite="bookworm", arch="amd64", cache=tmp_path)
    assert second.packages_sha256 != first.packages_sha256
    with pytest.raises(FetchError, match="lists no main/binary-s390x/Packages"):
        archive.archive_state(mirror=url, suite="bookworm", arch="s390x", cache=tmp_path)


def no_mmdebstrap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PATH with the signature checkers, but no mmdebstrap."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gpgv", "sqv"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bin_dir))


def rebuild(mirror: Mirror, signer: Signer, packages: list[Package]) -> None:
    """The archive again, with other packages: a new state of it."""
    shutil.rmtree(mirror.root / "debian")
    build_archive(mirror, signer=signer, packages=packages)


def _place_root(cache: Path, bootstrap: Bootstrap, now: archive.ArchiveState) -> RootImage:
    """A real squashfs root in the store under the key of BOOTSTRAP and NOW."""
    key = roots.root_key(bootstrap, now)
    path = root_path(oci_root(cache), key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tree = cache / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "hello").write_text("#!/bin/sh\necho hello\n")
    subprocess.run(["tar2sqfs", "--quiet", "--force", str(path)], check=True,
                   input=subprocess.run(["tar", "-C", str(tree), "-c", "."], check=True,
                                        capture_output=True).stdout)
    image = RootImage(path=path, config=mf.ImageConfig("amd64", "linux", ()),
                      reference="packages:test", digest="sha256:" + "0" * 64,
                      manifest_digest="sha256:" + now.packages_sha256, arch="x86_64")
    record_root(oci_root(cache), key, image, entries=2, recipe=roots.RECIPE)
    return image


@needs_gpg
def test_packages_root_cache(tmp_path: Path, mirror: Mirror, signer: Signer,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    url = mirror.url.rstrip("/")
    cache = tmp_path / "cache"
    bootstrap = Bootstrap(suite="bookworm", mirror=url, arch="amd64", packages=("hello",))
    now = archive.archive_state(mirror=url, suite="bookworm", arch="amd64", cache=cache)
    placed = _place_root(cache, bootstrap, now)
    no_mmdebstrap(tmp_path, monkeypatch)  # nothing can be built
    notices: list[str] = []

    def ensure(**options: object) -> RootImage:
        return roots.ensure_packages_root(["hello"], arch=X86, suite="bookworm", mirror=url,
                                          cache=cache, notice=notices.append,
                                          **options)  # type: ignore[arg-type]

    assert ensure().path == placed.path  # the state it has a root for: no build
    mirror.stop()
    assert ensure().path == placed.path  # checked a moment ago: no network needed
    assert ensure(recheck_s=0).path == placed.path  # unreachable: the root it has
    assert "using the root built from the archive as it was before" in notices[-1]


@needs_gpg
def test_a_new_archive_state_builds_a_new_root(tmp_path: Path, mirror: Mirror, signer: Signer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    url = mirror.url.rstrip("/")
    cache = tmp_path / "cache"
    bootstrap = Bootstrap(suite="bookworm", mirror=url, arch="amd64", packages=("hello",))
    _place_root(cache, bootstrap, archive.archive_state(
        mirror=url, suite="bookworm", arch="amd64", cache=cache))
    notices: list[str] = []
    roots.ensure_packages_root(["hello"], arch=X86, suite="bookworm", mirror=url, cache=cache,
                               notice=notices.append)
    rebuild(mirror, signer, [Package("hello", "2.0-1")])
    no_mmdebstrap(tmp_path, monkeypatch)
    with pytest.raises(ImageError, match="needs mmdebstrap"):
        roots.ensure_packages_root(["hello"], arch=X86, suite="bookworm", mirror=url,
                                   cache=cache, notice=notices.append, recheck_s=0)
    assert any("changed on" in n and "building a new one" in n for n in notices)


@needs_gpg
def test_a_failed_mmdebstrap_is_one_clear_error(tmp_path: Path, mirror: Mirror) -> None:
    """The real mmdebstrap against a mirror whose packages are not real."""
    if not os.path.exists("/usr/bin/mmdebstrap"):
        pytest.skip("mmdebstrap is not installed")
    url = mirror.url.rstrip("/")
    started = time.monotonic()
    with pytest.raises(ImageError, match=r"mmdebstrap failed \(exit \d+\) building bookworm "
                       r"amd64 with zlib1g") as info:
        roots.ensure_packages_root(["zlib1g"], arch=X86, suite="bookworm", mirror=url,
                                   cache=tmp_path / "cache")
    assert "\n" not in str(info.value)
    assert time.monotonic() - started < 600
    leftovers = list((oci_root(tmp_path / "cache") / "roots").glob("*.sqfs"))
    assert leftovers == []  # nothing half-made is kept


@needs_gpg
def test_package_names_are_checked_against_the_archive(tmp_path: Path, mirror: Mirror) -> None:
    url = mirror.url.rstrip("/")
    good = Bootstrap(suite="bookworm", mirror=url, arch="amd64",
                     packages=("libc-any", "zlib1g=1:1.2.13.dfsg-1", "busybox-static/bookworm"))
    debootstrap.check_packages(good, tmp_path)  # real, provided, with a version or release
    bad = dataclasses.replace(good, packages=("nosuch", "zlib1g", "ghost=1.0"))
    with pytest.raises(ImageError) as info:
        debootstrap.check_packages(bad, tmp_path)
    assert str(info.value) == f"no package nosuch, ghost in bookworm for amd64 on {url}"
    started = time.monotonic()
    with pytest.raises(ImageError, match="no package nosuch"):
        roots.ensure_packages_root(["nosuch"], arch=X86, suite="bookworm", mirror=url,
                                   cache=tmp_path / "cache")
    assert time.monotonic() - started < 120
    assert not (oci_root(tmp_path / "cache") / "roots").exists() or not list(
        (oci_root(tmp_path / "cache") / "roots").glob("*.sqfs"))


def test_bootstrap_repr_is_the_key_material() -> None:
    one = Bootstrap(suite="bookworm", mirror="http://m", arch="amd64", packages=("a",))
    assert repr(one) != repr(dataclasses.replace(one, slim=False))


# -- the layouts, as vmrun reads them back --


def _assembled(tmp_path: Path, arch: str, *, bios: bool, uefi: bool) -> bytes:
    root = _file(tmp_path / "root.img", b"ROOT" * 1024)
    esp = _file(tmp_path / "esp.img", b"ESP!") if uefi else None
    core = _file(tmp_path / "core.img", bytes(4 * disk.SECTOR)) if bios else None
    raw = tmp_path / "disk.raw"
    disk.assemble(raw, arch=arch, core_img=core, esp_img=esp, root_img=root,
                  boot_img=_file(tmp_path / "boot.img", bytes(disk.SECTOR)))
    return read_head(raw, "raw")


def test_arm64_disk_boots_from_uefi_only_with_an_aarch64_root(tmp_path: Path) -> None:
    assert disk.LAYOUTS["aarch64"].firmwares() == ("uefi",)
    head = _assembled(tmp_path, "aarch64", bios=False, uefi=True)
    assert bootable_by(head) == {Firmware.UEFI}
    assert head_arch(head) == "aarch64"
    found = gpt_partitions(head)
    assert found is not None and len(found) == 2
    esp, root = found
    assert (esp.first, root.first) == (2048, 2048 + disk.ESP_SIZE // disk.SECTOR)
    assert find_root_partition(head, "aarch64") == root.number == 2


def test_amd64_disk_has_bios_boot_esp_and_x86_64_root(tmp_path: Path) -> None:
    assert disk.LAYOUTS["x86_64"].firmwares() == ("bios", "uefi")
    head = _assembled(tmp_path, "x86_64", bios=True, uefi=True)
    assert bootable_by(head) == {Firmware.BIOS, Firmware.UEFI}
    assert head_arch(head) == "x86_64"
    found = gpt_partitions(head)
    assert found is not None
    assert [p.first for p in found] == [2048, 4096, 4096 + 65536]
    assert find_root_partition(head, "x86_64") == 3


@pytest.mark.parametrize("arch", sorted(disk.LAYOUTS))
def test_every_layout_names_its_root_type_and_kernel(arch: str) -> None:
    layout = disk.LAYOUTS[arch]
    assert arch in partitions.DPS_ROOT
    assert layout.kernel.startswith("linux-image-")
    assert (layout.efi_target is None) == (layout.efi_name == "")
    assert bool(layout.grub_packages) == bool(layout.firmwares())


def test_cloud_test_images_come_from_the_product_builder() -> None:
    from tests import cloudimage

    assert set(cloudimage.NAMES) == {"amd64", "arm64"}
    with pytest.raises(ValueError, match="no test image recipe for 'ppc64el'"):
        cloudimage.ensure_cloud_image(arch="ppc64el")


# -- mmdebstrap's failures and interruptions --


def test_a_missing_package_is_named(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("I: running apt-get update...\nE: Unable to locate package nosuchpkg\n"
                   "E: Package 'ghost' has no installation candidate\n"
                   "E: mmdebstrap failed to run\n")
    boot = Bootstrap(suite="bookworm", mirror="http://m", arch="amd64",
                     packages=("ghost", "nosuchpkg", "python3"))
    error = debootstrap.failure(boot, 25, log)
    assert str(error) == "no package nosuchpkg, ghost in bookworm for amd64 on http://m"
    log.write_text("W: something\nE: setup failed: E: command failed: mke2fs\n"
                   "E: mmdebstrap failed to run\n")
    assert str(debootstrap.failure(boot, 25, log)).endswith(
        "E: setup failed: E: command failed: mke2fs")


def test_stop_signals_the_whole_group(tmp_path: Path) -> None:
    """mmdebstrap waits for its setup process before it cleans up: the group gets it."""
    script = (f'trap "touch {tmp_path}/main; exit 1" TERM; '
              f'sh -c \'trap "touch {tmp_path}/helper; exit 1" TERM; echo up; '
              'while :; do sleep 1; done\' & wait')
    main = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE,
                            start_new_session=True)
    assert main.stdout is not None and main.stdout.readline() == b"up\n"
    debootstrap.stop(main)
    deadline = time.monotonic() + 60
    while not (tmp_path / "helper").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "helper").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_what_mmdebstrap_left_mounted_is_unmounted_or_the_directory_left(
        tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "chroot" / "proc").mkdir(parents=True)
    (work / "file").write_text("kept")
    assert debootstrap.mounts_under(work) == []
    subprocess.run(["mount", "-t", "tmpfs", "none", str(work / "chroot" / "proc")], check=True)
    (work / "chroot" / "proc" / "inside").write_text("x")
    assert debootstrap.mounts_under(work) == [str(work / "chroot" / "proc")]
    debootstrap.remove_work(work)  # unmounted first, then removed
    assert not work.exists()
    # A mount that will not go (busy): the directory stays, nothing below it is touched.
    (work / "proc").mkdir(parents=True)
    (work / "file").write_text("kept")
    subprocess.run(["mount", "-t", "tmpfs", "none", str(work / "proc")], check=True)
    try:
        with open(work / "proc" / "busy", "w"):
            with pytest.raises(ImageError, match="still has 1 mounts"):
                debootstrap.remove_work(work)
            assert (work / "file").read_text() == "kept"
    finally:
        subprocess.run(["umount", str(work / "proc")], check=False)
    debootstrap.remove_work(work)
    assert not work.exists()


def test_stop_lets_mmdebstrap_clean_up_then_kills(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    script = f'trap "touch {tmp_path}/cleaned; exit 1" TERM; echo up; while :; do sleep 1; done'
    polite = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE,
                              start_new_session=True)
    assert polite.stdout is not None and polite.stdout.readline() == b"up\n"
    debootstrap.stop(polite)
    assert polite.returncode == 1 and (tmp_path / "cleaned").exists()
    monkeypatch.setattr(debootstrap, "STOP_GRACE_S", 0.5)
    stubborn = subprocess.Popen(["sh", "-c", "trap '' TERM; echo up; exec sleep 600"],
                                stdout=subprocess.PIPE, start_new_session=True)
    assert stubborn.stdout is not None and stubborn.stdout.readline() == b"up\n"
    debootstrap.stop(stubborn)
    assert stubborn.returncode == -9
