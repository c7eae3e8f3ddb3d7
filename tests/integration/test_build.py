"""Images from packages, for real: `--packages` runs in a root built from the Debian archive,
`vmrun image build` gives the stored image again for the same inputs, and `vmrun image
export` writes disks other hypervisors read, still bootable.

The built cloud image itself (tests/cloudimage.py, made by the same builder) boots with
--boot fast and --boot full, BIOS and UEFI, in test_cloud.py and test_cloud_arm64.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cloudimage import NAMES, ensure_cloud_image
from tests.integration.vmtools import run_cli
from vmrun.errors import ImageError
from vmrun.images import store
from vmrun.images.partitions import find_root_partition, read_head
from vmrun.qemu.arch import host_arch
from vmrun.qemu.firmware import Firmware, bootable_by

pytestmark = [pytest.mark.vm, pytest.mark.network]
BUILD_TIMEOUT = 1800  # mmdebstrap downloads and installs for real: minutes on a busy host
RUN_TIMEOUT = 600


@pytest.fixture(scope="module")
def cloud_image() -> Path:
    if host_arch() != "x86_64":
        pytest.skip("the test image is built for x86_64 hosts")
    return ensure_cloud_image()


def test_packages_run_in_a_root_with_those_packages(tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("from the host\n")
    script = ("import sys, os; print(open('data.txt').read().strip(), sys.version_info[0]); "
              "open('out.txt', 'w').write('from the guest'); sys.exit(7)")
    done = run_cli("--packages", "python3", "--", "python3", "-c", script, cwd=tmp_path,
                   timeout=BUILD_TIMEOUT)
    assert done.returncode == 7, done.stderr.decode()
    assert done.stdout.decode() == "from the host 3\n"
    assert (tmp_path / "out.txt").read_text() == "from the guest"
    # Built once: the second run uses the cached root, and says nothing about building.
    again = run_cli("--packages", "python3", "--", "sh", "-c",
                    "command -v python3 && ! command -v apt-get && test ! -d /usr/share/man/man1",
                    cwd=tmp_path, timeout=RUN_TIMEOUT)
    assert again.returncode == 0, again.stderr.decode()
    assert b"building" not in again.stderr
    assert again.stdout.decode().strip() == "/usr/bin/python3"
    listed = json.loads(run_cli("image", "ls", "--json", cwd=tmp_path).stdout)
    assert any(str(entry["name"]).startswith("packages:") and "python3" in str(entry["name"])
               and entry["kind"] == "oci" for entry in listed)


def test_bad_package_names_fail_before_anything_is_built(tmp_path: Path) -> None:
    done = run_cli("--packages", "python3,Bad_Name", "--", "true", cwd=tmp_path)
    assert done.returncode == 125
    assert "bad package name 'Bad_Name' in --packages" in done.stderr.decode()
    done = run_cli("--suite", "trixie", "--", "true", cwd=tmp_path)
    assert done.returncode == 125
    assert "--suite works with --packages only" in done.stderr.decode()


def test_image_build_gives_the_same_inputs_back_at_once(cloud_image: Path,
                                                        tmp_path: Path) -> None:
    built = store.resolve(NAMES["amd64"])
    done = run_cli("image", "build", "--name", "vmrun-test-built", cwd=tmp_path,
                   timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["vmrun-test-built", f"sha256:{built.digest}"]
    assert "is up to date (built before from the same inputs" in done.stderr.decode()
    assert store.resolve("vmrun-test-built").path == cloud_image


def test_export_writes_bootable_disks_for_other_hypervisors(cloud_image: Path,
                                                            tmp_path: Path) -> None:
    virtual_size = _info(cloud_image)["virtual-size"]
    for fmt in ("raw", "vmdk", "vhdx", "qcow2"):
        out = tmp_path / f"disk.{fmt}"
        done = run_cli("image", "export", NAMES["amd64"], str(out), "--format", fmt,
                       cwd=tmp_path, timeout=RUN_TIMEOUT)
        assert done.returncode == 0, done.stderr.decode()
        info = _info(out)
        assert info["format"] == fmt and info["virtual-size"] == virtual_size
        assert "backing-filename" not in info  # standalone: the chain is flattened
        head = read_head(out, fmt)
        assert bootable_by(head) == {Firmware.BIOS, Firmware.UEFI}
        assert find_root_partition(head, "x86_64") == 3
        if fmt in ("vmdk", "vhdx", "qcow2"):
            checked = subprocess.run(["qemu-img", "check", "-f", fmt, str(out)],
                                     capture_output=True, text=True, check=False)
            assert checked.returncode == 0, checked.stdout + checked.stderr
    refused = run_cli("image", "export", NAMES["amd64"], str(tmp_path / "disk.raw"),
                      "--format", "raw", cwd=tmp_path)
    assert refused.returncode != 0 and "exists" in refused.stderr.decode()
    # Converted back, the VMDK and the VHDX run: the root partition found, its userland
    # there; the raw export runs as it is.
    for fmt in ("vmdk", "vhdx"):
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "qcow2",
                        str(tmp_path / f"disk.{fmt}"), str(tmp_path / f"back-{fmt}.qcow2")],
                       check=True)
    for disk in ("disk.raw", "back-vmdk.qcow2", "back-vhdx.qcow2"):
        done = run_cli("--image", str(tmp_path / disk), "--boot", "fast", "--net", "none",
                       "--", "sh", "-c", "test -x /usr/bin/cloud-init && cat /etc/debian_version",
                       cwd=tmp_path, timeout=RUN_TIMEOUT)
        assert done.returncode == 0, f"{disk}: {done.stderr.decode()}"
        assert done.stdout.decode().startswith("12."), disk


def _info(path: Path) -> dict[str, object]:
    info: dict[str, object] = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(path)], capture_output=True,
        check=True).stdout)
    return info


def test_a_package_that_does_not_exist_is_named_and_nothing_stored(tmp_path: Path) -> None:
    before = sorted((_oci_roots()).glob("*"))
    done = run_cli("--packages", "python3,vmrun-no-such-package", "--", "true", cwd=tmp_path,
                   timeout=BUILD_TIMEOUT)
    assert done.returncode == 118, done.stderr.decode()
    errors = [line for line in done.stderr.decode().splitlines()
              if line.startswith("vmrun: error:")]
    assert len(errors) == 1
    assert errors[0].startswith("vmrun: error: no package vmrun-no-such-package in bookworm "
                                "for amd64")
    assert sorted(_oci_roots().glob("*")) == before


def test_an_interrupted_build_leaves_nothing(tmp_path: Path) -> None:
    """In a cache of its own, so that other builds on the host cannot blur the check."""
    from tests.integration.vmtools import vmrun_argv, vmrun_env

    cache = tmp_path / "cache"
    argv = vmrun_argv("image", "build", "--name", "vmrun-test-interrupted",
                      "--packages", "hello", "--refresh")
    proc = subprocess.Popen(argv, cwd=tmp_path, env={**vmrun_env(), "VMRUN_CACHE_DIR": str(cache)},
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    seen = b""
    while b"building vmrun-test-interrupted" not in seen:  # mmdebstrap starts now
        line = proc.stderr.readline()
        assert line, seen
        seen += line
    time.sleep(20)  # well into the downloads or the installation
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 130, rest
    with pytest.raises(ImageError):
        store.resolve("vmrun-test-interrupted", cache)
    work = store.store_root(cache) / "tmp"
    assert [p.name for p in work.glob("*") if not p.name.endswith(".lock")] == []
    assert list((store.store_root(cache) / "blobs").glob("*")) == []
    assert str(cache) not in Path("/proc/mounts").read_text()
    assert subprocess.run(["pgrep", "-f", "mmdebstrap.*hello"], check=False).returncode == 1


def _oci_roots() -> Path:
    from vmrun.oci.pull import oci_root

    return oci_root() / "roots"
