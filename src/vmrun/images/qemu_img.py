"""Every qemu-img call vmrun makes goes through `run_qemu_img`.

Callers name every format (`-f`, `-F`, `-O`) themselves; read-only inspection adds `-U`
so that a running VM's image lock does not block it. An untrusted call runs with a
bounded address space and CPU time, because qemu-img parses image metadata that a guest
or a download may have crafted.
"""

from __future__ import annotations

import json
import os
import re
import resource
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Container, Sequence
from pathlib import Path
from typing import Any

from vmrun.errors import ImageError

ADDRESS_SPACE_LIMIT = 1 << 30
CPU_SECONDS_LIMIT = 30
# An untrusted call that blocks without using CPU (a FIFO named as an image, a hung
# network file system) still ends.
UNTRUSTED_TIMEOUT = 120.0
# Each of qemu-img's worker threads would reserve its own 64 MiB malloc arena; with up to
# 64 workers that exhausts a 1 GiB address space and qemu-img aborts in
# qemu_thread_create. Two arenas keep convert working under the limit.
UNTRUSTED_ENV = {"MALLOC_ARENA_MAX": "2"}
# A call that moves image data (convert, commit, rebase) gets more time per byte: ample for
# zlib compression on a slow core, still an end for a file that loops or never ends.
BYTES_PER_CPU_SECOND = 4 << 20
BYTES_PER_WALL_SECOND = 2 << 20
STDERR_TAIL_BYTES = 64 * 1024

_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def qemu_img_path() -> str:
    """The qemu-img binary on PATH."""
    path = shutil.which("qemu-img")
    if path is None:
        raise ImageError("qemu-img not found on PATH", hint="apt-get install qemu-utils")
    return path


def cpu_seconds(work_bytes: int) -> int:
    """The CPU limit of an untrusted call that moves WORK_BYTES of image data."""
    return CPU_SECONDS_LIMIT + work_bytes // BYTES_PER_CPU_SECOND


def wall_seconds(work_bytes: int) -> float:
    """The wall-clock limit of an untrusted call that moves WORK_BYTES of image data."""
    return UNTRUSTED_TIMEOUT + work_bytes / BYTES_PER_WALL_SECOND


def limit_child(untrusted: bool, cpu: int = CPU_SECONDS_LIMIT) -> None:
    """Set the resource limits of a qemu-img child; runs in the child before exec."""
    # Core dumps would hold image contents (and guest data) on the host.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if untrusted:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
        # SIGXCPU at the soft limit, SIGKILL one second later should it be ignored.
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))


def run_qemu_img(
    args: Sequence[str],
    *,
    untrusted: bool = True,
    progress: Callable[[float], None] | None = None,
    timeout: float | None = None,
    ok_returncodes: Container[int] = (0,),
    work_bytes: int = 0,
) -> subprocess.CompletedProcess[str]:
    """Run `qemu-img ARGS`; a status outside OK_RETURNCODES raises ImageError.

    ARGS starts with the subcommand. With PROGRESS, `-p` is added and PROGRESS receives
    each percentage qemu-img reports. TIMEOUT is wall-clock seconds; None means no limit
    for a trusted call and, for an untrusted one, UNTRUSTED_TIMEOUT plus time for
    WORK_BYTES, the image data the call moves (which raises its CPU limit likewise).
    """
    if not args:
        raise ValueError("run_qemu_img needs a subcommand")
    subcommand = args[0]
    argv = [qemu_img_path(), subcommand, *(["-p"] if progress is not None else []), *args[1:]]
    if timeout is None and untrusted:
        timeout = wall_seconds(work_bytes)
    cpu = cpu_seconds(work_bytes)
    env = {**os.environ, **UNTRUSTED_ENV} if untrusted else None
    with tempfile.TemporaryFile() as stderr_file:
        # stderr goes to a file, not a pipe: `qemu-img check` can write thousands of
        # lines there, and a full pipe would stall it while we wait on stdout.
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr_file,
            env=env, preexec_fn=lambda: limit_child(untrusted, cpu),
        )
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            stdout = _read_stdout(proc, progress, deadline)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            returncode = proc.wait(timeout=left)
        except subprocess.TimeoutExpired:
            raise ImageError(
                f"qemu-img {subcommand} timed out after {timeout:g} s"
            ) from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
        stderr = _tail(stderr_file)
    if returncode not in ok_returncodes:
        raise ImageError(_failure(subcommand, returncode, stderr, untrusted, cpu))
    return subprocess.CompletedProcess(argv, returncode, stdout, stderr)


def _read_stdout(
    proc: subprocess.Popen[bytes],
    progress: Callable[[float], None] | None,
    deadline: float | None,
) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    chunks: list[bytes] = []
    pending = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                raise subprocess.TimeoutExpired(proc.args, 0.0)
            if not selector.select(wait):
                continue
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
            if progress is not None:
                # qemu-img ends each update with "\r"; keep a partial one for the next read.
                pending += data
                *complete, pending = re.split(rb"[\r\n]", pending)
                for line in complete:
                    match = _PROGRESS.search(line)
                    if match:
                        progress(float(match.group(1)))
    return b"".join(chunks).decode(errors="replace")


def _tail(stderr_file: Any) -> str:
    size = stderr_file.seek(0, os.SEEK_END)
    stderr_file.seek(max(0, size - STDERR_TAIL_BYTES))
    data: bytes = stderr_file.read()
    return data.decode(errors="replace")


def last_line(text: str) -> str:
    """The last non-empty line of TEXT, without qemu-img's own prefix, kept short."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1].removeprefix("qemu-img:").strip()
    return line if len(line) <= 300 else line[:297] + "..."


def _failure(subcommand: str, returncode: int, stderr: str, untrusted: bool,
             cpu: int = CPU_SECONDS_LIMIT) -> str:
    detail = last_line(stderr)
    if returncode < 0:
        signum = -returncode
        name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
        if untrusted and signum in (signal.SIGXCPU, signal.SIGKILL):
            why = f"exceeded its CPU limit of {cpu} s ({name})"
        else:
            why = f"was killed by {name}"
            if untrusted:
                why += f" (address space limited to {ADDRESS_SPACE_LIMIT >> 20} MiB)"
        return f"qemu-img {subcommand} {why}" + (f": {detail}" if detail else "")
    return f"qemu-img {subcommand} failed (exit {returncode}): {detail or 'no message'}"


def filename(path: Path) -> str:
    """PATH as a plain file name for qemu-img.

    A relative name with a colon before its first slash ("nbd:host", "json:{...}") would
    be read as a protocol, and one starting with "-" as an option; an absolute path is
    always a plain file.
    """
    return os.path.abspath(path)


def info(path: Path, fmt: str, *, chain: bool = False) -> Any:
    """`qemu-img info` of PATH read as FMT, as parsed JSON (a list with CHAIN)."""
    args = ["info", "-U", "-f", fmt, "--output=json"]
    if chain:
        args.append("--backing-chain")
    result = run_qemu_img([*args, filename(path)])
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as error:
        raise ImageError(f"qemu-img info gave unreadable output for {path}: {error}") from None


def alone(path: Path, fmt: str) -> str:
    """PATH as a `json:` file name that opens it as FMT with no backing file at all."""
    return "json:" + json.dumps({
        "driver": fmt, "file": {"driver": "file", "filename": filename(path)}, "backing": None,
    })
