"""OCI root images in the store: listed by `vmrun image ls`, removed by rm, pruned."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests import ocitools as ot
from vmrun.cache import locked
from vmrun.cli.image import cmd_image
from vmrun.errors import ImageError
from vmrun.oci import store as oci_store
from vmrun.oci.pull import ensure_root_image

pytestmark = pytest.mark.skipif(ot.TAR2SQFS is None, reason="needs squashfs-tools-ng")


def layout_with(path: Path, marker: str) -> Path:
    image = ot.make_image([([ot.file("marker", marker)], "gzip")])
    return ot.write_layout(path, image, "v1")


def test_ls_rm_and_prune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("VMRUN_CACHE_DIR", str(cache))
    layout = tmp_path / "layout"
    old = ensure_root_image(f"oci:{layout_with(layout, 'one')}:v1", arch="x86_64")
    time.sleep(1.1)  # "created" has seconds
    new = ensure_root_image(f"oci:{layout_with(layout, 'two')}:v1", arch="x86_64")
    other = ensure_root_image(f"oci:{layout_with(tmp_path / 'other', 'three')}:v1",
                              arch="x86_64")
    assert old.reference == new.reference and old.path != new.path

    assert cmd_image(["ls"]) == 0
    table = capsys.readouterr().out
    assert f"oci:{layout}:v1" in table and new.digest.removeprefix("sha256:")[:12] in table
    assert "squashfs (x86_64)" in table

    # Leftovers of a dead pull go; what a live pull holds stays.
    tmp = cache / "oci" / "tmp"
    (tmp / "dead.part").write_bytes(b"x")
    (tmp / "dead.lock").touch()
    (tmp / "busy.part").write_bytes(b"x")
    with locked(tmp / "busy.lock"):
        assert cmd_image(["prune"], in_use_paths=set) == 0
    pruned = capsys.readouterr().out
    assert f"removed oci:{layout}:v1 (x86_64) {old.digest}" in pruned
    assert "removed blob sha256:" in pruned
    assert not old.path.exists() and new.path.exists() and other.path.exists()
    assert not (tmp / "dead.part").exists() and not (tmp / "dead.lock").exists()
    assert (tmp / "busy.part").exists()
    assert not any((cache / "oci" / "blobs" / "sha256").iterdir())

    # A replaced root that a live run stands on is kept.
    time.sleep(1.1)
    newest = ensure_root_image(f"oci:{layout_with(layout, 'four')}:v1", arch="x86_64")
    assert oci_store.prune(in_use=lambda: {str(new.path)}) and new.path.exists()
    assert newest.path.exists()

    # The form `image ls` shows names one image of several with one reference.
    assert cmd_image(["ls"]) == 0
    assert f"oci:{layout}:v1@{new.digest}" in capsys.readouterr().out
    with pytest.raises(ImageError, match="no OCI image"):
        cmd_image(["rm", f"oci:{layout}:v2@{new.digest}"])  # the digest, another name
    assert cmd_image(["rm", f"oci:{layout}:v1@{new.digest}"]) == 0
    assert not new.path.exists() and newest.path.exists()
    assert cmd_image(["rm", f"oci:{layout}:v1"]) == 0
    assert not newest.path.exists() and other.path.exists()
    with pytest.raises(ImageError, match="no OCI image"):
        cmd_image(["rm", f"oci:{layout}:v1"])
    assert [root.path for root in oci_store.list_roots()] == [other.path]
    assert os.access(other.path, os.R_OK)
