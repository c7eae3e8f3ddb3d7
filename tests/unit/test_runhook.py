"""The run hook a bake installs (guest/run_hook.sh), run by real shells in a fake root."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from vmrun import bake as bakelib
from vmrun import runhook
from vmrun import ssh as sshlib
from vmrun.qemu.argv import READY_PORT, SERIAL_SSH_PORT

SHELLS = [shell for shell in ("dash", "bash", "busybox") if shutil.which(shell)]
STUBS = {
    "modprobe": "exit 0\n",
    # Records its arguments and adds the user, as useradd would.
    "useradd": 'echo "$*" >> "$VMRUN_HOOK_ROOT/useradd.log"\n'
               'for last; do :; done\n'
               'echo "$last:x:1000:1000::/home/$last:/bin/sh" >> "$VMRUN_HOOK_ROOT/etc/passwd"\n',
}
# `sshd -t` checks the configuration (SSHD_TEST_STATUS says how that went); `sshd -i`
# records its arguments and the stream it was given.
SSHD = ('if [ "$1" = -t ]; then shift; printf "%s\\n" "$@" > "$VMRUN_HOOK_ROOT/sshd-t.args"; '
        'exit "${SSHD_TEST_STATUS:-0}"; fi\n'
        'printf "%s\\n" "$@" > "$VMRUN_HOOK_ROOT/sshd.args"\n'
        'cat > "$VMRUN_HOOK_ROOT/sshd.stdin"\n')


def fake_root(tmp_path: Path, port_data: bytes, *, users: str = "root:x:0:0::/root:/bin/sh\n",
              ssh_port: bool = True, console: bool = True) -> Path:
    root = tmp_path / "root"
    ports = {"vport1p1": READY_PORT}
    if ssh_port:
        ports["vport1p2"] = SERIAL_SSH_PORT
    if console:
        (root / "sys/bus/virtio/devices/virtio1").mkdir(parents=True)
        (root / "sys/bus/virtio/devices/virtio1/device").write_text("0x0003\n")
    (root / "sys/bus/virtio/devices/virtio0").mkdir(parents=True)
    (root / "sys/bus/virtio/devices/virtio0/device").write_text("0x0002\n")  # a disk
    for dev, name in ports.items():
        (root / "sys/class/virtio-ports" / dev).mkdir(parents=True)
        (root / "sys/class/virtio-ports" / dev / "name").write_text(name + "\n")
    (root / "dev").mkdir()
    (root / "dev/vport1p1").write_bytes(b"")
    if ssh_port:
        (root / "dev/vport1p2").write_bytes(port_data)
    (root / "etc/sudoers.d").mkdir(parents=True)
    (root / "etc/passwd").write_text(users)
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n")
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/hostname").write_text("vmrun-host\n")
    (root / "run").mkdir()
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/sshd").write_text("#!/bin/sh\n" + SSHD)
    (root / "usr/sbin/sshd").chmod(0o755)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, body in STUBS.items():
        (stubs / name).write_text("#!/bin/sh\n" + body)
        (stubs / name).chmod(0o755)
    return root


def run_hook(shell: str, root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    script = Path(runhook.__file__).with_name("guest") / "run_hook.sh"
    argv = [shell, "sh", str(script)] if shell == "busybox" else [shell, str(script)]
    env |= {"PATH": f"{root.parent / 'stubs'}:/usr/bin:/bin", "VMRUN_HOOK_ROOT": str(root)}
    return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=30)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> sshlib.Keys:
    return sshlib.make_keys(tmp_path_factory.mktemp("keys") / "ssh")


@pytest.mark.parametrize("shell", SHELLS)
def test_hook_reads_the_header_then_leaves_the_stream_to_sshd(
        shell: str, tmp_path: Path, keys: sshlib.Keys) -> None:
    client_bytes = b"SSH-2.0-OpenSSH_9.2\r\n\x00\x01binary\nrest"
    root = fake_root(tmp_path, runhook.run_header(keys) + client_bytes)
    done = run_hook(shell, root)
    assert done.returncode == 0, done.stderr
    # Not one byte of the client's too many or too few: sshd gets the stream as sent.
    assert (root / "sshd.stdin").read_bytes() == client_bytes
    assert (root / "dev/vport1p1").read_text() == "ssh serial\n"
    state = root / "run/vmrun"
    host_key = state / "ssh_host_ed25519_key"
    assert host_key.read_text() == keys.host_private
    assert stat.S_IMODE(host_key.stat().st_mode) == 0o600
    assert (state / "authorized_keys").read_text() == keys.client_public + "\n"
    args = (root / "sshd.args").read_text().splitlines()
    assert args[:4] == ["-i", "-e", "-h", str(host_key)]
    assert (root / "sshd-t.args").read_text().splitlines() == args[1:]  # checked first
    assert f"AuthorizedKeysFile={state}/authorized_keys" in args
    assert {"UsePAM=no", "AllowUsers=vmrun", "PasswordAuthentication=no"} <= set(args)
    assert (root / "useradd.log").read_text().split()[-1] == "vmrun"
    assert "--password *" in (root / "useradd.log").read_text()
    sudoers = root / "etc/sudoers.d/90-vmrun-run"
    assert sudoers.read_text() == "vmrun ALL=(ALL) NOPASSWD:ALL\n"
    assert stat.S_IMODE(sudoers.stat().st_mode) == 0o440
    assert stat.S_IMODE((root / "run/sshd").stat().st_mode) == 0o755
    hosts = (root / "etc/hosts").read_text()
    assert hosts == "127.0.0.1\tlocalhost\n127.0.1.1\tvmrun-host\n"
    assert run_hook(shell, root).returncode == 0  # the name is there: not added twice
    assert (root / "etc/hosts").read_text() == hosts


def test_hook_announces_nothing_when_sshd_refuses_the_configuration(
        tmp_path: Path, keys: sshlib.Keys) -> None:
    """The login then takes the usual path (TCP), which a run waits for next."""
    root = fake_root(tmp_path, runhook.run_header(keys))
    assert run_hook(SHELLS[0], root, SSHD_TEST_STATUS="255").returncode == 1
    assert (root / "dev/vport1p1").read_text() == ""
    assert not (root / "sshd.args").exists()


def test_hook_keeps_an_existing_user(tmp_path: Path, keys: sshlib.Keys) -> None:
    root = fake_root(tmp_path, runhook.run_header(keys),
                     users="root:x:0:0::/root:/bin/sh\nvmrun:x:1000:1000::/home/vmrun:/bin/sh\n")
    assert run_hook(SHELLS[0], root).returncode == 0
    assert not (root / "useradd.log").exists()
    assert (root / "sshd.args").exists()


@pytest.mark.parametrize("header, code", [
    (b"", 0),  # a bake: the port brings nothing, the hook leaves the boot alone
    (b"something else\n", 0),
    (b"vmrun-run 2\nend\n", 0),  # a newer vmrun's header: not understood, nothing done
    (b"vmrun-run 1\nuser root;reboot\nkey k\nhostkey aGk=\nend\n", 1),
    (b"vmrun-run 1\nuser -o\nkey k\nhostkey aGk=\nend\n", 1),
    (b"vmrun-run 1\nuser vmrun\nhostkey aGk=\nend\n", 1),
    (b"vmrun-run 1\nuser vmrun\nkey k\nhostkey aGk=\nshell x\nend\n", 1),
])
def test_hook_refuses_what_is_not_a_whole_header(tmp_path: Path, header: bytes,
                                                 code: int) -> None:
    root = fake_root(tmp_path, header)
    done = run_hook(SHELLS[0], root)
    assert done.returncode == code, done.stderr
    assert not (root / "sshd.args").exists()
    assert not (root / "useradd.log").exists()
    assert (root / "dev/vport1p1").read_text() == ""


def test_hook_without_the_port_does_nothing(tmp_path: Path) -> None:
    """Virtio-serial ports, but not vmrun's: the hook gives up after 5 s."""
    root = fake_root(tmp_path, b"", ssh_port=False)
    done = run_hook(SHELLS[0], root)
    assert done.returncode == 0
    assert not (root / "run/vmrun").exists()


