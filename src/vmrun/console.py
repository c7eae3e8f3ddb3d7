"""What both kinds of machine share: the serial console (a capped log, a tail for error
messages), the QMP events that end a run (a guest panic, a host disk that is full), and
their lifecycle (start, phases, the sockets QEMU inherits, the stack that undoes it all)."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from vmrun.errors import ChannelLost, GuestPanic, ImageError, VmrunError
from vmrun.qemu import process
from vmrun.qemu.qmp import Qmp

SERIAL_LOG_LIMIT = 1 << 20
SERIAL_TAIL = 16 << 10
PANIC_MARKERS = (b"Kernel panic - not syncing", b"kernel BUG at", b"Oops: ")
PAUSE_GRACE = 3.0  # seconds a paused VM may take to resume before the run fails


@dataclass
class Serial:
    """The guest console: written to a capped log file, its tail kept, optionally shown."""

    log: Path
    show: bool = False
    written: int = 0
    truncated: bool = False
    tail: bytearray = field(default_factory=bytearray)

    def read(self, sock: socket.socket) -> int:
        """Take what SOCK has now; the number of bytes read (0 at EOF or when none)."""
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return 0
        self.feed(data)
        return len(data)

    def drain(self, sock: socket.socket) -> None:
        """Take what the guest wrote before it went (QEMU has exited or is going)."""
        for _ in range(256):
            if not select.select([sock], [], [], 0)[0] or not self.read(sock):
                return

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self.tail += data
        del self.tail[:-SERIAL_TAIL]
        if self.show:
            os.write(2, data)
        if self.truncated:
            return
        room = SERIAL_LOG_LIMIT - self.written
        with open(self.log, "ab") as out:
            out.write(data[:room])
            if len(data) > room:
                out.write(b"\n[vmrun: serial log truncated here]\n")
                self.truncated = True
        self.written += min(len(data), room)

    def tail_lines(self, count: int) -> list[str]:
        return bytes(self.tail).decode(errors="replace").strip().splitlines()[-count:]

    def tail_text(self, count: int = 25) -> str:
        return "\n".join(self.tail_lines(count))

    def panicked(self) -> bool:
        return any(marker in self.tail for marker in PANIC_MARKERS)

    def panic(self) -> GuestPanic:
        """The error for a guest panic, showing the console from the panic's message on
        (the stack dump follows it), else its end."""
        tail = bytes(self.tail).decode(errors="replace").strip().splitlines()
        start = max(0, len(tail) - 25)
        for index in range(len(tail) - 1, -1, -1):
            if any(marker.decode() in tail[index] for marker in PANIC_MARKERS):
                start = max(index, len(tail) - 60)
                break
        return GuestPanic("the guest kernel panicked", serial_tail="\n".join(tail[start:]))


def event_failure(event: dict[str, Any], serial: Serial, rundir: Path | None
                  ) -> VmrunError | None:
    """The error a QMP event means for the run at once, or None if it means none.

    STOP is not here: a pause ends the run only when no RESUME follows (see Pause).
    SHUTDOWN is not either: QEMU exits after it, and the exit tells what happened."""
    name = event.get("event")
    if name in ("GUEST_PANICKED", "GUEST_CRASHLOADED"):
        return serial.panic()
    data = event.get("data") or {}
    # QEMU names ENOSPC by "nospace" only when it tracks I/O status (werror=stop); with
    # werror=report the reason says it.
    if name == "BLOCK_IO_ERROR" and (
            data.get("nospace") or "No space left" in str(data.get("reason", ""))):
        return ImageError("host disk full: the VM's disk overlay could not grow",
                          hint=f"free space under {rundir}")
    if name == "SUSPEND":
        # Suspended to RAM: nothing in the run ever wakes it.
        return ChannelLost("the guest suspended itself before the command finished")
    return None


@dataclass
class Pause:
    """QEMU's STOP and RESUME events: a VM paused longer than PAUSE_GRACE cannot finish
    its run (an I/O error with werror=stop, a watchdog's or a panic's pause action, a
    `stop` on the monitor); a pause lifted again within PAUSE_GRACE is forgiven."""

    since: float | None = None
    cause: str = ""  # what QEMU reported just before, when it says why
    going: bool = False  # SHUTDOWN came: QEMU stops the vCPUs on its way out

    def on_event(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        data = event.get("data") or {}
        if name == "STOP" and not self.going and self.since is None:
            self.since = time.monotonic()
        elif name == "RESUME":
            self.since, self.cause = None, ""
        elif name == "SHUTDOWN":
            self.going, self.since = True, None
        elif name == "BLOCK_IO_ERROR":
            self.cause = (f"an I/O error on {data.get('device') or data.get('node-name')}: "
                          f"{data.get('reason', data.get('operation', '?'))}")
        elif name == "WATCHDOG":
            self.cause = f"the guest's watchdog fired ({data.get('action', '?')})"

    def deadline(self) -> float | None:
        return None if self.since is None else self.since + PAUSE_GRACE

    def failure(self) -> str | None:
        """What to say once the VM has stayed paused past the grace period."""
        deadline = self.deadline()
        if deadline is None or time.monotonic() < deadline:
            return None
        why = f" after {self.cause}" if self.cause else ""
        return (f"QEMU paused the VM{why} and it did not resume within {PAUSE_GRACE:.0f}s: "
                "the run cannot finish")


class Lifecycle:
    """What both kinds of machine share: a context manager around start(), one ExitStack
    that undoes what start() did, the time of each phase, and the socketpairs whose other
    ends QEMU inherits (so no socket path can be raced)."""

    def __init__(self, *, verbose: bool, notice: Callable[[str], None]) -> None:
        self.verbose = verbose
        self.notice = notice
        self.stack = contextlib.ExitStack()
        self.timings: dict[str, float] = {}
        self.failed = False
        self.socks: dict[str, socket.socket] = {}
        self.rundir: Path | None = None
        self.serial: Serial | None = None
        self.qmp: Qmp | None = None
        self.qemu: process.Qemu | None = None
        self.shutdown_reason = ""  # QEMU's reason in its SHUTDOWN event, once it has one
        self.pause = Pause()

    def start(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.failed = True
            self.stack.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is not None:
            self.failed = True
        self.close()

    def close(self) -> None:
        self.stack.close()

    def _phase(self, name: str, since: float) -> float:
        now = time.monotonic()
        self.timings[name] = now - since
        if self.verbose:
            self.notice(f"{name}: {now - since:.3f}s")
        return now

    def _socketpairs(self, names: Iterable[str]) -> dict[str, int]:
        """Our non-blocking end of a socketpair per name in self.socks; the other ends' fds,
        for QEMU to inherit (the caller closes them once QEMU has them)."""
        child_fds: dict[str, int] = {}
        for name in names:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours.setblocking(False)
            self.stack.callback(ours.close)
            self.socks[name] = ours
            child_fds[name] = theirs.detach()
        return child_fds

    def _stop(self) -> None:
        raise NotImplementedError

    def _spawn(self, argv: list[str], child_fds: dict[str, int]) -> Qmp:
        """Start QEMU with CHILD_FDS (closed here once it has them), stopped by _stop when
        the stack unwinds; its QMP connection, not yet greeted."""
        assert self.rundir is not None
        self.qemu = process.spawn(argv, log=self.rundir / "qemu.log",
                                  pass_fds=tuple(child_fds.values()))
        self.stack.callback(self._stop)
        for child_fd in child_fds.values():
            os.close(child_fd)
        self.qmp = Qmp(self.socks["qmp"])
        return self.qmp

    def _console(self) -> Serial:
        assert self.serial is not None
        return self.serial

    def _check_qmp_events(self) -> None:
        """Act on what QMP reported: a panic, a full host disk or a suspended guest ends
        the run; a pause ends it when it lasts (see _check_pause)."""
        assert self.qmp is not None
        events, self.qmp.events = self.qmp.events, []
        for event in events:
            if event.get("event") == "SHUTDOWN":
                self.shutdown_reason = str((event.get("data") or {}).get("reason", ""))
            self.pause.on_event(event)
            failure = event_failure(event, self._console(), self.rundir)
            if failure is not None:
                self.failed = True
                raise failure

    def _wait_until(self, deadline: float | None) -> float | None:
        """Seconds select() may wait: to DEADLINE, or sooner to check a pause."""
        ends = [d for d in (deadline, self.pause.deadline()) if d is not None]
        return None if not ends else max(0.0, min(ends) - time.monotonic())

    def _check_pause(self) -> None:
        """Fail once the VM has stayed paused past the grace period."""
        failure = self.pause.failure()
        if failure is not None:
            self.failed = True
            assert self.qemu is not None
            raise self.qemu.failure(failure)
