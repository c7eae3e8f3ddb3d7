"""Faults users meet, injected for real: QEMU killed under vmrun, a cold-cache crowd, a
stalled reader, and what QEMU itself exposes while it runs (listeners, seccomp, limits)."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.vmtools import qemu_children, run_cli, vmrun_argv, vmrun_env
from vmrun import cache as cachelib
from vmrun.debian import mirror_from_env
from vmrun.guest.build import Guest
from vmrun.qemu import process
from vmrun.qemu.arch import host_arch, lookup_arch
from vmrun.qemu.argv import FullBootPlan, full_boot_argv
from vmrun.rundir import runs_root
from vmrun.spec import Accel

pytestmark = pytest.mark.vm


def leftover_runs(root: Path | None = None) -> set[str]:
    root = root or runs_root()
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def start_sleeper(workdir: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(vmrun_argv("--share", "none", "--", "sh", "-c",
                                       "echo running; exec sleep 600"),
                            cwd=workdir, env=env or vmrun_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 180)
    assert ready, "the command never started"
    assert proc.stdout.readline() == b"running\n"
    return proc


def test_qemu_killed_under_a_running_vmrun(guest: Guest, workdir: Path, tmp_path: Path) -> None:
    # Its own runs directory: other vmrun processes on the host cannot blur the check.
    runs = tmp_path / "runs"
    proc = start_sleeper(workdir, env={**vmrun_env(), "VMRUN_RUNS_DIR": str(runs)})
    assert leftover_runs(runs), "the run made no directory (the test would not test)"
    qemus = qemu_children(proc.pid)
    assert len(qemus) == 1
    started = time.monotonic()
    os.kill(qemus[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    detected = time.monotonic() - started
    assert proc.returncode == 123, err
    assert b"QEMU" in err, err
    assert len(err.strip().splitlines()) <= 8, err  # a message, not a traceback
    assert b"Traceback" not in err
    assert not leftover_runs(runs), "the run directory was left behind"
    print(f"QEMU's death noticed and reported in {detected:.2f} s")


def test_a_stalled_reader_never_deadlocks_the_run(guest: Guest, workdir: Path) -> None:
    # Nobody ever reads vmrun's stdout while the guest writes without end: the pipe fills,
    # vmrun stops reading the guest, and the timeout still fires and cleans up.
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen(
            vmrun_argv("--share", "none", "--timeout", "20", "--", "sh", "-c",
                       "while :; do echo flood flood flood flood; done"),
            cwd=workdir, env=vmrun_env(), stdout=write_end, stderr=subprocess.PIPE)
        os.close(write_end)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 121, err
        assert not qemu_children(proc.pid)
    finally:
        os.close(read_end)


def test_a_slow_reader_gets_every_byte_and_the_exit_code(guest: Guest, workdir: Path) -> None:
    proc = subprocess.Popen(
        vmrun_argv("--share", "none", "--", "sh", "-c",
                   "head -c 20000000 /dev/zero | tr '\\0' x; exit 9"),
        cwd=workdir, env=vmrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    time.sleep(8)  # the pipe (64 KiB) is long full: vmrun has to hold back, not buffer
    total = 0
    while chunk := proc.stdout.read(1 << 16):
        assert chunk.count(b"x") == len(chunk)
        total += len(chunk)
    _, err = proc.communicate(timeout=300)
    assert (proc.returncode, total) == (9, 20_000_000), err


# ---- QEMU as it runs: listening sockets, seccomp, resource limits -----------------------

def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if match := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(match.group(1))
    return inodes


def _listeners(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket PID listens on, IPv4 and IPv6."""
    inodes = _socket_inodes(pid)
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address_hex, port_hex = local.split(":")
            raw = bytes.fromhex(address_hex)
            if width == 8:
                address = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                address = socket.inet_ntop(socket.AF_INET6, words)
            found.append((address, int(port_hex, 16)))
    return found