def test_hook_without_a_virtio_console_ends_at_once(tmp_path: Path) -> None:
    """The image booted outside vmrun (plain QEMU, a cloud): no waiting at all."""
    root = fake_root(tmp_path, b"", ssh_port=False, console=False)
    started = time.monotonic()
    assert run_hook(SHELLS[0], root).returncode == 0
    assert time.monotonic() - started < 2
    assert not (root / "run/vmrun").exists()


def test_generator_writes_the_unit_and_its_want(tmp_path: Path) -> None:
    generator = tmp_path / "vmrun-run"
    generator.write_text(runhook.GENERATOR)
    out = tmp_path / "generator"
    out.mkdir()
    subprocess.run(["sh", str(generator), str(out), str(out), str(out)], check=True)
    unit = (out / runhook.UNIT_NAME).read_text()
    assert f"ExecStart={runhook.HOOK_PATH}" in unit
    assert "DefaultDependencies=no" in unit
    after = next(line for line in unit.splitlines() if line.startswith("After="))
    # Not before /tmp is emptied (Debian does at boot): a copy-in may go there.
    assert {"local-fs.target", "systemd-tmpfiles-setup.service"} <= set(after[6:].split())
    want = out / "sysinit.target.wants" / runhook.UNIT_NAME
    assert os.readlink(want) == f"../{runhook.UNIT_NAME}"
    assert want.resolve() == (out / runhook.UNIT_NAME).resolve()


