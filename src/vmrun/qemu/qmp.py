"""A small QMP client over a connected socket (one end of a socketpair handed to QEMU).

Every command carries an id of its own and a reply is matched to its command by that id,
so a reply that arrives after its command timed out is dropped, never taken as the answer
to a later command.
"""

from __future__ import annotations

import itertools
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
        self.replies: dict[str, dict[str, Any]] = {}  # by id, only for awaited commands
        self.awaited: set[str] = set()
        self.ids = itertools.count(1)
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, command: str, arguments: dict[str, Any] | None = None,
             fds: tuple[int, ...] = ()) -> str:
        """Send COMMAND without waiting; its id (the reply, when it comes, is dropped).
        FDS go along by SCM_RIGHTS (for getfd)."""
        ident = f"vmrun-{next(self.ids)}"
        message: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            message["arguments"] = arguments
        data = json.dumps(message).encode() + b"\n"
        try:
            if fds:
                sent = socket.send_fds(self.sock, [data], list(fds))
                data = data[sent:]
            self.sock.sendall(data)
        except OSError as exc:
            raise QemuError(f"QMP connection lost: {exc}") from exc
        return ident

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
            ident = message.get("id")
            # A reply nobody waits for (its command timed out, or was only sent) is dropped.
            if isinstance(ident, str) and ident in self.awaited:
                self.replies[ident] = message

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float = 5.0, fds: tuple[int, ...] = ()) -> Any:
        """Send COMMAND and wait for its reply (blocking, with a deadline)."""
        ident = self.send(command, arguments, fds)
        self.awaited.add(ident)
        deadline = time.monotonic() + timeout
        try:
            while ident not in self.replies:
                if self.closed:
                    raise QemuError(f"QEMU closed its monitor during {command}")
                if time.monotonic() > deadline:
                    raise QmpError(f"no reply to QMP {command} within {timeout:.0f}s")
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                self.read_available()
        finally:
            self.awaited.discard(ident)
            self.sock.setblocking(False)
        reply = self.replies.pop(ident)
        if "error" in reply:
            error = reply["error"]
            raise QmpError(f"QMP {command}: {error.get('desc', error)}")
        return reply["return"]