def test_a_full_boot_qemu_listens_on_loopback_only_with_seccomp_and_no_core(
        tmp_path: Path) -> None:
    # QEMU with the argv --boot full uses, paused before the firmware runs (-S): its
    # forwarded ports are bound by then. The check reads the kernel's socket tables.
    arch = lookup_arch(host_arch())
    qemu = process.find_qemu(arch)
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    seed = tmp_path / "seed.iso"
    seed.write_bytes(b"\0" * 65536)
    pairs = {name: socket.socketpair() for name in ("qmp", "serial", "ready", "ssh")}
    plan = FullBootPlan(arch=arch, accel=Accel.TCG, cpus=1, memory_mib=128, disk=disk,
                        seed=seed, fds={n: p[1].fileno() for n, p in pairs.items()})
    argv = [*full_boot_argv(plan, qemu), "-S"]
    vm = process.spawn(argv, log=tmp_path / "qemu.log",
                       pass_fds=tuple(p[1].fileno() for p in pairs.values()))
    try:
        greeting = b""
        pairs["qmp"][0].settimeout(60)
        while b"\n" not in greeting:
            greeting += pairs["qmp"][0].recv(4096)  # QEMU is up once QMP greets
        assert b"QMP" in greeting
        listening = _listeners(vm.process.pid)
        assert len(listening) == 2, (listening, process.log_tail(vm.log))
        assert {address for address, _ in listening} == {"127.0.0.1"}, listening
        status = Path(f"/proc/{vm.process.pid}/status").read_text()
        assert re.search(r"^Seccomp:\s+2$", status, re.M), "QEMU runs without seccomp"
        limits = Path(f"/proc/{vm.process.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core"))
        assert core.split()[4:6] == ["0", "0"], core
        # The tables are read right: each port found answers on loopback.
        for _, port in listening:
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                pass
    finally:
        process.stop(vm, None, grace=0.1)
        for ours, theirs in pairs.values():
            ours.close()
            theirs.close()


# ---- twenty runs at once on an empty cache ----------------------------------------------

class CountingMirror(http.server.ThreadingHTTPServer):
    """A local Debian mirror: serves what the real one has (kept on disk by URL, so the
    suite fetches it once per machine) and counts what each path was asked for."""

    daemon_threads = True

    def __init__(self, upstream: str, store: Path) -> None:
        super().__init__(("127.0.0.1", 0), _MirrorHandler)
        self.upstream = upstream.rstrip("/")
        self.store = store
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def body(self, path: str) -> bytes | None:
        key = hashlib.sha256(path.encode()).hexdigest()
        kept = self.store / key
        # InRelease changes upstream; a fresh copy each session keeps its dates valid.
        if kept.is_file() and not path.endswith("InRelease"):
            return kept.read_bytes()
        try:
            with urllib.request.urlopen(self.upstream + path, timeout=120) as response:
                data: bytes = response.read()
        except urllib.error.HTTPError:
            return None
        with cachelib.staged(kept) as tmp:
            tmp.write_bytes(data)
        return data


class _MirrorHandler(http.server.BaseHTTPRequestHandler):
    server: CountingMirror

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        with self.server.lock:
            self.server.counts[self.path] += 1
            data = self.server.body(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
            start = min(int(match.group(1)), len(data))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def counting_mirror() -> Iterator[CountingMirror]:
    store = cachelib.cache_dir() / "test-mirror"
    store.mkdir(parents=True, exist_ok=True)
    server = CountingMirror(mirror_from_env(), store)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_twenty_runs_at_once_on_an_empty_cache(guest: Guest, tmp_path: Path,
                                               counting_mirror: CountingMirror) -> None:
    cache = tmp_path / "cache"
    env = {**vmrun_env(), "VMRUN_CACHE_DIR": str(cache)}
    mirror = f"http://127.0.0.1:{counting_mirror.server_address[1]}"
    started = time.monotonic()
    procs = [
        subprocess.Popen(vmrun_argv("--mirror", mirror, "--share", "none", "--net", "none",
                                    "--memory", "128M", "--boot-timeout", "600",
                                    "--", "sh", "-c", f"exit {n}"),
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for n in range(20)
    ]
    results = [(n, proc.communicate(timeout=1200)) for n, proc in enumerate(procs)]
    elapsed = time.monotonic() - started
    for (n, (_, err)), proc in zip(results, procs, strict=True):
        assert proc.returncode == n, (n, err.decode(errors="replace")[-2000:])
    assert counting_mirror.counts, "the runs never asked the mirror"
    repeated = {path: count for path, count in counting_mirror.counts.items() if count > 1}
    assert not repeated, f"fetched more than once: {repeated}"
    assert sum(path.endswith(".deb") for path in counting_mirror.counts) == 2  # kernel, busybox
    assert not leftover_runs(cache / "runs")
    print(f"20 cold runs: {elapsed:.1f} s, mirror requests: {dict(counting_mirror.counts)}")


def test_exit_statuses_through_the_command_line(guest: Guest, workdir: Path) -> None:
    # Case 15 through the command line; the API test checks 0, 1, 42, 255, 137 and 143.
    done = run_cli("--share", "none", "--", "sh", "-c", "exit 255", cwd=workdir)
    assert done.returncode == 255, done.stderr
    killed = run_cli("--share", "none", "--", "sh", "-c", "kill -USR1 $$", cwd=workdir)
    assert killed.returncode == 128 + signal.SIGUSR1, killed.stderr
