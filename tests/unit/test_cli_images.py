"""`vmrun image inspect` and `vmrun disk` through the real command line entry point."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vmrun.cli import main


def test_image_inspect_json_agrees_with_qemu_img(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "3G"], check=True)
    assert main(["image", "inspect", str(image), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    theirs = json.loads(subprocess.run(
        ["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(image)],
        capture_output=True, text=True, check=True).stdout)
    assert ours["format"] == theirs["format"] == "qcow2"
    assert ours["virtual_size"] == theirs["virtual-size"]
    assert ours["qcow2"]["cluster_size"] == theirs["cluster-size"]


def test_image_import_refuses_a_backing_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Taking an image in runs the header check; here a backing file names a host path.
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    code = main(["image", "import", str(top), "--name", "evil"])
    assert code == 118
    assert "backing" in capsys.readouterr().err


def test_disk_overlay_and_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    top = tmp_path / "top.qcow2"
    assert main(["disk", "overlay", str(base), str(top)]) == 0
    assert main(["disk", "chain", str(top), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)
    assert [Path(layer["path"]).name for layer in layers] == ["top.qcow2", "base.raw"]
    assert main(["disk", "overlay", str(base), str(top)]) == 125  # never overwrites


def test_one_digest_style_in_full_and_short() -> None:
    from vmrun.cli.common import digest_text

    hexdigest = "ab" * 32
    assert digest_text(hexdigest) == digest_text(f"sha256:{hexdigest}") == f"sha256:{hexdigest}"
    assert digest_text(hexdigest, short=True) == "sha256:abababababab"
    assert digest_text(f"sha512:{'cd' * 64}", short=True) == "sha512:cdcdcdcdcdcd"
    assert digest_text("") == ""


def test_the_short_digest_of_a_listing_is_taken_back_as_a_reference(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from vmrun.images import store

    monkeypatch.setenv("VMRUN_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "disk.raw"
    source.write_bytes(b"disk" * (1 << 18))  # 1 MiB: a raw disk vmrun takes
    assert main(["image", "import", str(source), "--name", "mine", "--format", "raw"]) == 0
    name, full = capsys.readouterr().out.split()
    assert name == "mine" and full.startswith("sha256:") and len(full) == 7 + 64
    assert main(["image", "ls"]) == 0
    short = capsys.readouterr().out.splitlines()[1].split()[1]
    assert short == full[:7 + 12]
    assert store.resolve(short).digest == store.resolve(full).digest == full[7:]
