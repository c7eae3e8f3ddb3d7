"""VM disks in registries: vmrun image push to a real docker-registry, pulled back by vmrun,
listed and copied by skopeo; multi-arch indexes, hostile disks and KubeVirt containerDisks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import ocitools as ot
from tests.integration.test_fastboot import DPS_ROOT, LINUX_DATA, gpt_image, root_tree
from vmrun.errors import UnsafeImage, UsageError
from vmrun.images import store
from vmrun.images.formats import inspect_image
from vmrun.oci import disks
from vmrun.oci import manifest as mf
from vmrun.oci.pull import ensure_disk, ensure_image, oci_root
from vmrun.oci.push import Source, push_disks
from vmrun.oci.reference import parse_reference
from vmrun.oci.registry import Registry

pytestmark = pytest.mark.skipif(ot.REGISTRY is None, reason="needs docker-registry")
SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ot.RunningRegistry]:
    with ot.registry(tmp_path / "registry") as running:
        yield running


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_disk(path: Path, arch: str | None, *, shell: bool = False) -> Path:
    """A raw GPT disk with an ext4 root partition typed for ARCH (None: Linux data)."""
    tree = root_tree(path.with_name(path.stem + "-tree"), shell=shell)
    root_type = DPS_ROOT[arch] if arch else LINUX_DATA
    gpt_image(path, tree, root_type=root_type, root_mib=8)
    return path


def qcow2_of(raw: Path) -> Path:
    out = raw.with_suffix(".qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
                   check=True, capture_output=True)
    return out


def same_content(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)],
                          check=False).returncode == 0


def skopeo_raw(reference: str) -> dict[str, object]:
    assert ot.SKOPEO is not None
    out = subprocess.run([ot.SKOPEO, "inspect", "--raw", "--tls-verify=false", reference],
                         check=True, capture_output=True, timeout=120).stdout
    document: dict[str, object] = json.loads(out)
    return document


@pytest.mark.skipif(ot.SKOPEO is None, reason="needs skopeo")
def test_pushed_disk_pulls_back_identical_and_skopeo_reads_it(
        tmp_path: Path, registry: ot.RunningRegistry) -> None:
    raw = small_disk(tmp_path / "disk.raw", "x86_64")
    qcow2 = qcow2_of(raw)
    cache = tmp_path / "cache"
    store.import_image(qcow2, name="tiny", cache=cache)
    dest = f"docker://{registry.host}/vm/tiny:v1"
    pushed = push_disks([Source("tiny")], dest, cache=cache)

    document = skopeo_raw(dest)  # an independent client reads what vmrun pushed
    assert document["artifactType"] == mf.DISK_ARTIFACT
    layers = document["layers"]
    assert isinstance(layers, list) and len(layers) == 1
    assert layers[0]["mediaType"] == mf.DISK_LAYER_PREFIX + "qcow2"
    assert layers[0]["digest"] == f"sha256:{sha256(qcow2)}"
    annotations = document["annotations"]
    assert isinstance(annotations, dict)
    assert annotations[disks.ANNOTATION_ARCH] == "x86_64"
    assert annotations[disks.ANNOTATION_FORMAT] == "qcow2"
    assert annotations[disks.ANNOTATION_VIRTUAL_SIZE] == str(raw.stat().st_size)
    assert ot.SKOPEO is not None
    subprocess.run([ot.SKOPEO, "copy", "--src-tls-verify=false", dest,
                    f"oci:{tmp_path / 'copied'}:tiny"], check=True, capture_output=True,
                   timeout=300)
    assert sha256(tmp_path / "copied" / "blobs" / "sha256" / sha256(qcow2)) == sha256(qcow2)

    by_tag = ensure_disk(dest, arch="x86_64", cache=tmp_path / "pull1")
    assert by_tag.kind == "artifact" and by_tag.format == "qcow2"
    assert by_tag.origin.digest == pushed.digest
    assert sha256(by_tag.path) == sha256(qcow2) and same_content(by_tag.path, raw)
    assert not os.access(by_tag.path, os.W_OK) or os.getuid() == 0
    # By digest, from another cache: fetched from the registry, the same bytes.
    pinned = f"docker://{registry.host}/vm/tiny@{pushed.digest}"
    by_digest = ensure_disk(pinned, arch="x86_64", cache=tmp_path / "pull2")
    assert sha256(by_digest.path) == sha256(qcow2)
    with pytest.raises(UsageError, match="is a disk for amd64, not aarch64"):
        ensure_disk(dest, arch="aarch64", cache=tmp_path / "pull3")


def test_several_architectures_make_an_index(tmp_path: Path,
                                             registry: ot.RunningRegistry) -> None:
    cache = tmp_path / "cache"
    x86 = small_disk(tmp_path / "x86.raw", "x86_64")
    arm = small_disk(tmp_path / "arm.raw", "aarch64")
    data = small_disk(tmp_path / "data.raw", None)
    for name, path in (("x86", x86), ("arm", arm), ("data", data)):
        store.import_image(path, name=name, cache=cache)
    dest = f"docker://{registry.host}/vm/multi:v1"
    with pytest.raises(UsageError, match="does not say its architecture"):
        push_disks([Source("data")], dest, cache=cache)
    with pytest.raises(UsageError, match="two images for x86_64"):
        push_disks([Source("x86"), Source("data", "x86_64")], dest, cache=cache)
    pushed = push_disks([Source("x86"), Source("arm"), Source("data", "s390x")], dest,
                        cache=cache)
    registry_api = Registry(parse_reference(dest))  # type: ignore[arg-type]
    body, _, digest = registry_api.manifest("v1")
    assert digest == pushed.digest
    index = json.loads(body)
    assert index["mediaType"] == mf.OCI_INDEX
    platforms = {(e["platform"]["architecture"], e["platform"].get("variant"))
                 for e in index["manifests"]}
    assert platforms == {("amd64", None), ("arm64", "v8"), ("s390x", None)}
    pulls = tmp_path / "pulls"
    for arch, path in (("x86_64", x86), ("aarch64", arm), ("s390x", data)):
        pulled = ensure_disk(dest, arch=arch, cache=pulls)
        assert sha256(pulled.path) == sha256(path), arch
        assert pulled.format == "raw" and pulled.origin.arch == arch
    with pytest.raises(UsageError, match="has no image for ppc64le"):
        ensure_disk(dest, arch="ppc64le", cache=pulls)


def test_a_baked_chain_goes_as_one_disk(tmp_path: Path, registry: ot.RunningRegistry) -> None:
    cache = tmp_path / "cache"
    raw = small_disk(tmp_path / "base.raw", "x86_64")
    base = store.import_image(raw, name="base", cache=cache)
    layer = tmp_path / "layer.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base.path), "-F",
                    "raw", str(layer)], check=True)
    # Some data of the layer's own at 1 MiB; then the backing named by digest, as bakes do.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", str(layer)],
                   check=True, capture_output=True)
    subprocess.run(["qemu-img", "rebase", "-q", "-u", "-f", "qcow2", "-b", base.digest, "-F",
                    "raw", str(layer)], check=True)
    baked = store.add_layer(layer, name="baked", under=base, bake_key="k", source="test",
                            cache=cache)
    assert baked.backing == (base.digest,)
    dest = f"docker://{registry.host}/vm/baked:v1"
    push_disks([Source("baked")], dest, cache=cache)
    pulled = ensure_disk(dest, arch="x86_64", cache=tmp_path / "pulled")
    header = inspect_image(pulled.path).qcow2
    assert header is not None and header.backing_file is None  # self-contained
    with open(pulled.path.parent / "expected.raw", "wb") as out:
        out.write(raw.read_bytes())
    expected = pulled.path.parent / "expected.raw"
    with open(expected, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\x5a" * (64 << 10))
    assert same_content(pulled.path, expected)


def _push_artifact(registry: ot.RunningRegistry, repo: str, disk_file: Path,
                   declared: str) -> str:
    """Push DISK_FILE as a disk artifact by hand (vmrun's push would refuse it)."""
    artifact = disks.build_artifact(disk_digest=f"sha256:{sha256(disk_file)}",
                                    disk_size=disk_file.stat().st_size, fmt=declared,
                                    arch="x86_64", virtual_size=1 << 20, created="now")
    dest = f"docker://{registry.host}/{repo}:v1"
    api = Registry(parse_reference(dest))  # type: ignore[arg-type]
    api.actions = "pull,push"
    api.upload_blob(disk_file, artifact.layer)
    config = disk_file.with_suffix(".config")
    config.write_bytes(artifact.config)
    api.upload_blob(config, artifact.config_descriptor)
    api.put_manifest("v1", artifact.manifest, mf.OCI_MANIFEST)
    return dest


def test_a_hostile_disk_is_refused_on_pull(tmp_path: Path,
                                           registry: ot.RunningRegistry) -> None:
    hostile = tmp_path / "hostile.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/passwd", "-F",
                    "raw", "-u", str(hostile), "1M"], check=True)
    dest = _push_artifact(registry, "vm/hostile", hostile, "qcow2")
    cache = tmp_path / "cache"
    env = {**os.environ, "VMRUN_CACHE_DIR": str(cache), "PYTHONPATH": str(SRC)}
    result = subprocess.run([sys.executable, "-m", "vmrun", "image", "pull", dest], env=env,
                            capture_output=True, timeout=120, check=False)
    assert result.returncode == 118, result.stderr
    assert b"backing file" in result.stderr
    root = oci_root(cache)
    assert not list(disks.disks_dir(root).glob("*.disk"))
    assert not (root / "blobs" / "sha256" / sha256(hostile)).exists()
    # Declared raw, yet with a qcow2 header: the classic format confusion, refused too.
    plain = tmp_path / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "1M"], check=True)
    confused = _push_artifact(registry, "vm/confused", plain, "raw")
    with pytest.raises(UnsafeImage, match="declared raw, but its header is qcow2"):
        ensure_disk(confused, arch="x86_64", cache=cache)