def test_bake_installs_the_hook_beside_the_users_files() -> None:
    ours = yaml.safe_load(bakelib.bake_user_data(
        b"#cloud-config\nwrite_files:\n- path: /etc/mine\n  content: hi\n"))
    paths = [entry["path"] for entry in ours["write_files"]]
    assert paths == ["/etc/mine", runhook.GENERATOR_PATH, runhook.HOOK_PATH]
    hook = ours["write_files"][2]
    assert hook["permissions"] == "0755" and hook["content"] == runhook.hook_script()
    assert "runcmd" not in ours  # nothing whose status could hide or replace the user's


def test_header_is_one_field_per_line(keys: sshlib.Keys) -> None:
    lines = runhook.run_header(keys).decode().splitlines()
    assert lines[0] == runhook.HEADER_MAGIC and lines[-1] == "end"
    assert lines[1] == f"user {sshlib.LOGIN_USER}"
    assert lines[2] == f"key {keys.client_public}"
    assert "\n" not in keys.client_public and len(lines) == 5


def test_proxy_options_pass_the_stream_without_a_relay(tmp_path: Path) -> None:
    options = sshlib.proxy_options(tmp_path / "100%" / "proxy")
    command = options[1].removeprefix("ProxyCommand=")
    assert not command.startswith("exec ")  # ssh runs it as "exec COMMAND" itself
    assert "%%" in command and "100%/" not in command
    assert options[2:] == ["-o", "ProxyUseFdpass=yes"]


def test_proxy_command_hands_over_the_stream(tmp_path: Path) -> None:
    """The ProxyCommand, run by a shell as ssh runs it: it fetches the stream from the
    listener and passes it on its stdout; what is written there reaches the other end."""
    import socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "proxy"))
    listener.listen(1)
    guest, stream = socket.socketpair()
    ssh_side, proxy_stdout = socket.socketpair()
    command = sshlib.proxy_options(tmp_path / "proxy")[1].removeprefix("ProxyCommand=")
    proc = subprocess.Popen(["/bin/sh", "-c", "exec " + command], stdout=proxy_stdout.fileno())
    proxy_stdout.close()
    conn, _ = listener.accept()
    socket.send_fds(conn, [b"x"], [stream.fileno()])
    conn.close()
    _, fds, _, _ = socket.recv_fds(ssh_side, 1, 1)
    assert proc.wait(timeout=10) == 0
    with socket.socket(fileno=fds[0]) as received:
        received.sendall(b"hello guest")
        assert guest.recv(64) == b"hello guest"
    for sock in (listener, guest, stream, ssh_side):
        sock.close()


def test_a_new_hook_bakes_again(monkeypatch: pytest.MonkeyPatch) -> None:
    key = bakelib.bake_key("a" * 64, b"ud", None, "x86_64")
    monkeypatch.setattr(runhook, "hook_script", lambda: "#!/bin/sh\nexit 0\n")
    assert bakelib.bake_key("a" * 64, b"ud", None, "x86_64") != key
