"""Fast-boot runs stay green with their default timeouts while every host core is busy."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.vmtools import alive, vmrun_argv, vmrun_env
from vmrun.guest.build import Guest

pytestmark = pytest.mark.vm

# A ceiling for a whole run on a loaded host, past the default boot timeout (180 s under
# TCG): if it fires, vmrun's own timeout did not.
RUN_CEILING_S = 400


@pytest.fixture
def cpu_hog() -> Iterator[list[subprocess.Popen[bytes]]]:
    """One busy-looping process per host core, killed whatever happens."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(1)  # let them take the cores before the VMs start
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


def start(cwd: Path, script: str) -> subprocess.Popen[bytes]:
    # No --boot-timeout and no --timeout: the defaults are what is under test.
    return subprocess.Popen(vmrun_argv("--net", "none", "--", "sh", "-c", script), cwd=cwd,
                            env=vmrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, bytes, bytes]:
    try:
        out, err = proc.communicate(timeout=RUN_CEILING_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out, err


def test_a_command_under_load(guest: Guest, cpu_hog: list[subprocess.Popen[bytes]],
                              tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("shared\n")
    started = time.monotonic()
    code, out, err = finish(start(tmp_path, "cat in.txt; echo oops >&2; exit 7"))
    assert (code, out, err.endswith(b"oops\n")) == (7, b"shared\n", True), err
    print(f"one run under load: {time.monotonic() - started:.1f}s")
    assert all(alive(hog.pid) for hog in cpu_hog)  # the load lasted the whole run


def test_two_vms_at_once_under_load(guest: Guest, cpu_hog: list[subprocess.Popen[bytes]],
                                    tmp_path: Path) -> None:
    started = time.monotonic()
    procs = [start(tmp_path, f"echo vm{n}; exit {40 + n}") for n in (1, 2)]
    results = [finish(proc) for proc in procs]
    for n, (code, out, err) in zip((1, 2), results, strict=True):
        assert (code, out) == (40 + n, f"vm{n}\n".encode()), err
    print(f"two runs at once under load: {time.monotonic() - started:.1f}s")
    assert all(alive(hog.pid) for hog in cpu_hog)
