"""Cloud images end to end: pull by alias from a local mirror, bake with cloud-init, run
the baked image with --boot full (SSH) and --boot fast (vmrun's kernel), copy in and out.

The image is tests/cloudimage.py's Debian cloud-style image, built from Debian packages
once and cached. Full boots take a minute or two each under TCG here, so this module keeps
them few: the bake (which installs vmrun's run hook), one full run that checks everything
a full run does and logs in over the hook's virtio-serial port, and one over the forwarded
TCP port, as an image without the hook does, with the impostor check inside it.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cloudimage import ensure_cloud_image
from tests.integration.vmtools import run_cli
from vmrun.cache import sha256_file
from vmrun.errors import HostKeyMismatch, ImageError
from vmrun.guest.build import Guest
from vmrun.images import store
from vmrun.qemu.arch import host_arch

pytestmark = pytest.mark.vm
if host_arch() != "x86_64":
    pytest.skip("the test image (tests/cloudimage.py) is built for x86_64 hosts",
                allow_module_level=True)

ALIAS_PATH = "bookworm/latest/debian-12-genericcloud-amd64.qcow2"
PACKAGE = "vmrun-hello"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def make_deb(directory: Path) -> Path:
    """A tiny real .deb: /usr/bin/vmrun-hello, built with dpkg-deb."""
    root = directory / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {PACKAGE}\nVersion: 1.0\nArchitecture: all\nMaintainer: vmrun tests "
        "<tests@vmrun.invalid>\nDescription: says hello from a package\n")
    (root / "usr" / "bin").mkdir(parents=True)
    script = root / "usr" / "bin" / PACKAGE
    script.write_text("#!/bin/sh\necho hello from the package\n")
    script.chmod(0o755)
    deb = directory / f"{PACKAGE}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(deb)], check=True,
                   stdout=subprocess.DEVNULL)
    return deb


def write_flat_repo(directory: Path, deb: Path) -> None:
    """An apt flat repository (`deb [trusted=yes] URL ./`) holding DEB."""
    data = deb.read_bytes()
    control = subprocess.run(["dpkg-deb", "-f", str(deb)], check=True,
                             capture_output=True).stdout.decode().strip()
    stanza = (f"{control}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
              f"SHA256: {hashlib.sha256(data).hexdigest()}\n\n")
    packages = stanza.encode()
    (directory / "Packages").write_bytes(packages)
    (directory / "Packages.gz").write_bytes(gzip.compress(packages))
    (directory / "Release").write_text(
        "Origin: vmrun-tests\nLabel: vmrun-tests\nSuite: tests\nCodename: tests\n"
        "Date: Tue, 01 Dec 2026 00:00:00 UTC\nSHA256:\n"
        f" {hashlib.sha256(packages).hexdigest()} {len(packages)} Packages\n")


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A local HTTP server holding the test image under the debian:12 alias's path, with
    its SHA512SUMS, and an apt repository with one package; yields (URL, image)."""
    image = ensure_cloud_image()
    # The alias is pulled from this mirror during the session, never an older pull's.
    with contextlib.suppress(ImageError):
        store.remove("debian:12")
    root = tmp_path_factory.mktemp("mirror")
    alias_file = root / ALIAS_PATH
    alias_file.parent.mkdir(parents=True)
    try:
        os.link(image, alias_file)
    except OSError:
        alias_file.write_bytes(image.read_bytes())
    digest = hashlib.sha512(alias_file.read_bytes()).hexdigest()
    (alias_file.parent / "SHA512SUMS").write_text(f"{digest}  {alias_file.name}\n")
    repo = root / "apt"
    repo.mkdir()
    make_deb(tmp_path_factory.mktemp("deb")).rename(repo / f"{PACKAGE}_1.0_all.deb")
    write_flat_repo(repo, repo / f"{PACKAGE}_1.0_all.deb")
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", image
    finally:
        server.shutdown()
        server.server_close()


def bake_user_data(url: str) -> str:
    port = url.rsplit(":", 1)[1]
    # The guest reaches the host's loopback as 10.0.2.2 through QEMU's user network.
    return (
        "#cloud-config\n"
        "users:\n  - default\n  - name: tester\n    shell: /bin/bash\n"
        "apt:\n  preserve_sources_list: false\n"
        f"  sources_list: |\n    deb [trusted=yes] http://10.0.2.2:{port}/apt ./\n"
        f"packages: [{PACKAGE}]\n"
        "write_files:\n  - path: /etc/vmrun-baked\n    content: \"baked\\n\"\n"
    )