def test_a_containerdisk_is_found_and_streamed_out(tmp_path: Path,
                                                   registry: ot.RunningRegistry) -> None:
    qcow2 = qcow2_of(small_disk(tmp_path / "cd.raw", "x86_64"))
    old = ot.file("disk/old.img", b"an older disk, whited out above")
    image = ot.make_image(
        [([ot.directory("disk"), old], "gzip"),
         ([ot.whiteout("disk/old.img"),
           ot.file("disk/fedora.qcow2", qcow2.read_bytes(), uid=107, gid=107)], "gzip")],
        config={"Env": ["PATH=/bin"]})  # KubeVirt's: FROM scratch, no Entrypoint, no Cmd
    ot.push(registry.base, "vm/containerdisk", "v1", image)
    dest = f"docker://{registry.host}/vm/containerdisk:v1"
    cache = tmp_path / "cache"
    pulled = ensure_image(dest, arch="x86_64", cache=cache)
    assert isinstance(pulled, disks.PulledDisk) and pulled.kind == "containerdisk"
    assert pulled.format == "qcow2" and sha256(pulled.path) == sha256(qcow2)
    assert ensure_image(dest, arch="x86_64", cache=cache) == pulled  # cached by digest


def test_ls_rm_and_prune_handle_pulled_disks(tmp_path: Path, registry: ot.RunningRegistry,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from vmrun.cli.image import cmd_image

    cache = tmp_path / "cache"
    monkeypatch.setenv("VMRUN_CACHE_DIR", str(cache))
    first = small_disk(tmp_path / "one.raw", "x86_64")
    store.import_image(first, name="one")
    dest = f"docker://{registry.host}/vm/ls:v1"
    assert cmd_image(["push", "one", dest]) == 0  # the command line, as users push
    assert capsys.readouterr().out.startswith(f"{dest}@sha256:")
    assert cmd_image(["pull", dest]) == 0
    assert capsys.readouterr().out.startswith(f"{dest}  sha256:")
    listed = [e for e in json.loads((cmd_image(["ls", "--json"]), capsys.readouterr().out)[1])
              if e["name"] == dest]
    assert len(listed) == 1 and listed[0]["kind"] == "artifact"
    old_digest = listed[0]["digest"]
    assert cmd_image(["ls"]) == 0
    assert f"{dest}@{old_digest}" in capsys.readouterr().out
    # A new push under the tag: pulled again, the old disk is replaced, prune removes it.
    second = small_disk(tmp_path / "two.raw", "x86_64", shell=True)
    store.import_image(second, name="two")
    push_disks([Source("two")], dest)
    assert cmd_image(["pull", dest]) == 0
    capsys.readouterr()
    assert cmd_image(["prune"]) == 0
    assert f"removed {dest} (x86_64) {old_digest}" in capsys.readouterr().out
    remaining = [e for e in json.loads((cmd_image(["ls", "--json"]), capsys.readouterr().out)[1])
                 if e.get("kind") == "artifact"]
    assert [e["digest"] for e in remaining] != [old_digest] and len(remaining) == 1
    assert sha256(Path(remaining[0]["path"])) == sha256(second)
    assert cmd_image(["rm", dest]) == 0
    assert not [p for p in disks.disks_dir(oci_root(cache)).iterdir()
                if p.suffix in (".disk", ".json")]


@pytest.mark.vm
def test_a_pushed_disk_fast_boots_from_the_registry(tmp_path: Path,
                                                    registry: ot.RunningRegistry) -> None:
    from tests.integration.vmtools import run_cli
    from vmrun.qemu.arch import host_arch, lookup_arch

    arch = lookup_arch(host_arch()).name
    if arch not in DPS_ROOT:
        pytest.skip(f"no root partition type in these tests for {arch}")
    cache = tmp_path / "cache"
    store.import_image(small_disk(tmp_path / "root.raw", arch, shell=True), name="runner",
                       cache=cache)
    dest = f"docker://{registry.host}/vm/runner:v1"
    push_disks([Source("runner")], dest, cache=cache)
    result = run_cli("--image", dest, "--share", "none", "--", "cat", "/vmrun-marker",
                     cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    assert result.stdout == b"in the image\n"
