"""Baked layers in the store: stored by content, chained by digest, checked before use."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmrun.errors import ImageError, UnsafeImage
from vmrun.images import formats, store
from vmrun.images.attach import check_base


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def validate(path: Path, has_backing: bool) -> object:
    return formats.check_foreign_image(path, allow_backing=has_backing)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMRUN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def base_image(tmp_path: Path, cache: Path) -> store.StoredImage:
    raw = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(raw), "16M")
    return store.import_image(raw, name="base", cache=cache)


def layer_on(under: store.StoredImage, tmp_path: Path, name: str = "layer.qcow2") -> Path:
    """A qcow2 with some data of its own, whose backing file is UNDER by digest alone."""
    layer = tmp_path / name
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(under.path), "-F", "qcow2", str(layer))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(layer)],
                   check=True, capture_output=True)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", under.digest, "-F", "qcow2", str(layer))
    return layer


def test_a_layer_is_stored_chained_and_found_by_its_key(tmp_path: Path, cache: Path) -> None:
    base = base_image(tmp_path, cache)
    layer = store.add_layer(layer_on(base, tmp_path), name="baked", under=base,
                            bake_key="k1", source="test", cache=cache)
    assert layer.backing == (base.digest,)
    assert layer.path.parent == base.path.parent  # the relative backing name resolves
    assert oct(layer.path.stat().st_mode & 0o777) == "0o444"
    assert store.find_baked("k1", cache) == store.resolve("baked", cache)
    assert store.find_baked("k2", cache) is None
    store.check_layer_chain(layer, validate=validate, cache=cache)
    # A layer on the layer: the chain is recorded whole.
    top = store.add_layer(layer_on(layer, tmp_path, "top.qcow2"), name="top", under=layer,
                          bake_key="k3", source="test", cache=cache)
    assert top.backing == (layer.digest, base.digest)
    store.check_layer_chain(top, validate=validate, cache=cache)
    # The guest-visible bytes come through the whole chain.
    out = subprocess.run(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", "bs=65536", "count=1",
                          f"if={top.path}", f"of={tmp_path / 'head.raw'}"], check=True)
    assert out.returncode == 0
    assert (tmp_path / "head.raw").read_bytes() == b"\x5a" * 65536


def test_aliases_and_prune_keep_what_layers_stand_on(tmp_path: Path, cache: Path) -> None:
    base = base_image(tmp_path, cache)
    layer = store.add_layer(layer_on(base, tmp_path), name="baked", under=base, bake_key="k",
                            source="test", cache=cache)
    again = store.alias_name("baked-too", layer, cache)
    assert (again.digest, again.backing, again.bake_key) == (layer.digest, layer.backing, "k")
    store.remove("base", cache)
    assert store.prune(cache) == []  # the base has no name now, but a layer stands on it
    store.remove("baked", cache)
    store.remove("baked-too", cache)
    assert sorted(store.prune(cache)) == sorted([base.digest, layer.digest])


def test_a_changed_or_missing_layer_is_refused(tmp_path: Path, cache: Path) -> None:
    base = base_image(tmp_path, cache)
    layer = store.add_layer(layer_on(base, tmp_path), name="baked", under=base, bake_key="k",
                            source="test", cache=cache)
    os.chmod(base.path, 0o644)
    with open(base.path, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"changed")
    with pytest.raises(ImageError, match="base image changed"):
        store.check_layer_chain(layer, validate=validate, cache=cache)
    base.path.unlink()
    with pytest.raises(ImageError, match="missing from the store"):
        store.check_layer_chain(layer, validate=validate, cache=cache)


def test_a_layer_naming_another_backing_file_is_refused(tmp_path: Path, cache: Path) -> None:
    base = base_image(tmp_path, cache)
    evil = tmp_path / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F", "raw", "-u", str(evil),
             "16M")
    layer = store.add_layer(evil, name="evil", under=base, bake_key="k", source="test",
                            cache=cache)
    with pytest.raises(UnsafeImage):
        store.check_layer_chain(layer, validate=validate, cache=cache)
    other = tmp_path / "other.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "0" * 64, "-F", "qcow2", "-u", str(other),
             "16M")
    wrong = store.add_layer(other, name="wrong", under=base, bake_key="k2", source="test",
                            cache=cache)
    with pytest.raises(ImageError, match="the store says"):
        store.check_layer_chain(wrong, validate=validate, cache=cache)


def test_a_run_checks_a_layer_by_its_chain(tmp_path: Path, cache: Path) -> None:
    base = base_image(tmp_path, cache)
    layer = store.add_layer(layer_on(base, tmp_path), name="baked", under=base, bake_key="k",
                            source="test", cache=cache)
    info = check_base(layer.path, layer.digest)
    assert info.format == "qcow2"
    # The same file outside the store (no chain record) is refused for its backing file.
    with pytest.raises(UnsafeImage):
        check_base(layer.path, None)
