"""A small QMP client over a connected socket (one end of a socketpair handed to QEMU)."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from vmrun.errors import QemuError, QmpError

MAX_LINE = 1 << 20  # QMP replies vmrun asks for are small; anything longer is refused


class Qmp:
    """Reads QMP messages as they come; events are kept for the caller to inspect."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.events: list[dict[str, Any]] = []
        self.replies: list[dict[str, Any]] = []
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, command: str, arguments: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as exc:
            raise QemuError(f"QMP connection lost: {exc}") from exc

    def read_available(self) -> None:
        """Read what the socket has now (call when it is readable) and parse whole lines."""
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, TimeoutError):
            return
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self._dispatch(line)
        if len(self.buffer) > MAX_LINE:
            raise QmpError("QMP message too long")

    def _dispatch(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise QmpError(f"malformed QMP message: {line[:80]!r}") from exc
        if not isinstance(message, dict):
            raise QmpError("malformed QMP message")
        if "event" in message:
            self.events.append(message)
        elif "return" in message or "error" in message:
            self.replies.append(message)

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = 5.0) -> Any:
        """Send COMMAND and wait for its reply (blocking, with a deadline)."""
        self.replies.clear()
        self.send(command, arguments)
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        try:
            while not self.replies:
                if self.closed:
                    raise QemuError(f"QEMU closed its monitor during {command}")
                if time.monotonic() > deadline:
                    raise QmpError(f"no reply to QMP {command} within {timeout:.0f}s")
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                self.read_available()
        finally:
            self.sock.setblocking(False)
        reply = self.replies.pop(0)
        if "error" in reply:
            error = reply["error"]
            raise QmpError(f"QMP {command}: {error.get('desc', error)}")
        return reply["return"]
