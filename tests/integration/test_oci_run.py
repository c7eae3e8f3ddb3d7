"""OCI images run for real: pulled from a real registry (or an OCI layout), booted as the
root of vmrun's guest on x86_64 and aarch64, with the image config applied like docker run."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import ocitools as ot
from tests.integration.vmtools import run_cli
from vmrun.guest.build import ensure_guest
from vmrun.guest.cpio import read_newc
from vmrun.machine import Machine
from vmrun.qemu.arch import host_arch, lookup_arch
from vmrun.spec import Command, MachineSpec, Net, Share

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(ot.REGISTRY is None or ot.TAR2SQFS is None,
                       reason="needs docker-registry and squashfs-tools-ng"),
]
APPLETS = ("cat", "echo", "id", "ls", "pwd", "uname", "rm", "touch", "test", "env", "mkdir")
FOREIGN = "aarch64"
ENTRY = b"""#!/bin/sh
if [ "$1" = default ]; then echo "default cmd ran as $(id -u)"; exit 7; fi
exec "$@"
"""


def app_image(busybox: bytes, architecture: str) -> ot.Image:
    """One image whose config sets Env, Entrypoint, Cmd, WorkingDir and User (name:group),
    over three layers with a whiteout and an opaque directory."""
    base = [ot.directory("bin"), ot.file("bin/busybox", busybox, 0o755),
            ot.symlink("bin/sh", "busybox"), *(ot.symlink(f"bin/{a}", "busybox") for a in APPLETS),
            ot.file("bin/entry", ENTRY, 0o755), ot.directory("tmp", 0o1777),
            ot.directory("etc"),
            ot.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"
                    "app:x:1234:2345:App:/home/app:/bin/sh\n"),
            ot.file("etc/group", "root:x:0:\napp:x:2345:\nother:x:3456:\n"),
            ot.file("etc/os-release", f"ID=vmrun-oci-test\nARCH={architecture}\n"),
            ot.directory("home"), ot.directory("home/app", uid=1234, gid=2345),
            ot.directory("srv"), ot.directory("srv/work", uid=1234, gid=2345)]
    doomed = [ot.directory("etc"), ot.file("etc/doomed", "x"), ot.directory("opq"),
              ot.file("opq/old", "old")]
    hiding = [ot.whiteout("etc/doomed"), ot.directory("opq"), ot.opaque("opq"),
              ot.file("opq/new", "new")]
    return ot.make_image([(base, "gzip"), (doomed, "zstd"), (hiding, "gzip")],
                         architecture=architecture, config={
                             "Env": ["PATH=/bin", "GREETING=from-image", "OVERRIDE=image"],
                             "Entrypoint": ["/bin/entry"], "Cmd": ["default"],
                             "WorkingDir": "/srv/work", "User": "app:other"})


@dataclass(frozen=True)
class Published:
    reference: str  # docker://127.0.0.1:PORT/test/app:v1, amd64 and arm64
    layout: Path  # the same index as an OCI layout, tag "v1"


@pytest.fixture(scope="session")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    """One multi-arch tag in a real registry, for the whole session."""
    if host_arch() != "x86_64":
        pytest.skip("the image's amd64 side uses this host's busybox")
    foreign = ensure_guest(lookup_arch(FOREIGN))
    foreign_busybox = read_newc(foreign.initrd.read_bytes())["bin/busybox"]
    index = ot.make_index({"amd64": app_image(ot.BUSYBOX.read_bytes(), "amd64"),
                           "arm64/v8": app_image(foreign_busybox, "arm64")})
    top = tmp_path_factory.mktemp("oci")
    layout = ot.write_layout(top / "layout", index, "v1")
    with ot.registry(top / "registry") as running:
        ot.push(running.base, "test/app", "v1", index)
        yield Published(f"docker://{running.host}/test/app:v1", layout)


def test_image_config_applies_like_docker_run(published: Published) -> None:
    spec = MachineSpec(image=published.reference, share=Share.NONE, net=Net.NONE)
    with Machine(spec, notice=lambda message: None) as vm:
        default = vm.run(Command(()), capture=True)
        assert (default.exit_code, default.stdout) == (7, b"default cmd ran as 1234\n")
        shown = vm.run(Command(("sh", "-c", 'id -u; id -g; pwd; echo "$GREETING $OVERRIDE $HOME"'
                                ), env=(("OVERRIDE", "from-cli"),)), capture=True)
        assert shown.stdout == b"1234\n3456\n/srv/work\nfrom-image from-cli /home/app\n"
        layers = vm.run(Command(("sh", "-c", "ls /etc; ls /opq; cat /etc/os-release")),
                        capture=True)
        assert (layers.stdout or b"").split() == [b"group", b"os-release", b"passwd", b"new",
                                         b"ID=vmrun-oci-test", b"ARCH=amd64"]
        wrote = vm.run(Command(("sh", "-c", "echo kept > /tmp/written && touch /srv/work/x && "
                                "cat /tmp/written && uname -m")), capture=True)
        assert (wrote.exit_code, wrote.stdout) == (0, b"kept\nx86_64\n")
        api = vm.run(Command(("sh", "-c", "test -e /proc/self && test -c /dev/null && "
                              "test -d /dev/pts && test -d /dev/shm && test -d /sys/kernel && "
                              "cat /proc/sys/kernel/hostname")), capture=True)
        assert (api.exit_code, api.stdout) == (0, b"vmrun\n")


def test_layout_run_from_the_cli_starts_fresh_in_the_share(published: Published,
                                                            tmp_path: Path) -> None:
    (tmp_path / "hostfile").write_text("from the host\n")
    tmp_path.chmod(0o755)  # the image's user (1234) is not the owner, as with docker -v
    result = run_cli("--image", f"oci:{published.layout}:v1", "--entrypoint", "",
                     "-e", "OVERRIDE=cli", "--",
                     "sh", "-c", 'pwd; cat hostfile; echo "$OVERRIDE"; cat /etc/resolv.conf; '
                     'test -e /tmp/written || echo no-earlier-writes; exit 3', cwd=tmp_path,
                     timeout=300)
    assert result.returncode == 3, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert lines[:3] == [str(tmp_path), "from the host", "cli"]
    assert "nameserver 10.0.2.3" in lines and lines[-1] == "no-earlier-writes"


def test_no_command_and_no_default_fails_before_boot(tmp_path: Path) -> None:
    image = ot.make_image([(ot.busybox_layer(), "gzip")], config={"Env": ["PATH=/bin"]})
    layout = ot.write_layout(tmp_path / "layout", image, "bare")
    result = run_cli("--image", f"oci:{layout}:bare", "--share", "none", cwd=tmp_path,
                     env_extra={"VMRUN_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 125
    assert b"no command given, and the image has no default command" in result.stderr
    assert not (tmp_path / "cache" / "runs").exists() or not any(
        (tmp_path / "cache" / "runs").iterdir())  # nothing booted


def test_an_image_without_a_shell_runs_its_static_binary(tmp_path: Path) -> None:
    """Distroless: the image's only file is a static binary (busybox, with two links to it),
    no /bin/sh; the agent finds bare names on PATH itself and evaluates nothing."""
    image = ot.make_image([([
        ot.directory("app"), ot.file("app/busybox", ot.BUSYBOX.read_bytes(), 0o755),
        ot.directory("usr"), ot.directory("usr/bin"),
        ot.symlink("usr/bin/echo", "/app/busybox"),  # absolute: resolved inside the root
        ot.symlink("usr/bin/false", "../../app/busybox")], "gzip")],
        config={"Cmd": ["/app/busybox", "echo", "hello from a static binary"],
                "WorkingDir": "/app", "User": "65532"})  # no PATH: docker's default applies
    layout = ot.write_layout(tmp_path / "layout", image, "static")
    spec = MachineSpec(image=f"oci:{layout}:static", share=Share.NONE, net=Net.NONE)
    with Machine(spec, notice=lambda message: None) as vm:
        def run(*argv: str, env: tuple[tuple[str, str], ...] = ()) -> tuple[int, bytes, bytes]:
            result = vm.run(Command(argv, env=env), capture=True)
            return result.exit_code, result.stdout or b"", result.stderr or b""

        assert run() == (0, b"hello from a static binary\n", b"")
        assert run("echo", "$(id)", "`id`;") == (0, b"$(id) `id`;\n", b"")
        assert run("false")[0] == 1
        assert run("./busybox", "id", "-u") == (0, b"65532\n", b"")
        assert run("nothere") == (127, b"", b"nothere: not found\n")
        assert run("echo", "hidden", env=(("PATH", "/app:/bin"),)) == (
            127, b"", b"echo: not found\n")


@pytest.mark.skipif(shutil.which(lookup_arch(FOREIGN).qemu_binary) is None,
                    reason=f"needs {lookup_arch(FOREIGN).qemu_binary}")
def test_foreign_architecture_from_the_same_tag(published: Published) -> None:
    spec = MachineSpec(arch=FOREIGN, image=published.reference, share=Share.NONE,
                       net=Net.NONE)
    with Machine(spec, notice=lambda message: None) as vm:
        result = vm.run(Command(("sh", "-c", "uname -m; cat /etc/os-release; id -u")),
                        capture=True)
    assert result.stdout == b"aarch64\nID=vmrun-oci-test\nARCH=arm64\n1234\n"
