"""The host's side of the agent's ports: the command's output, input to the guest, status."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
import time

from vmrun.channel import ROOT_FAILURES, StatusReader, TokenScanner
from vmrun.errors import ChannelLost

PENDING_LIMIT = 256 << 10
# What run(capture=True) keeps of each of stdout and stderr; past it the rest is read and
# dropped (the exit status still arrives) and the Result says it was truncated.
CAPTURE_LIMIT = 64 << 20


class Output:
    """One guest output port: read, cut at the token, then captured or written to a host fd.

    Between commands nothing is forwarded; with a token, bytes up to it are; a port that
    is a terminal (tty=True commands) forwards everything while a command runs.
    """

    def __init__(self, sock: socket.socket, sink_fd: int | None) -> None:
        self.sock = sock
        self.sink_fd = sink_fd
        self.active = False
        self.scanner: TokenScanner | None = None
        self.capture: bytearray | None = None
        self.capture_limit = CAPTURE_LIMIT
        self.truncated = False
        self.received = 0  # bytes the guest sent while a command ran
        self.pending = bytearray()
        self.chunk = 4096
        if sink_fd is not None and stat.S_ISREG(os.fstat(sink_fd).st_mode):
            self.chunk = 1 << 20

    def begin(self, token: bytes | None, capture: bool, limit: int = CAPTURE_LIMIT) -> None:
        self.active = True
        self.scanner = None if token is None else TokenScanner(token)
        self.capture = bytearray() if capture else None
        self.capture_limit = limit
        self.truncated = False
        self.received = 0

    def end(self) -> None:
        self.active = False

    @property
    def done(self) -> bool:
        finished = not self.active or (self.scanner is not None and self.scanner.done)
        return finished and not self.pending

    def wants_read(self) -> bool:
        if not self.active or (self.scanner is not None and self.scanner.done):
            return True  # stray bytes between commands are read and dropped
        return len(self.pending) < PENDING_LIMIT

    def on_readable(self) -> bool:
        """Read what is there; False when the channel closed (QEMU is going away)."""
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return True
        if not data:
            return False
        if not self.active:
            return True
        self.received += len(data)
        if self.scanner is not None:
            data = self.scanner.feed(data)
        if self.capture is not None:
            room = self.capture_limit - len(self.capture)
            self.capture += data[:max(0, room)]
            self.truncated |= len(data) > room
        elif self.sink_fd is not None:
            self.pending += data
        return True

    def on_writable(self) -> None:
        assert self.sink_fd is not None
        try:
            written = os.write(self.sink_fd, self.pending[: self.chunk])
        except BrokenPipeError:
            written = len(self.pending)  # nobody reads: drop, the exit code still matters
        del self.pending[:written]


class Ports:
    """The agent's ports seen from the host while commands run: what goes to the guest
    (the request, stdin), what comes back (stdout, stderr, a terminal) and the status
    events (started, exit, a root that failed). Machine's event loop selects on them."""

    def __init__(self, socks: dict[str, socket.socket], stdout_fd: int | None,
                 stderr_fd: int | None, *, tty: bool) -> None:
        self.socks = socks
        self.outputs: dict[str, Output] = {
            "stdout": Output(socks["stdout"], stdout_fd),
            "stderr": Output(socks["stderr"], stderr_fd),
        }
        if tty:
            self.outputs["tty"] = Output(socks["tty"], stdout_fd)
        self.to_guest: dict[str, bytearray] = {}
        self.stdin_fd: int | None = None
        self.tty_mode = False
        self.status = StatusReader()
        self.events: list[str] = []

    # -- one command

    def begin(self, request: bytes, token: bytes, *, capture: bool, limit: int,
              tty: bool, stdin_fd: int | None) -> None:
        """Send REQUEST; forward (or capture) the output up to TOKEN; read STDIN_FD."""
        self.events.clear()
        self.to_guest["control"] = bytearray(request)
        for name in ("stdout", "stderr"):
            self.outputs[name].begin(token, capture, limit)
        self.tty_mode = tty
        if tty:
            self.outputs["tty"].begin(None, False)
        self.stdin_fd = stdin_fd

    def started(self) -> bool:
        return "started" in self.events or self.root_failure() is not None

    def exit_code(self) -> int | None:
        return next((int(e.split()[1]) for e in self.events if e.startswith("exit ")), None)

    def drained(self) -> bool:
        """All output up to the command's end has reached its sink."""
        tty = self.outputs.get("tty")
        return all(self.outputs[n].done for n in ("stdout", "stderr")) and not (
            tty is not None and tty.pending)

    def root_failure(self) -> str | None:
        """Why the agent could not mount the image's root, if it said so."""
        for event in self.events:
            if event.startswith("fail "):
                return ROOT_FAILURES[event.split()[1]]
        return None

    def end(self) -> None:
        for output in self.outputs.values():
            output.end()
        self.stdin_fd = None

    def sync(self, qemu_pidfd: int, timeout: float) -> bool:
        """Ask the agent to sync the guest's filesystems; whether it said it did within
        TIMEOUT (False too when QEMU exits or the channel breaks meanwhile)."""
        control = self.socks["control"]
        try:
            control.setblocking(True)
            control.settimeout(1)
            control.sendall(b"sync\n")
        except OSError:
            return False
        self.events.clear()
        deadline = time.monotonic() + timeout
        status = self.socks["status"].fileno()
        while "synced" not in self.events:
            left = deadline - time.monotonic()
            readable = select.select([status, qemu_pidfd], [], [], max(0.0, left))[0]
            if qemu_pidfd in readable or not readable:
                return False
            try:
                if not self.handle(readable, []):
                    return False
            except ChannelLost:
                return False
        return True

    def drain_tty(self) -> None:
        """A terminal has no end marker: forward what arrives until it has been quiet."""
        tty = self.outputs["tty"]
        while select.select([tty.sock], [], [], 0.05)[0]:
            if not tty.on_readable():
                break
            while tty.pending and tty.sink_fd is not None:
                tty.on_writable()
        tty.end()

    # -- the event loop's part

    def readers(self) -> list[int]:
        readers = [self.socks["status"].fileno()]
        for name, output in self.outputs.items():
            if name == "tty" and not self.tty_mode:
                continue
            if output.wants_read():
                readers.append(output.sock.fileno())
        if self.stdin_fd is not None and not self.to_guest.get(self._stdin_target()):
            readers.append(self.stdin_fd)
        return readers

    def writers(self) -> list[int]:
        writers = [output.sink_fd for output in self.outputs.values()
                   if output.pending and output.sink_fd is not None]
        writers += [self.socks[name].fileno() for name, pending in self.to_guest.items()
                    if pending]
        return writers

    def handle(self, readable: list[int], writable: list[int]) -> bool:
        """Move what select() said can move; False once a channel closed (QEMU is going)."""
        open_ = True
        if self.socks["status"].fileno() in readable:
            open_ &= self._read_status()
        for output in self.outputs.values():
            if output.sock.fileno() in readable:
                open_ &= output.on_readable()
            if output.sink_fd is not None and output.sink_fd in writable and output.pending:
                output.on_writable()
        for name, pending in self.to_guest.items():
            if pending and self.socks[name].fileno() in writable:
                try:
                    sent = self.socks[name].send(pending)
                except BlockingIOError:
                    sent = 0
                del pending[:sent]
        if self.stdin_fd is not None and self.stdin_fd in readable:
            self._read_host_stdin()
        return open_

    def _stdin_target(self) -> str:
        return "tty" if self.tty_mode else "stdin"

    def _read_host_stdin(self) -> None:
        assert self.stdin_fd is not None
        data = os.read(self.stdin_fd, 1 << 16)
        target = self._stdin_target()
        if data:
            self.to_guest.setdefault(target, bytearray()).extend(data)
            return
        self.stdin_fd = None
        if target == "stdin":
            # EOF: closing our end makes QEMU close the port, and the guest reads EOF.
            with contextlib.suppress(OSError):
                self.socks["stdin"].shutdown(socket.SHUT_WR)

    def _read_status(self) -> bool:
        try:
            data = self.socks["status"].recv(4096)
        except BlockingIOError:
            return True
        if not data:
            return False
        # Each message counts once: the protocol has a few hundred, so a flood of valid
        # lines grows nothing.
        for event in self.status.feed(data):
            if event not in self.events:
                self.events.append(event)
        return True
