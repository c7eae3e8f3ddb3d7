"""One command in a fully booted guest over SSH: its streams passed through or captured, and
its exact exit status, sent after a token on stderr so that ssh's own 255 is never taken
for the command's."""

from __future__ import annotations

import os
import subprocess

from vmrun.channel import TokenScanner
from vmrun.spec import Command

# Run in the guest by the login shell: cd, run, then the exit status after a token on
# stderr, so an exit status of 255 is never mistaken for ssh's own failure.
REMOTE_WRAPPER = (
    't=$1; d=$2; shift 2; '
    'if [ -n "$d" ]; then cd -- "$d" || { printf "%s%d\\n" "$t" 126 >&2; exit 126; }; fi; '
    '"$@"; rc=$?; printf "%s%d\\n" "$t" "$rc" >&2; exit "$rc"'
)


class RemoteRun:
    """The ssh process running one command, and what came back from it so far."""

    def __init__(self, proc: subprocess.Popen[bytes], command: Command, token: bytes, *,
                 capture: bool, capture_limit: int, stdout_fd: int | None,
                 stderr_fd: int | None) -> None:
        self.proc = proc
        self.capture = capture
        self.capture_limit = capture_limit
        self.sinks = {"stdout": stdout_fd, "stderr": stderr_fd}
        self.trailer = ExitTrailer(token)
        self.captured = {"stdout": bytearray(), "stderr": bytearray()}
        self.truncated = False
        self.pending_input = bytearray(command.input or b"")
        self.streams = {proc.stderr.fileno(): "stderr"} if proc.stderr else {}
        if proc.stdout is not None:
            self.streams[proc.stdout.fileno()] = "stdout"
        if proc.stdin is not None:
            if self.pending_input:
                os.set_blocking(proc.stdin.fileno(), False)
            else:
                proc.stdin.close()

    def readers(self) -> list[int]:
        return list(self.streams)

    def finished(self) -> bool:
        return not self.streams and self.proc.poll() is not None

    def handle(self, readable: list[int]) -> None:
        """Move what READABLE streams hold to their sinks (or the capture), and feed input."""
        for fd, name in list(self.streams.items()):
            if fd not in readable:
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                del self.streams[fd]
                continue
            if name == "stderr":
                data = self.trailer.feed(data)
            if self.capture:
                room = self.capture_limit - len(self.captured[name])
                self.captured[name] += data[:max(0, room)]
                self.truncated |= len(data) > room
            elif (sink := self.sinks[name]) is not None:
                write_all(sink, data)
        self._feed_input()

    def _feed_input(self) -> None:
        stdin = self.proc.stdin
        if stdin is None or stdin.closed or not self.pending_input:
            return
        try:
            sent = os.write(stdin.fileno(), self.pending_input)
            del self.pending_input[:sent]
        except BlockingIOError:
            pass
        except BrokenPipeError:
            self.pending_input.clear()
        if not self.pending_input:
            stdin.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


class ExitTrailer:
    """Passes ssh's stderr through; the exit status follows the token, on its line."""

    def __init__(self, token: bytes) -> None:
        self.scanner = TokenScanner(token)
        self.status: int | None = None
        self.trailer = b""
        self.rest = bytearray()  # the end of what came without a token: ssh's complaints

    def feed(self, data: bytes) -> bytes:
        if self.scanner.done:
            self._take_status(data)
            return b""
        out = self.scanner.feed(data)
        if self.scanner.done:
            self._take_status(self.scanner.after)
        else:
            self.rest += out
            del self.rest[:-4096]
        return out

    def _take_status(self, data: bytes) -> None:
        if self.status is not None:
            return
        self.trailer = (self.trailer + data)[:16]
        line, newline, _ = self.trailer.partition(b"\n")
        if newline:
            digits = line.strip()
            ok = digits.isdigit() and len(digits) <= 3 and int(digits) <= 255
            self.status = int(digits) if ok else 255


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BrokenPipeError:
            return
        view = view[written:]
