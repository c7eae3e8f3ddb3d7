"""Docker-style run options on real VMs: each changes what the guest sees (volumes read,
written and refused when read-only, the working directory, the user, variables from an env
file, a guest port reached from the host's loopback and from nowhere else)."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests import ocitools as ot
from tests.integration.vmtools import run_cli, vmrun_argv, vmrun_env
from vmrun import Command, Machine, MachineSpec, Net, Share, User, Volume, share
from vmrun.guest.build import Guest

pytestmark = pytest.mark.vm

# Everything the options change, printed one per line by one command.
REPORT = ('id -u; id -g; pwd; cat /ro/given; echo "$FROM_FILE|$OVERRIDDEN|$PASSED"; '
          'echo written > /rw/made; '
          'if touch /ro/refused 2>/tmp/why; then echo ro-writable; else cat /tmp/why; fi; '
          'ls /rw/sub/..')


@pytest.mark.parametrize("cold", [False, True], ids=["warm", "cold"])
def test_volumes_workdir_user_env_file(guest: Guest, tmp_path: Path, cold: bool) -> None:
    work, rw, ro = tmp_path / "work", tmp_path / "rw", tmp_path / "ro"
    for directory in (work, rw, ro):
        directory.mkdir()
        directory.chmod(0o777)  # the command's user (1000) may write: only :ro refuses
    (ro / "given").write_text("from the host\n")
    env_file = tmp_path / "env"
    env_file.write_text("# docker's format\nFROM_FILE=file value\nOVERRIDDEN=file\nPASSED\n")
    args = ("-v", f"{rw}:/rw", "--volume", f"{ro}:/ro:ro", "-w", "/rw/sub", "-u", "1000:50",
            "--env-file", str(env_file), "-e", "OVERRIDDEN=cli", "--name", "dock-1",
            "--verbose", *(["--cold"] if cold else []), "--", "sh", "-c", REPORT)
    for run in range(1 if cold else 2):
        (rw / "made").unlink(missing_ok=True)
        done = run_cli(*args, cwd=work, env_extra={"PASSED": "from host env"}, timeout=300)
        stderr = done.stderr.decode()
        assert done.returncode == 0, stderr
        assert done.stdout.decode().splitlines() == [
            "1000", "50", "/rw/sub", "from the host", "file value|cli|from host env",
            "touch: /ro/refused: Read-only file system", "made", "sub"]
        assert (rw / "made").read_text() == "written\n"
        assert (rw / "sub").is_dir() and not (ro / "refused").exists()
        assert "vmrun: run dock-1: " in stderr and "/run-dock-1-" in stderr
        # Warm: the first run makes the template (unless one is there), the second restores.
        starts = ["cold"] if cold else (["make", "warm"] if run == 0 else ["warm"])
        assert any(f"start: {start} " in stderr for start in starts), stderr


def non_loopback_ipv4() -> str | None:
    """One of this host's IPv4 addresses outside 127.0.0.0/8, if it has one."""
    listed = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True,
                            text=True, check=False).stdout
    for line in listed.splitlines():
        words = line.split()
        address = words[words.index("inet") + 1].split("/")[0] if "inet" in words else ""
        if address and not ipaddress.IPv4Address(address).is_loopback:
            return address
    return None


def http_get(address: str, port: int) -> bytes:
    with socket.create_connection((address, port), timeout=30) as conn:
        conn.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    return data


def test_publish_reaches_the_guest_from_loopback_only(guest: Guest, tmp_path: Path) -> None:
    other = non_loopback_ipv4()
    port = ot.free_port()
    # -i: stdin is a pipe here anyway; the command ends when the test closes it.
    script = ("mkdir /tmp/www && echo served-by-the-guest > /tmp/www/index.html && "
              "httpd -p 8080 -h /tmp/www && echo listening && read line && echo stopped")
    vm = subprocess.Popen(vmrun_argv("-i", "-p", f"{port}:8080", "--share", "none", "--",
                                     "sh", "-c", script),
                          cwd=tmp_path, env=vmrun_env(), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert vm.stdout is not None and vm.stdin is not None
        assert vm.stdout.readline() == b"listening\n"
        reply = http_get("127.0.0.1", port)
        assert reply.startswith(b"HTTP/1.") and reply.endswith(b"served-by-the-guest\n")
        if other is not None:
            with pytest.raises(ConnectionRefusedError):
                http_get(other, port)
        vm.stdin.write(b"go\n")
        vm.stdin.close()
        assert vm.stdout.read() == b"stopped\n"
        assert vm.wait(timeout=60) == 0
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
    if other is None:
        pytest.skip("this host has no non-loopback IPv4 address: only loopback was checked")
    # The port is QEMU's alone, and gone with it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            http_get("127.0.0.1", port)
        except ConnectionRefusedError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"127.0.0.1:{port} still answers after the run")


@pytest.mark.skipif(ot.TAR2SQFS is None, reason="needs squashfs-tools-ng")
def test_oci_image_gets_volumes_and_user(guest: Guest, tmp_path: Path) -> None:
    passwd = "root:x:0:0:root:/root:/bin/sh\napp:x:1234:2345::/home/app:/bin/sh\n"
    image = ot.make_image([(
        [*ot.busybox_layer(), *(ot.symlink(f"bin/{applet}", "busybox")
                                for applet in ("id", "cat", "touch")),
         ot.directory("etc"), ot.file("etc/passwd", passwd)], "gzip")],
        config={"Env": ["PATH=/bin"]})
    layout = ot.write_layout(tmp_path / "layout", image, "v1")
    data = tmp_path / "data"
    data.mkdir()
    (data / "given").write_text("into the image\n")
    done = run_cli("--image", f"oci:{layout}:v1", "--share", "none", "-v", f"{data}:/mnt/d:ro",
                   "-u", "1234", "-w", "/mnt/d", "--", "sh", "-c",
                   'id -u; id -g; echo "$HOME"; pwd; cat given; touch x 2>&1; true',
                   cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines() == [
        "1234", "2345", "/home/app", "/mnt/d", "into the image",
        "touch: x: Read-only file system"]


def test_python_api_volumes_over_virtiofs(guest: Guest, tmp_path: Path) -> None:
    daemon = share.find_virtiofsd()
    if daemon is None or not share.daemon_runs_as(daemon, os.geteuid()):
        pytest.skip("no virtiofsd that runs as this user")
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    spec = MachineSpec(share=Share.NONE, net=Net.NONE, cold=True, name="api-1",
                       volumes=(Volume(rw, "/rw"), Volume(ro, "/ro", readonly=True)))
    with Machine(spec, share_via="virtiofs", notice=lambda message: None) as vm:
        assert vm.rundir is not None and vm.rundir.name.startswith("run-api-1-")
        done = vm.run(Command(("sh", "-c", "grep ' /r[ow] ' /proc/mounts | cut -d' ' -f1-3; "
                               "pwd; echo made > f; touch /ro/refused"), cwd="/rw"),
                      capture=True)
        assert done.exit_code == 1, done.stderr
        assert (done.stdout or b"").decode().splitlines() == [
            "vmrun1 /rw virtiofs", "vmrun2 /ro 9p", "/rw"]
        assert (rw / "f").read_text() == "made\n" and not (ro / "refused").exists()
        ids = vm.run(Command(("sh", "-c", "id -u; id -g"), user=User(4321)), capture=True)
        assert ids.stdout == b"4321\n0\n"
