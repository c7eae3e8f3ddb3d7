"""Real VMs under QEMU (TCG here): the behaviour a user of `vmrun -- CMD` relies on."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.vmtools import alive, qemu_children, run_cli, vmrun_argv, vmrun_env
from vmrun import Command, Machine, MachineSpec, Net, Share
from vmrun.errors import CommandTimeout
from vmrun.guest.build import Guest
from vmrun.rundir import runs_root

pytestmark = pytest.mark.vm


def leftover_runs() -> set[str]:
    root = runs_root()
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def test_exit_codes_output_and_input_in_one_machine(guest: Guest, workdir: Path) -> None:
    spec = MachineSpec(share_dir=workdir)
    with Machine(spec) as vm:
        for code in (0, 1, 42, 255):
            assert vm.run(Command(("sh", "-c", f"exit {code}"))).exit_code == code
        # Death by a signal N gives 128+N.
        assert vm.run(Command(("sh", "-c", "kill -9 $$"))).exit_code == 137
        assert vm.run(Command(("sh", "-c", "kill -TERM $$"))).exit_code == 143
        split = vm.run(Command(("sh", "-c", "echo out; echo err >&2; echo more")),
                       capture=True)
        assert (split.stdout, split.stderr) == (b"out\nmore\n", b"err\n")
        fed = vm.run(Command(("sh", "-c", "tr a-z A-Z; echo done"), input=b"hello\n"),
                     capture=True)
        assert fed.stdout == b"HELLO\ndone\n"
        where = vm.run(Command(("pwd",)), capture=True)
        assert where.stdout == f"{workdir}\n".encode()
        env = vm.run(Command(("sh", "-c", 'printf %s "$GREETING"'),
                             env=(("GREETING", "it's a \"test\"\n$HOME"),)), capture=True)
        assert env.stdout == b"it's a \"test\"\n$HOME"
        missing = vm.run(Command(("no-such-command",)), capture=True)
        assert missing.exit_code == 127
        # --net user (the default): the guest has QEMU's user-mode network configured.
        net = vm.run(Command(("sh", "-c", "ip -4 addr show eth0; ip route")), capture=True)
        assert net.stdout is not None
        assert b"10.0.2.15/24" in net.stdout and b"default via 10.0.2.2" in net.stdout


def test_cli_streams_stdin_and_passes_exit_code(guest: Guest, workdir: Path) -> None:
    done = run_cli("--", "sh", "-c", "wc -c; echo to-stderr >&2; exit 7", cwd=workdir,
                   input=b"x" * 100_000)
    assert done.returncode == 7, done.stderr
    assert done.stdout.strip() == b"100000"
    assert b"to-stderr" in done.stderr
    assert b"using TCG" in done.stderr or b"KVM" not in done.stderr


def test_share_rw_and_ro(guest: Guest, workdir: Path) -> None:
    (workdir / "input.txt").write_text("from the host\n")
    done = run_cli("--", "sh", "-c", "cat input.txt > copy.txt; echo guest > made.txt",
                   cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert (workdir / "copy.txt").read_text() == "from the host\n"
    assert (workdir / "made.txt").read_text() == "guest\n"

    done = run_cli("--share", "ro", "--", "sh", "-c",
                   "cat input.txt && echo x > refused.txt", cwd=workdir)
    assert done.returncode != 0
    assert done.stdout == b"from the host\n"
    assert b"Read-only file system" in done.stderr
    assert not (workdir / "refused.txt").exists()


def test_virtiofs_share(guest: Guest, workdir: Path) -> None:
    done = run_cli("--share-via", "virtiofs", "--", "sh", "-c",
                   "grep -q ' virtiofs ' /proc/mounts && echo via-virtiofs > made.txt",
                   cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert (workdir / "made.txt").read_text() == "via-virtiofs\n"


def test_large_output_keeps_memory_bounded(guest: Guest, workdir: Path) -> None:
    # 50 MB through a pipe: vmrun must stream it, not hold it. VmHWM is this process's
    # own peak (ru_maxrss would include the forking parent's peak, inherited over exec).
    script = (
        "import re, sys\n"
        "from vmrun.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "status = open('/proc/self/status').read()\n"
        "peak = re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1)\n"
        "print(f'peak-kib={peak}', file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    argv = [vmrun_argv()[0], "-c", script, "--share", "none", "--", "sh", "-c",
            "head -c 50000000 /dev/zero; exit 3"]
    proc = subprocess.Popen(argv, cwd=workdir, env=vmrun_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    total = 0
    while chunk := proc.stdout.read(1 << 16):
        total += len(chunk)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err
    assert total == 50_000_000
    peak_kib = int(err.decode().split("peak-kib=")[1].split()[0])
    # vmrun itself needs about 21 MB here; holding the output would add 50 MB.
    assert peak_kib < 60_000, f"vmrun's peak RSS was {peak_kib} KiB for 50 MB of output"


def test_command_timeout(guest: Guest, workdir: Path) -> None:
    started = time.monotonic()
    done = run_cli("--timeout", "2", "--share", "none", "--", "sleep", "600", cwd=workdir)
    assert done.returncode == CommandTimeout.exit_code, done.stderr
    assert b"--timeout" in done.stderr
    assert time.monotonic() - started < 60


def test_guest_panic_is_reported_quickly(guest: Guest, workdir: Path) -> None:
    started = time.monotonic()
    done = run_cli("--share", "none", "--", "sh", "-c", "echo c > /proc/sysrq-trigger",
                   cwd=workdir)
    assert done.returncode == 120, done.stderr
    assert b"panicked" in done.stderr
    assert b"Kernel panic" in done.stderr  # the serial console's tail is shown
    assert time.monotonic() - started < 60


def wait_for(predicate: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.05)
    return False


def start_and_wait_for_output(workdir: Path, *, sigint_ignored: bool = False
                              ) -> subprocess.Popen[bytes]:
    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(vmrun_argv("--share", "none", "--", "sh", "-c",
                                       "echo running; exec sleep 600"),
                            cwd=workdir, env=vmrun_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=ignore_sigint if sigint_ignored else None)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    assert ready, "the command never started"
    assert proc.stdout.readline() == b"running\n"
    return proc


@pytest.mark.usefixtures("private_runs")
def stopped(proc: subprocess.Popen[bytes], ceiling: float = 120) -> int:
    """PROC's exit status once it ended; a failure showing what it said if it never did
    (the ceiling is generous: the stop ladder itself takes under 20 s at worst)."""
    try:
        _, err = proc.communicate(timeout=ceiling)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"vmrun did not stop within {ceiling:.0f} s: {err.decode()[-2000:]}")
    return proc.returncode


@pytest.mark.usefixtures("private_runs")
@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_sigint_stops_the_vm_and_cleans_up(guest: Guest, workdir: Path, inherited: str) -> None:
    # "ignored": how a background job of a non-interactive shell starts; an explicit
    # SIGINT must stop the run all the same.
    before = leftover_runs()
    proc = start_and_wait_for_output(workdir, sigint_ignored=inherited == "ignored")
    qemus = qemu_children(proc.pid)
    assert len(qemus) == 1
    proc.send_signal(signal.SIGINT)
    assert stopped(proc) == 130
    assert not alive(qemus[0])
    assert leftover_runs() <= before


def test_sigterm_exits_143(guest: Guest, workdir: Path) -> None:
    proc = start_and_wait_for_output(workdir)
    qemus = qemu_children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert stopped(proc) == 143
    assert qemus and not alive(qemus[0])


@pytest.mark.usefixtures("private_runs")
def test_sigkill_of_vmrun_leaves_no_qemu(guest: Guest, workdir: Path) -> None:
    before = leftover_runs()
    proc = start_and_wait_for_output(workdir)
    qemus = qemu_children(proc.pid)
    assert len(qemus) == 1
    proc.kill()
    proc.wait()
    assert wait_for(lambda: not alive(qemus[0]), 10), "QEMU outlived vmrun"
    dead = leftover_runs() - before
    assert dead, "the killed run left no directory to clean (test is not testing)"
    # The next run removes what the killed one left behind.
    done = run_cli("--share", "none", "--", "true", cwd=workdir)
    assert done.returncode == 0
    assert not (dead & leftover_runs())


def test_tty_gives_an_interactive_shell(guest: Guest, workdir: Path) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: vmrun on a terminal
        os.chdir(workdir)
        os.execve(vmrun_argv()[0], vmrun_argv("-t", "--share", "none", "--", "sh"),
                  vmrun_env())
    output = b""
    sent = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if not ready:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        output += data
        if not sent and b"#" in output:
            os.write(fd, b"tty; test -t 0 && echo IS-A-TTY; exit 5\r")
            sent = True
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 5, output
    assert b"IS-A-TTY" in output
    assert b"/dev/hvc0" in output


def test_keep_leaves_logs(guest: Guest, workdir: Path) -> None:
    done = run_cli("--keep", "--verbose", "--share", "none", "--", "true", cwd=workdir)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.decode().splitlines() if "kept the run directory" in x)
    kept = Path(line.split("kept the run directory ")[1].split()[0])
    try:
        assert (kept / "serial.log").exists()
        assert (kept / "qemu.log").exists()
        assert "qemu-system" in (kept / "qemu.argv").read_text()
        for phase in ("fetch", "command", "shutdown"):
            assert f"{phase}:" in done.stderr.decode()
        # A cold boot, or a restore from the template of this shape (vmrun.warm).
        assert "boot:" in done.stderr.decode() or "restore:" in done.stderr.decode()
    finally:
        import shutil

        shutil.rmtree(kept)


def test_share_none_and_net_none(guest: Guest, workdir: Path) -> None:
    with Machine(MachineSpec(share=Share.NONE, net=Net.NONE)) as vm:
        result = vm.run(Command(("sh", "-c", "grep -c vmrun0 /proc/mounts; ls /sys/class/net")),
                        capture=True)
    assert result.stdout == b"0\nlo\n"


def test_info_json(guest: Guest, workdir: Path) -> None:
    done = run_cli("info", "--json", cwd=workdir)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    for key in ("qemu_version", "accel", "arch", "kernel", "initrd", "cache_dir"):
        assert info[key], key
    assert info["kernel"] == str(guest.kernel)
    assert info["initrd"] == str(guest.initrd)
    assert info["accel"] in ("kvm", "tcg", "hvf")
    assert info["accel_reason"]


def test_console_flood_is_capped_in_the_serial_log(guest: Guest, workdir: Path) -> None:
    # 1.2 MB through the guest's serial console: the stored log stops at its cap with a
    # marker, and the command's exit code still arrives.
    done = run_cli("--keep", "--share", "none", "--net", "none", "--", "sh", "-c",
                   "head -c 1200000 /dev/zero | tr '\\0' x > /dev/console; exit 9",
                   cwd=workdir, timeout=300)
    assert done.returncode == 9, done.stderr
    line = next(x for x in done.stderr.decode().splitlines() if "kept the run directory" in x)
    kept = Path(line.split("kept the run directory ")[1].split()[0])
    try:
        log = (kept / "serial.log").read_bytes()
        assert log.endswith(b"\n[vmrun: serial log truncated here]\n")
        assert len(log) < (1 << 20) + 100
    finally:
        import shutil

        shutil.rmtree(kept)
