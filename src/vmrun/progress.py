"""Progress of long transfers and conversions on stderr: tqdm bars, plain lines, or nothing."""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Protocol, TextIO

# What the library layers report: (label, bytes done, bytes in all or None when unknown).
# A transfer is over when done == total; a caller that does not know the total says so by
# a last call with done == total.
Progress = Callable[[str, int, int | None], None]
# A conversion by qemu-img reports its percentage.
Percent = Callable[[float], None]

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence every progress display of this process (vmrun -q): errors still print."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


class Task(Protocol):
    def update(self, n: int) -> None:
        """N more units are done."""

    def moveto(self, done: int) -> None:
        """DONE units are done in all (a restarted transfer may go back)."""


def size_text(size: float) -> str:
    """SIZE bytes for people: 512 B, 1.5 KiB, 12.3 MiB, 1.2 GiB."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class _Silent:
    def update(self, n: int) -> None:
        pass

    def moveto(self, done: int) -> None:
        pass


class _Lines:
    """Where stderr is no terminal: one line when a step starts and one when it ends."""

    def __init__(self, stream: TextIO, label: str, total: int | None, unit: str,
                 initial: int) -> None:
        self.stream, self.label, self.total, self.unit = stream, label, total, unit
        self.done = self.initial = initial
        self.started = time.monotonic()
        known = f" ({size_text(total)})" if total is not None and unit == "B" else ""
        self._say(f"{label}{known}...")

    def update(self, n: int) -> None:
        self.done += n

    def moveto(self, done: int) -> None:
        self.done = done

    def finish(self) -> None:
        seconds = max(time.monotonic() - self.started, 1e-3)
        if self.unit == "B":
            moved = max(self.done - self.initial, 0)
            self._say(f"{self.label}: {size_text(self.done)} in {seconds:.1f}s "
                      f"({size_text(moved / seconds)}/s)")
        else:
            self._say(f"{self.label}: done in {seconds:.1f}s")

    def _say(self, text: str) -> None:
        self.stream.write(f"vmrun: {text}\n")
        self.stream.flush()


def _columns(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, io.UnsupportedOperation):
        columns = 0
    return columns if columns > 0 else 80


class _Bar:
    """On a terminal: a tqdm bar with bytes, rate and ETA."""

    def __init__(self, stream: TextIO, label: str, total: int | None, unit: str,
                 initial: int) -> None:
        from tqdm import tqdm  # imported only where there is a terminal to draw on

        # A terminal that says it has 0 columns or rows (a fresh pty, some consoles) would
        # hide tqdm's bar: such a size counts as unknown.
        columns = _columns(stream)
        room = max(columns - 55, 12)  # what the numbers leave of the line for the label
        desc = f"vmrun: {label if len(label) <= room else label[:room - 3] + '...'}"
        if unit == "%":
            self.bar = tqdm(total=total, initial=initial, desc=desc, file=stream,
                            mininterval=0.2, ncols=columns, nrows=24,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                            "[{elapsed}<{remaining}]")
        elif unit == "s":
            self.bar = tqdm(desc=desc, file=stream, bar_format="{desc}: {elapsed}",
                            ncols=columns, nrows=24)
        else:
            known = None if total is None else (
                "{l_bar}{bar}| {n_fmt}iB/{total_fmt}iB [{elapsed}<{remaining}, {rate_fmt}]")
            self.bar = tqdm(total=total, initial=initial, desc=desc, file=stream,
                            unit="iB", unit_scale=True, unit_divisor=1024,
                            mininterval=0.2, bar_format=known, ncols=columns, nrows=24)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def moveto(self, done: int) -> None:
        self.bar.update(done - self.bar.n)

    def refresh(self) -> None:
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


@contextmanager
def task(label: str, total: int | None = None, *, unit: str = "B", initial: int = 0,
         stream: TextIO | None = None, quiet: bool = False) -> Iterator[Task]:
    """Show the progress of one step of TOTAL units ("B": bytes, "%": a percentage,
    "s": a wait with no measure but its time) on STREAM (default: stderr).

    A bar with rate and ETA on a terminal; else a line at the start and one at the end
    (with size and rate); nothing when QUIET or set_quiet(True)."""
    out = sys.stderr if stream is None else stream
    if quiet or _quiet:
        yield _Silent()
        return
    if out.isatty():
        bar = _Bar(out, label, total, unit, initial)
        try:
            yield bar
        finally:
            bar.close()
        return
    lines = _Lines(out, label, total, unit, initial)
    yield lines  # no end line when the step failed: its error says more
    lines.finish()


@contextmanager
def reporter(stream: TextIO | None = None, *, quiet: bool = False) -> Iterator[Progress]:
    """A Progress callback for the library layers: one task per label, ended when its
    transfer is complete (or when the reporter is left)."""
    with ExitStack() as stack:
        open_tasks: dict[str, tuple[Task, ExitStack]] = {}

        def report(label: str, done: int, total: int | None) -> None:
            if label not in open_tasks:
                inner = stack.enter_context(ExitStack())
                shown = inner.enter_context(task(label, total, initial=done, stream=stream,
                                                 quiet=quiet))
                open_tasks[label] = (shown, inner)
            shown, inner = open_tasks[label]
            shown.moveto(done)
            if total is not None and done >= total:
                del open_tasks[label]
                inner.close()

        yield report


@contextmanager
def percent(label: str, stream: TextIO | None = None, *,
            quiet: bool = False) -> Iterator[Percent]:
    """A Percent callback for qemu-img conversions, shown as one task from its first
    report on (a step refused before it starts shows nothing)."""
    with ExitStack() as stack:
        shown: list[Task] = []

        def report(value: float) -> None:
            if not shown:
                shown.append(stack.enter_context(task(label, 100, unit="%", stream=stream,
                                                      quiet=quiet)))
            shown[0].moveto(int(value))

        yield report


@contextmanager
def waiting(label: str, stream: TextIO | None = None, tick: float = 1.0, *,
            quiet: bool = False) -> Iterator[None]:
    """The time spent so far in a wait with no other measure (a bake until power-off),
    redrawn every TICK seconds on a terminal."""
    with task(label, unit="s", stream=stream, quiet=quiet) as shown:
        stop = threading.Event()

        def redraw() -> None:
            while not stop.wait(tick):
                if isinstance(shown, _Bar):
                    shown.refresh()

        ticker = threading.Thread(target=redraw, name="vmrun-progress", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join()
