"""From oci: and oci-archive: references to cached root images (no registry needed)."""

from __future__ import annotations

import os
import tarfile
import threading
from pathlib import Path

import pytest

from tests import ocitools as ot
from tests.unit.test_oci_layers import needs_squashfs
from vmrun.errors import UnsafeImage, UsageError, VerificationError
from vmrun.oci import pull as oci_pull
from vmrun.oci.manifest import Descriptor
from vmrun.oci.reference import LayoutRef

pytestmark = needs_squashfs


def snapshot(root: Path, skip: Path) -> dict[str, float]:
    found = {}
    for dirpath, _, names in os.walk(root):
        if Path(dirpath).is_relative_to(skip):
            continue
        for name in names:
            found[os.path.join(dirpath, name)] = os.lstat(os.path.join(dirpath, name)).st_mtime
    return found


def test_layout_index_picks_the_architecture_and_caches(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    layout = ot.multiarch_layout(tmp_path / "layout")
    cache = tmp_path / "cache"
    notices: list[str] = []
    image = oci_pull.ensure_root_image(f"oci:{layout}:multi", arch="s390x", cache=cache,
                                       notice=notices.append)
    tree = ot.files_of(image.path)
    assert tree["etc/arch"][1] == b"s390x" and "etc/gone" not in tree
    assert image.config.env == ("PATH=/bin", "ARCH=s390x")
    assert image.config.entrypoint == ("/bin/sh",) and image.config.cmd == ("-c", "cat /etc/arch")
    assert (image.config.working_dir, image.config.user) == ("/etc", "1000")
    assert image.arch == "s390x" and image.format == "squashfs"
    assert image.path.is_relative_to(cache) and (image.path.stat().st_mode & 0o222) == 0
    assert len(notices) == 1 and "converting 3 layers" in notices[0]

    def no_conversion(*args: object, **kwargs: object) -> int:
        raise AssertionError("converted again")

    monkeypatch.setattr(oci_pull, "build_rootfs", no_conversion)
    again = oci_pull.ensure_root_image(f"oci:{layout}:multi", arch="s390x", cache=cache)
    assert again == image
    monkeypatch.undo()
    arm = oci_pull.ensure_root_image(f"oci:{layout}:multi", arch="arm64", cache=tmp_path / "c2")
    assert ot.files_of(arm.path)["etc/arch"][1] == b"arm64/v8"


def test_missing_platform_lists_what_the_image_has(tmp_path: Path) -> None:
    layout = ot.multiarch_layout(tmp_path / "layout")
    with pytest.raises(UsageError) as raised:
        oci_pull.ensure_root_image(f"oci:{layout}:multi", arch="riscv64", cache=tmp_path / "c")
    assert "has no image for riscv64 (linux/riscv64)" in str(raised.value)
    assert raised.value.hint == "it has: linux/amd64, linux/arm64/v8, linux/s390x"
    with pytest.raises(UsageError, match="no manifest tagged so"):
        oci_pull.ensure_root_image(f"oci:{layout}:other", arch="s390x", cache=tmp_path / "c")


def test_oci_archive(tmp_path: Path) -> None:
    layout = ot.write_layout(tmp_path / "layout", ot.marker_image("amd64"), "v1")
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
    image = oci_pull.ensure_root_image(f"oci-archive:{archive}", arch="x86_64",
                                       cache=tmp_path / "cache")
    assert ot.files_of(image.path)["etc/arch"][1] == b"amd64"
    assert image.manifest_digest == image.digest  # a single manifest, no index


def test_tampered_blob_is_refused_and_not_stored(tmp_path: Path) -> None:
    image = ot.marker_image("amd64")
    layout = ot.write_layout(tmp_path / "layout", image, "v1")
    layer = layout / "blobs" / "sha256" / next(
        d.removeprefix("sha256:") for d, b in image.blobs.items() if len(b) > 100_000)
    data = bytearray(layer.read_bytes())
    data[-100] ^= 1
    layer.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(VerificationError, match="does not match its digest and size"):
        oci_pull.ensure_root_image(f"oci:{layout}", arch="x86_64", cache=cache)
    stored = {p.name for p in (cache / "oci" / "blobs" / "sha256").iterdir()}
    assert layer.name not in stored and len(stored) == 1  # the config only
    assert not list((cache / "oci" / "tmp").glob("*.part"))


@pytest.mark.parametrize("entries", [
    [ot.file("../../../escaped", "x")],
    [ot.file("a/../../escaped", "x")],
    [ot.symlink("evil", "/"), ot.file("evil/escaped", "x")],
])
def test_hostile_layer_refused_and_nothing_written_outside_the_cache(
        tmp_path: Path, entries: list[ot.Entry], monkeypatch: pytest.MonkeyPatch) -> None:
    image = ot.make_image([(ot.busybox_layer(), "gzip"), (entries, "gzip")])
    layout = ot.write_layout(tmp_path / "work" / "layout", image, "v1")
    cache = tmp_path / "work" / "cache"
    monkeypatch.chdir(tmp_path / "work")
    before = snapshot(tmp_path, cache)
    try:
        root = oci_pull.ensure_root_image(f"oci:{layout}", arch="x86_64", cache=cache)
    except UnsafeImage as err:
        assert str(err).startswith("layer 2 (sha256:") and "escapes the image root" in str(err)
    else:
        # A symlink in the way is data: the file lands inside the image, in a directory.
        tree = ot.files_of(root.path)
        assert tree["evil"][0].isdir() and tree["evil/escaped"][1] == b"x"
    assert snapshot(tmp_path, cache) == before
    assert not Path("/escaped").exists()


def test_concurrent_fetches_of_one_blob_fetch_once(tmp_path: Path) -> None:
    blob = os.urandom(1 << 16)
    descriptor = Descriptor("application/octet-stream", ot.digest_of(blob), len(blob))
    calls: list[int] = []
    lock = threading.Lock()

    class Slow:
        def blob(self, d: Descriptor, part: Path, progress: object) -> None:
            with lock:
                calls.append(1)
            threading.Event().wait(0.2)
            part.write_bytes(blob)

    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(oci_pull.ensure_blob(
        tmp_path, Slow(), descriptor, None))) for _ in range(8)]  # type: ignore[arg-type]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 8 and results[0].read_bytes() == blob


def test_a_layout_without_index_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not an OCI image layout"):
        oci_pull.ensure_root_image(LayoutRef(tmp_path), arch="x86_64", cache=tmp_path / "c")
