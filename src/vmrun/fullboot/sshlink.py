"""The SSH connection to a fully booted guest: one login shared by every session (a control
master), over the forwarded TCP port or the run hook's virtio-serial stream."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from vmrun import ssh as sshlib
from vmrun.errors import ChannelLost, HostKeyMismatch, VmrunError
from vmrun.qemu import process

# Runs the event loop until the first callable holds (see FullMachine.pump): the deadline
# in seconds and its error, a handler for readable fds and the fds it adds.
Pump = Callable[[Callable[[], bool], float, VmrunError, Callable[[list[int]], None],
                 Callable[[], list[int]]], None]


class SshLink:
    """Who logs in where: the run's keys, the port or the serial proxy, the master."""

    def __init__(self, keys: sshlib.Keys, *, ssh: str, log: Path,
                 stack: contextlib.ExitStack) -> None:
        self.keys = keys
        self.ssh = ssh
        self.log = log
        self.stack = stack
        self.port = 0
        self.proxy: Path | None = None  # the socket ssh takes the serial stream from
        self.sockets: Path | None = None
        self.control: Path | None = None
        self.masters: list[subprocess.Popen[bytes]] = []
        self.failed = False

    def socket_dir(self) -> Path:
        """A private directory for the run's UNIX sockets, short enough for their names
        (about 108 bytes): the keys' own, else one under the temporary directory."""
        if self.sockets is None:
            self.sockets = self.keys.directory
            if len(os.fsencode(self.keys.directory / "control")) > 100:
                self.sockets = Path(tempfile.mkdtemp(prefix="vmrun-ssh-"))
                self.stack.callback(shutil.rmtree, self.sockets, ignore_errors=True)
        return self.sockets

    def use_serial(self) -> None:
        """Log in over the virtio-serial stream (the run hook's), through a proxy socket."""
        self.proxy = self.socket_dir() / "proxy"

    def argv(self, remote: Sequence[str], *, tty: bool = False) -> list[str]:
        return sshlib.ssh_argv(self.keys, self.port, remote, tty=tty, ssh=self.ssh,
                               control=self.control, proxy=self.proxy)

    def start_master(self, pump: Pump, deadline: float, timeout: VmrunError,
                     stream: socket.socket) -> None:
        """Log in once; later sessions share this connection (see ssh.ssh_options).
        STREAM is the serial stream handed to ssh's ProxyCommand when it asks."""
        control = self.socket_dir() / "control"
        listener = self._listen_for_proxy()
        argv = sshlib.ssh_argv(self.keys, self.port, ["sh", "-c", "echo ready; exec cat"],
                               ssh=self.ssh, control=control, master=True, proxy=self.proxy)
        with open(self.log, "ab") as log:
            master = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=log)
        self.masters.append(master)
        self.stack.callback(end_master, master)
        assert master.stdout is not None
        out = master.stdout.fileno()
        said = bytearray()

        def read(readable: list[int]) -> None:
            nonlocal listener
            if listener is not None and listener.fileno() in readable \
                    and _hand_over(listener, stream):
                listener = None
            if out in readable:
                data = os.read(out, 64)
                said.extend(data if data else b"<eof>")

        pump(lambda: b"ready\n" in said or b"<eof>" in said,
             max(1.0, deadline - time.monotonic()), timeout, read,
             lambda: [out] if listener is None else [out, listener.fileno()])
        if b"ready\n" not in said:
            master.wait()
            raise self.failure("logging in to the guest")
        self.control = control

    def end_masters(self) -> None:
        """Close the shared connection; later sessions connect (and check the key) anew,
        which only TCP allows (the serial stream serves one connection)."""
        self.control = None
        for master in list(self.masters):
            end_master(master)

    def _listen_for_proxy(self) -> socket.socket | None:
        """The socket ssh's ProxyCommand fetches the serial stream from (None: TCP)."""
        if self.proxy is None:
            return None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.stack.callback(listener.close)
        listener.bind(str(self.proxy))
        listener.listen(1)
        listener.setblocking(False)
        return listener

    def failure(self, what: str) -> VmrunError:
        """The error for a failed ssh doing WHAT, from ssh's log."""
        self.failed = True
        log = process.log_tail(self.log, 600)
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in log or "Host key verification failed" in log:
            return HostKeyMismatch(f"{what}: the server on the forwarded port did not show the "
                                   "guest's pinned host key (refused as an impostor)")
        last = log.strip().splitlines()[-1] if log.strip() else "no message"
        return ChannelLost(f"{what}: ssh failed: {last}")

    def failure_from(self, stderr_tail: bytes, what: str) -> VmrunError:
        with open(self.log, "ab") as log:
            log.write(stderr_tail)
        return self.failure(what)


def _hand_over(listener: socket.socket, stream: socket.socket) -> bool:
    """Give STREAM to the ProxyCommand that connected to LISTENER (ours: same user). True
    once handed over; the stream serves one connection, so this is once."""
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return False
    with conn:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            return False
        stream.setblocking(True)  # ssh expects a blocking descriptor
        socket.send_fds(conn, [b"x"], [stream.fileno()])
    stream.close()
    listener.close()
    return True


def end_master(master: subprocess.Popen[bytes]) -> None:
    if master.poll() is not None:
        return
    with contextlib.suppress(OSError):
        if master.stdin is not None:
            master.stdin.close()  # the remote `cat` sees EOF, and the session ends
    try:
        master.wait(timeout=5)
    except subprocess.TimeoutExpired:
        master.kill()
        master.wait()
    if master.stdout is not None:
        master.stdout.close()