@pytest.fixture(scope="module")
def baked(mirror: tuple[str, Path], guest: Guest,
          tmp_path_factory: pytest.TempPathFactory) -> store.StoredImage:
    url, _ = mirror
    work = tmp_path_factory.mktemp("bake")
    (work / "user-data").write_text(bake_user_data(url))
    env_mirror = {"VMRUN_IMAGE_MIRROR": url}
    done = run_cli("image", "bake", "debian:12", "--user-data", "user-data", "--name",
                   "vmrun-test-baked", "--quiet", cwd=work, timeout=900, env_extra=env_mirror)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    layer = store.resolve("vmrun-test-baked")
    assert layer.backing, "a baked image is a layer on its base"
    return layer


def test_bake_stores_a_layer_and_is_instant_the_second_time(
        baked: store.StoredImage, mirror: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = mirror
    base = store.resolve(baked.backing[0])
    assert sha256_file(base.path) == base.digest
    assert sha256_file(baked.path) == baked.digest
    (tmp_path / "user-data").write_text(bake_user_data(url))
    again = run_cli("image", "bake", "debian:12", "--user-data", "user-data", "--name",
                    "vmrun-test-baked-again", "--quiet", cwd=tmp_path, timeout=120,
                    env_extra={"VMRUN_IMAGE_MIRROR": url})
    assert again.returncode == 0, again.stderr
    assert b"up to date" in again.stderr
    assert store.resolve("vmrun-test-baked-again").digest == baked.digest


def test_bake_failure_shows_cloud_init_errors(mirror: tuple[str, Path], tmp_path: Path,
                                              guest: Guest) -> None:
    """Also the UEFI path: the image has an EFI system partition beside its BIOS boot
    partition, and this boot goes through OVMF and GRUB's EFI image."""
    (tmp_path / "user-data").write_text("#cloud-config\nruncmd:\n  - [sh, -c, 'exit 3']\n")
    done = run_cli("image", "bake", "debian:12", "--user-data", "user-data", "--name",
                   "vmrun-test-broken", "--quiet", "--firmware", "uefi", "--keep", cwd=tmp_path,
                   timeout=900, env_extra={"VMRUN_IMAGE_MIRROR": mirror[0]})
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 117, err[-3000:]
    assert "cloud-init reported errors" in err and "scripts-user" in err
    assert "guest console (tail)" in err
    with pytest.raises(ImageError):
        store.resolve("vmrun-test-broken")
    kept = [line.split()[-4] for line in err.splitlines() if "kept the run directory" in line]
    argv = (Path(kept[0]) / "qemu.argv").read_text()
    shutil.rmtree(kept[0])
    assert "if=pflash" in argv and "uefi-vars.fd" in argv


def test_bake_that_never_powers_off_times_out(mirror: tuple[str, Path], tmp_path: Path,
                                              guest: Guest) -> None:
    (tmp_path / "user-data").write_text("#cloud-config\nbootcmd:\n  - [sleep, '3600']\n")
    done = run_cli("image", "bake", "debian:12", "--user-data", "user-data", "--name",
                   "vmrun-test-slow", "--quiet", "--timeout", "20", cwd=tmp_path, timeout=300,
                   env_extra={"VMRUN_IMAGE_MIRROR": mirror[0]})
    assert done.returncode == 117, done.stderr
    assert b"did not power off within 20s" in done.stderr
    with pytest.raises(ImageError):
        store.resolve("vmrun-test-slow")


def test_fast_boot_runs_in_the_baked_userland(baked: store.StoredImage, tmp_path: Path) -> None:
    done = run_cli("--image", "vmrun-test-baked", "--boot", "fast", "--net", "none", "--",
                   "sh", "-c", f"id tester && {PACKAGE} && cat /etc/vmrun-baked && exit 7",
                   cwd=tmp_path, timeout=300)
    assert done.returncode == 7, done.stderr
    assert b"hello from the package" in done.stdout
    assert b"baked" in done.stdout
    assert sha256_file(baked.path) == baked.digest


def test_full_boot_runs_over_ssh_with_copy_in_and_collect(
        baked: store.StoredImage, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "input.txt").write_text("from the host\n")
    (project / "secret.key").write_text("must not be copied\n")
    script = (
        f"set -e; id tester; sudo -n true; {PACKAGE}; cat src/input.txt; "
        "test ! -e secret.key; mkdir -p out; echo result > out/report.txt; "
        "ln -s /etc/passwd out/escape; echo to-stderr >&2; "
        # The login came before the network; the documented wait gives the guest its route.
        "sudo systemctl start network-online.target; ip -4 route | grep -q '^default'; "
        "exit 42"
    )
    done = run_cli("--image", "vmrun-test-baked", "--boot", "full", "--verbose",
                   "--include", "src/***", "--exclude", "*", "--collect", "out",
                   "--", "sh", "-c", script, cwd=project, timeout=900)
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 42, err[-3000:]
    assert b"hello from the package" in done.stdout
    assert b"from the host" in done.stdout
    assert "to-stderr" in err and "<<vmrun-end-" not in err
    # The bake installed vmrun's run hook: the login came over the virtio-serial port,
    # before cloud-init and the network, and sudo works without resolver warnings.
    assert "SSH server on the virtio-serial port org.vmrun.ssh" in err
    assert "unable to resolve host" not in err
    for phase in ("booting", "port ready", "sshd started", "ssh ready", "copy-in", "command",
                  "collect",
                  "power-off"):
        assert f"vmrun: {phase}: " in err
    assert (project / "out" / "report.txt").read_text() == "result\n"
    assert not (project / "out" / "escape").exists()  # a link out of the target: skipped
    assert sha256_file(baked.path) == baked.digest


def test_full_boot_refuses_an_impostor(baked: store.StoredImage, tmp_path: Path) -> None:
    """Inside one full boot over the forwarded TCP port (the way an image without vmrun's
    run hook logs in): a command works; with another host key pinned (as if another
    server answered on the port) ssh refuses to talk, and vmrun says why."""
    from vmrun import ssh as sshlib
    from vmrun.fullboot import FullMachine, FullOptions
    from vmrun.spec import Boot, Command, MachineSpec, Share

    spec = MachineSpec(image="vmrun-test-baked", boot=Boot.FULL, share=Share.NONE)
    with FullMachine(spec, FullOptions(serial_ssh=False), notice=lambda message: None) \
            as machine:
        ok = machine.run(Command(("sh", "-c", "echo hi; exit 255")), capture=True)
        assert machine.proxy is None and machine.port != 0  # TCP, not the serial port
        assert (ok.exit_code, ok.stdout) == (255, b"hi\n")  # 255 is the command's own
        machine.end_master()  # the next session connects anew, as to a new server
        other = sshlib.make_keys(tmp_path / "other")
        assert machine.keys is not None
        machine.keys.known_hosts.write_text(other.known_hosts.read_text())
        with pytest.raises(HostKeyMismatch, match="impostor"):
            machine.run(Command(("true",)), capture=True)


def test_alias_pull_verified_the_mirror_copy(mirror: tuple[str, Path]) -> None:
    url, image = mirror
    pulled = store.resolve("debian:12")
    assert pulled.digest == sha256_file(image)
    assert url  # the pull went through the local mirror's SHA512SUMS



def test_vmrun_cloud_config_passes_cloud_inits_own_schema(baked: store.StoredImage,
                                                        tmp_path: Path) -> None:
    """What vmrun adds to seeds, checked by the image's cloud-init (through a fast boot)."""
    from vmrun import bake as bakelib
    from vmrun import seed as seedlib
    from vmrun import ssh as sshlib
    from vmrun.fullboot import run_cloud_config

    keys = sshlib.make_keys(tmp_path / "keys")
    (tmp_path / "run.yaml").write_bytes(
        seedlib.merge_cloud_config(b"#cloud-config\n", run_cloud_config(keys)))
    (tmp_path / "bake.yaml").write_bytes(bakelib.bake_user_data(bake_user_data("http://x:1").encode()))
    done = run_cli("--image", "vmrun-test-baked", "--boot", "fast", "--net", "none", "--",
                   "sh", "-c", "cloud-init schema -c run.yaml && cloud-init schema -c bake.yaml",
                   cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(b"Valid cloud-config") == 2
