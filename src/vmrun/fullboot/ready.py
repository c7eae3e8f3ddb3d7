"""The ready port: the lines a fully booted guest sends vmrun (which SSH server is up, a
bake's result), read without letting a flood grow anything."""

from __future__ import annotations

import socket

from vmrun.errors import ChannelLost
from vmrun.qemu.argv import EARLY_SSH_PORT, SSH_PORT

SERIAL = -1  # "port" of the run hook's SSH server, on the virtio-serial port
MAX_READY_LINE = 64 << 10  # a base64 cloud-init result.json fits; anything longer is refused
MAX_READY_LINES = 64  # distinct messages on the ready port; the guest sends two or three


class ReadyPort:
    """The distinct lines read from the guest's ready port so far."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.buffer = b""

    def read(self, sock: socket.socket) -> None:
        """Take what SOCK has; ChannelLost for too many or oversized messages."""
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            line = line.strip()
            if line in self.lines:
                continue  # the same message again grows nothing
            if len(self.lines) >= MAX_READY_LINES:
                raise ChannelLost("the guest sent too many messages on vmrun's ready port")
            self.lines.append(line)
        if len(self.buffer) > MAX_READY_LINE:
            raise ChannelLost("the guest sent an oversized message on vmrun's ready port")

    def ssh_announced(self, *, serial_ok: bool) -> int | None:
        """The guest port of the first SSH server the guest announced (SERIAL: the run
        hook's, on the virtio-serial port, taken only when SERIAL_OK), if one has."""
        for line in self.lines:
            words = line.split()
            if words[:1] == [b"ssh"]:
                port = words[1] if len(words) > 1 else b""
                if port == b"serial":
                    if serial_ok:
                        return SERIAL
                    continue
                return int(port) if port in (b"%d" % SSH_PORT, b"%d" % EARLY_SSH_PORT) \
                    else SSH_PORT
        return None
