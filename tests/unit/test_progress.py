"""The progress renderer: bars on a terminal, two plain lines per step on a pipe, and quiet."""

from __future__ import annotations

import fcntl
import io
import os
import re
import select
import struct
import termios
import time
from collections.abc import Iterator

import pytest

from vmrun import progress

MiB = 1 << 20


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def loud() -> Iterator[None]:
    progress.set_quiet(False)
    yield
    progress.set_quiet(False)


def transfer(report: progress.Progress, label: str, size: int, chunk: int) -> None:
    for done in range(0, size, chunk):
        report(label, done, size)
    report(label, size, size)


def test_a_terminal_gets_a_bar_with_bytes_rate_and_eta() -> None:
    out = Terminal()
    with progress.reporter(out) as report:
        transfer(report, "linux-image.deb", 4 * MiB, 64 * 1024)
    text = out.getvalue()
    assert text.startswith("\rvmrun: linux-image.deb:") and text.endswith("\n")
    final = text.rstrip("\n").rsplit("\r", 1)[-1]
    assert re.search(r"100%\|.*\| 4\.00MiB/4\.00MiB \[\d\d:\d\d<\d\d:\d\d, .*iB/s\]", final), final


@pytest.mark.parametrize("rows,columns", [(24, 100), (0, 100), (0, 0)])
def test_a_real_pseudo_terminal_gets_the_bar(rows: int, columns: int) -> None:
    # A size of 0 (a fresh pty, `script` without a terminal) once hid the bar entirely.
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    try:
        with open(slave, "w", closefd=False) as tty:
            assert tty.isatty()
            with progress.task("layer sha256:abc", MiB, stream=tty) as shown:
                shown.update(MiB // 2)
                shown.update(MiB // 2)
        text = ""
        while select.select([master], [], [], 0.5)[0]:
            text += os.read(master, 65536).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert "vmrun: layer sha256:abc: 100%" in text and "1.00MiB/1.00MiB" in text


def test_a_pipe_gets_one_line_at_the_start_and_one_at_the_end() -> None:
    out = io.StringIO()
    with progress.reporter(out) as report:
        transfer(report, "debian.qcow2", 3 * MiB, 4096)  # 768 updates: no flood
        report("Packages.xz", 0, None)
        report("Packages.xz", 2048, None)
        report("Packages.xz", 4096, 4096)  # the end of a transfer of unknown length
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert lines[0] == "vmrun: debian.qcow2 (3.0 MiB)..."
    assert re.fullmatch(r"vmrun: debian\.qcow2: 3\.0 MiB in \d+\.\ds \(.* [KMG]?i?B/s\)",
                        lines[1]), lines[1]
    assert lines[2] == "vmrun: Packages.xz..."
    assert lines[3].startswith("vmrun: Packages.xz: 4.0 KiB in ")
    assert "\r" not in out.getvalue()


def test_a_resumed_transfer_counts_its_rate_from_where_it_resumed() -> None:
    out = io.StringIO()
    with progress.reporter(out) as report:
        report("big.img", 900 * MiB, 1000 * MiB)
        time.sleep(0.05)
        report("big.img", 1000 * MiB, 1000 * MiB)
    end = out.getvalue().splitlines()[1]
    rate = re.search(r"\((\d+\.\d) (MiB|GiB)/s\)", end)
    assert rate is not None, end
    # 100 MiB in >= 0.05 s: at most 2 GiB/s; counting all 1000 MiB would show more.
    assert rate.group(2) == "MiB" or float(rate.group(1)) <= 2.0


def test_quiet_shows_nothing_anywhere() -> None:
    progress.set_quiet(True)
    assert progress.is_quiet()
    for out in (Terminal(), io.StringIO()):
        with progress.reporter(out) as report:
            transfer(report, "x", MiB, 4096)
        with progress.percent("convert", out) as step:
            step(50.0)
        with progress.waiting("baking x", out, tick=0.01):
            time.sleep(0.05)
        assert out.getvalue() == ""


def test_quiet_for_one_call_leaves_the_others_loud() -> None:
    # A run with -q passes quiet=True (its notice is machine.silent); nothing global changes.
    out = Terminal()
    with progress.reporter(out, quiet=True) as report:
        transfer(report, "x", MiB, 4096)
    with progress.percent("convert", out, quiet=True) as step:
        step(100.0)
    assert out.getvalue() == "" and not progress.is_quiet()
    with progress.reporter(out) as report:
        transfer(report, "x", MiB, 4096)
    assert "vmrun: x: 100%" in out.getvalue()


def test_a_conversion_shows_its_percentage() -> None:
    out = Terminal()
    with progress.percent("convert", out) as step:
        for value in (0.0, 12.5, 50.0, 100.0):
            step(value)
    assert "vmrun: convert: 100%" in out.getvalue()
    piped = io.StringIO()
    with progress.percent("convert", piped):
        pass  # refused before it started: nothing to show
    assert piped.getvalue() == ""
    with progress.percent("convert", piped) as step:
        step(100.0)
    assert re.fullmatch(r"vmrun: convert\.\.\.\nvmrun: convert: done in \d+\.\ds\n",
                        piped.getvalue())


def test_a_wait_redraws_its_elapsed_time_on_a_terminal() -> None:
    out = Terminal()
    with progress.waiting("baking web", out, tick=0.02):
        time.sleep(0.3)
    text = out.getvalue()
    assert text.count("\rvmrun: baking web: 00:00") >= 3, text
    piped = io.StringIO()
    with progress.waiting("baking web", piped):
        pass
    assert piped.getvalue().splitlines()[0] == "vmrun: baking web..."


def test_a_failed_step_has_no_end_line() -> None:
    out = io.StringIO()
    with pytest.raises(OSError), progress.reporter(out) as report:
        report("x", 0, 10)
        raise OSError("gone")
    assert out.getvalue() == "vmrun: x (10 B)...\n"


def test_size_text() -> None:
    assert [progress.size_text(n) for n in (0, 1023, 1024, 5 * MiB // 2, 3 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "2.5 MiB", "3.0 GiB"]
