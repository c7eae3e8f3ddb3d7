"""Runs on this host: each unit in its own `python -m vmrun` process, which dies with us."""

from __future__ import annotations

import ctypes
import functools
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vmrun.cluster.units import OnOutput, RunResult, RunUnit, read_timings, vmrun_env

PR_SET_PDEATHSIG = 1
TAIL_LINES = 50
CANCEL_POLL_S = 1.0
STOP_GRACE_S = 15.0


def _die_with_parent(parent: int) -> None:
    # Runs in the child between fork and exec. SIGKILL when the thread that started us goes
    # (a worker killed mid-run); vmrun's QEMU has the same tie to vmrun, so it goes too.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop vmrun as an interrupt would (it shuts its VM down), then for sure."""
    process.terminate()
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()


def _pump(process: subprocess.Popen[bytes], emit: Callable[[int, bytes], None],
          cancelled: Callable[[], bool]) -> None:
    """Pass PROCESS's stdout and stderr to EMIT line by line until both close; stop
    PROCESS once CANCELLED says so (asked about every second)."""
    assert process.stdout is not None and process.stderr is not None
    partial = {1: b"", 2: b""}
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ, 1)
        selector.register(process.stderr, selectors.EVENT_READ, 2)
        while selector.get_map():
            ready = selector.select(timeout=CANCEL_POLL_S)
            if process.poll() is None and cancelled():
                _stop(process)
            for key, _ in ready:
                fd: int = key.data
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    if partial[fd]:
                        emit(fd, partial[fd])
                    continue
                lines = (partial[fd] + data).split(b"\n")
                partial[fd] = lines.pop()
                for line in lines:
                    emit(fd, line)


def never() -> bool:
    return False


def run_unit(unit: RunUnit, on_output: OnOutput, *, node: str = "", attempts: int = 1,
             argv: Sequence[str] | None = None, cancelled: Callable[[], bool] = never
             ) -> RunResult:
    """Run UNIT here (with ARGV in place of its own, when given) and wait for it, or
    until CANCELLED returns True."""
    tails: dict[int, deque[bytes]] = {1: deque(maxlen=TAIL_LINES), 2: deque(maxlen=TAIL_LINES)}

    def emit(fd: int, line: bytes) -> None:
        tails[fd].append(line)
        on_output(unit.id, fd, line)

    with tempfile.TemporaryDirectory(prefix="vmrun-unit-") as tmp:
        timings_file = Path(tmp) / "timings.json"
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-m", "vmrun", *(unit.argv if argv is None else argv)],
            env=vmrun_env(str(timings_file)), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=functools.partial(_die_with_parent, os.getpid()))
        try:
            _pump(process, emit, cancelled)
            code = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        seconds = time.monotonic() - started
        timings = read_timings(timings_file)
    text = {fd: b"\n".join(lines).decode(errors="replace") for fd, lines in tails.items()}
    return RunResult(id=unit.id, exit_code=code, seconds=seconds, stdout_tail=text[1],
                     stderr_tail=text[2], node=node or socket.gethostname(),
                     attempts=attempts, timings=timings)


class LocalEngine:
    """Processes on this host, JOBS at a time; output passes through as it comes. An
    exception here (SIGINT, SIGTERM as vmrun raises it) stops every run before it returns:
    none outlives the engine."""

    def run(self, units: Sequence[RunUnit], jobs: int, on_output: OnOutput
            ) -> list[RunResult]:
        lock = threading.Lock()
        stopping = threading.Event()

        def locked(unit_id: str, fd: int, line: bytes) -> None:
            with lock:
                on_output(unit_id, fd, line)

        pool = ThreadPoolExecutor(max_workers=max(1, jobs))
        try:
            return list(pool.map(
                lambda unit: run_unit(unit, locked, cancelled=stopping.is_set), units))
        finally:
            stopping.set()  # done already, or interrupted: the runs still going stop
            pool.shutdown(wait=True, cancel_futures=True)
