"""SSH to a fully booted guest: per-run keys, a host key made on the host and pinned.

Each run makes two fresh ed25519 keys in a 0700 directory: the client's, whose public half
the seed authorizes for vmrun's login user, and the guest's host key, which the seed
installs (cloud-init's `ssh_keys`) and `known_hosts` pins. ssh then refuses any other
server on the forwarded port, never asks, never falls back to a password and reads no
user configuration.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmrun.errors import UsageError

HOST_ALIAS = "vmrun-guest"
LOGIN_USER = "vmrun"
# ssh's own failures (connection refused, host key mismatch) exit with 255.
SSH_FAILED = 255


@dataclass(frozen=True)
class Keys:
    directory: Path
    client_key: Path  # private, 0600
    client_public: str  # "ssh-ed25519 AAAA... vmrun"
    host_private: str  # the guest's host key, OpenSSH PEM, for the seed
    host_public: str
    known_hosts: Path


def find_ssh() -> str:
    found = shutil.which("ssh")
    if found is None:
        raise UsageError("ssh is missing (needed for --boot full)",
                         hint="apt-get install openssh-client")
    return found


def _keygen(path: Path, comment: str) -> None:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        raise UsageError("ssh-keygen is missing (needed for --boot full)",
                         hint="apt-get install openssh-client")
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    os.chmod(path, 0o600)


def make_keys(directory: Path) -> Keys:
    """Fresh client and host keys in DIRECTORY (made 0700), and a known_hosts pinning the
    host key under HOST_ALIAS."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    client = directory / "id_ed25519"
    host = directory / "ssh_host_ed25519_key"
    _keygen(client, "vmrun")
    _keygen(host, "vmrun-guest")
    host_public = (directory / "ssh_host_ed25519_key.pub").read_text().strip()
    known_hosts = directory / "known_hosts"
    kind, blob = host_public.split()[:2]
    known_hosts.write_text(f"{HOST_ALIAS} {kind} {blob}\n")
    os.chmod(known_hosts, 0o600)
    return Keys(
        directory=directory, client_key=client,
        client_public=(directory / "id_ed25519.pub").read_text().strip(),
        host_private=host.read_text(), host_public=host_public, known_hosts=known_hosts,
    )


# A ProxyCommand that connects to vmrun's socket $1, receives the guest's stream from it
# and hands that to ssh (ProxyUseFdpass): no relay stays between them.
FD_PASS = ("import socket,sys;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
           "_,f,_,_=socket.recv_fds(s,1,1);socket.send_fds(socket.socket(fileno=1),[b'x'],f)")


def proxy_options(listener: Path) -> list[str]:
    """ssh options that take the connection from the socket LISTENER (see FullMachine)."""
    command = shlex.join([sys.executable, "-S", "-c", FD_PASS, str(listener)])  # ssh adds exec
    return ["-o", "ProxyCommand=" + command.replace("%", "%%"), "-o", "ProxyUseFdpass=yes"]


def ssh_options(keys: Keys, port: int, *, control: Path | None = None,
                master: bool = False, proxy: Path | None = None) -> list[str]:
    """Options that make ssh talk to this run's guest and nothing else: on 127.0.0.1:PORT,
    or with PROXY over the stream that socket hands out (a virtio-serial port).

    With CONTROL, sessions share one connection through that socket (MASTER makes it):
    one key exchange and login per run instead of one per step.
    """
    shared = [] if control is None else [
        "-o", f"ControlMaster={'yes' if master else 'no'}", "-o", f"ControlPath={control}"]
    route = ["-p", str(port)] if proxy is None else proxy_options(proxy)
    return [*shared,
        "-F", "/dev/null",  # no user or system configuration changes what follows
        *route,
        "-i", str(keys.client_key),
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", f"UserKnownHostsFile={keys.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", f"HostKeyAlias={HOST_ALIAS}",
        "-o", "HostKeyAlgorithms=ssh-ed25519",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "UpdateHostKeys=no",
        "-o", "CheckHostIP=no",
        "-o", "BatchMode=yes",
        "-o", "PasswordAuthentication=no",
        "-o", "KbdInteractiveAuthentication=no",
        "-o", "PubkeyAuthentication=yes",
        "-o", "ConnectTimeout=20",
        "-o", "ServerAliveInterval=15",
        "-o", "ServerAliveCountMax=4",
        "-o", "LogLevel=ERROR",
    ]


def ssh_argv(keys: Keys, port: int, remote: Sequence[str], *, tty: bool = False,
             ssh: str = "ssh", user: str = LOGIN_USER, control: Path | None = None,
             master: bool = False, proxy: Path | None = None) -> list[str]:
    """argv for running REMOTE (an argv) in the guest as USER.

    ssh hands the remote side one string for the login shell to parse, so REMOTE is
    quoted word by word with POSIX rules; the login shell is /bin/sh.
    """
    return [ssh, *ssh_options(keys, port, control=control, master=master, proxy=proxy),
            "-tt" if tty else "-T",
            f"{user}@127.0.0.1", "--", shlex.join(remote)]
