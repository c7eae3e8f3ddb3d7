"""A hostile guest: vmrun's initramfs with another /init that floods every port, sends
malformed and oversized status messages and powers off in the middle of a command.

vmrun must stay within a memory bound, execute nothing the guest sent, and report the
lost channel (119), never success. Each case runs vmrun in a child process, so the
child's peak RSS (VmHWM) measures vmrun alone."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.vmtools import vmrun_env
from vmrun.guest.build import Guest
from vmrun.guest.cpio import CpioWriter

pytestmark = pytest.mark.vm

# What the guest sends as output, status and console text: shell that would leave the
# marker file if anything on the host ever evaluated it.
HOSTILE_INIT = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
/bin/busybox --install -s
mount -t devtmpfs -o nosuid dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
while IFS= read -r ko; do insmod "$ko"; done < /etc/vmrun/modules.boot
read -r cmdline < /proc/cmdline
mode=${cmdline##*vmrun.hostile=}; mode=${mode%% *}
mark=${cmdline##*vmrun.marker=}; mark=${mark%% *}
pwn="\$(touch $mark) \`touch $mark\`; touch $mark && sh -c 'touch $mark' | tee $mark"
ctl= status= out= err=
while [ -z "$ctl" ] || [ -z "$status" ] || [ -z "$out" ] || [ -z "$err" ]; do
    for p in /sys/class/virtio-ports/*; do
        [ -e "$p/name" ] && [ -c "/dev/${p##*/}" ] || continue
        read -r name < "$p/name"
        case $name in
            vmrun.control) ctl=/dev/${p##*/} ;;
            vmrun.status) status=/dev/${p##*/} ;;
            vmrun.stdout) out=/dev/${p##*/} ;;
            vmrun.stderr) err=/dev/${p##*/} ;;
        esac
    done
    usleep 5000
done
exec 3< "$ctl" 4> "$status" 5> "$out" 6> "$err"
echo ready >&4
while IFS= read -r line <&3; do [ "$line" = run ] && break; done
echo started >&4
case $mode in
    flood)
        yes "$pwn" >&5 &
        yes "$pwn" >&6 &
        yes started >&4 &
        yes "$pwn" > /dev/console &
        sleep 20 ;;
    malformed)
        # Short enough for a status line: refused for what it says.
        echo 'exit $(reboot);id' >&4
        sleep 600 ;;
    binary)
        printf 'exit \377\376\n' >&4
        sleep 600 ;;
    oversized)
        head -c 100000 /dev/zero | tr '\0' 7 >&4
        sleep 600 ;;
esac
poweroff -f
"""

# Runs vmrun's Machine on the hostile guest; prints what happened and its peak RSS.
HARNESS = r"""
import dataclasses, json, os, sys
from pathlib import Path
from vmrun import Command, Machine, MachineSpec, Net, Share, VmrunError
from vmrun.guest.build import ensure_guest
from vmrun.qemu.arch import host_arch, lookup_arch

initrd, how, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
guest = dataclasses.replace(ensure_guest(lookup_arch(host_arch())), initrd=Path(initrd))

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])

stall_r, stall_w = os.pipe()  # a reader that never reads
fds = (None, None) if how == "capture" else (stall_w, stall_w)
vm = Machine(MachineSpec(share=Share.NONE, net=Net.NONE), guest=guest,
             stdout_fd=fds[0], stderr_fd=fds[1], notice=lambda m: None)
before = status("VmRSS")
report = {"rss_before_kib": before}
try:
    with vm:
        result = vm.run(Command(("true",), timeout=300), capture=how == "capture",
                        capture_limit=limit)
    report["code"] = result.exit_code
except VmrunError as exc:
    report.update(code=exc.exit_code, message=str(exc))
report["hwm_kib"] = status("VmHWM")
report["received"] = {n: o.received for n, o in vm.ports.outputs.items()}
report["kept"] = {n: len(o.capture or b"") for n, o in vm.ports.outputs.items()}
report["pending"] = {n: len(o.pending) for n, o in vm.ports.outputs.items()}
report["events"] = vm.ports.events
print(json.dumps(report))
"""

MEMORY_BOUND_MIB = 32  # growth of vmrun's peak RSS over its RSS before the boot


@pytest.fixture(scope="module")
def hostile_initrd(guest: Guest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vmrun's initramfs (busybox, modules) followed by an archive whose /init replaces
    the agent: the kernel unpacks both, the later entry wins."""
    extra = io.BytesIO()
    cpio = CpioWriter(extra)
    cpio.file("init", HOSTILE_INIT.encode(), mode=0o755)
    cpio.finish()
    path = tmp_path_factory.mktemp("hostile") / "initrd.cpio"
    path.write_bytes(guest.initrd.read_bytes() + extra.getvalue())
    return path


def run_hostile(initrd: Path, tmp_path: Path, mode: str, how: str,
                limit: int = 1 << 20) -> tuple[dict[str, object], Path]:
    marker = tmp_path / "pwned"
    env = {**vmrun_env(), "VMRUN_RUNS_DIR": str(tmp_path / "runs"),
           "VMRUN_KERNEL_APPEND": f"vmrun.hostile={mode} vmrun.marker={marker}"}
    done = subprocess.run([sys.executable, "-c", HARNESS, str(initrd), how, str(limit)],
                          cwd=tmp_path, env=env, capture_output=True, timeout=400, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    report: dict[str, object] = json.loads(done.stdout.decode().splitlines()[-1])
    print(f"\n{mode}/{how}: {report}")
    assert list((tmp_path / "runs").iterdir()) == []
    return report, marker


def growth_mib(report: dict[str, object]) -> float:
    return (int(str(report["hwm_kib"])) - int(str(report["rss_before_kib"]))) / 1024


@pytest.mark.parametrize("how", ["capture", "stalled-reader"])
def test_a_flooding_guest_that_powers_off_mid_command(hostile_initrd: Path, tmp_path: Path,
                                                      how: str) -> None:
    report, marker = run_hostile(hostile_initrd, tmp_path, "flood", how)
    assert report["code"] == 119, report
    assert "stopped before the command reported its exit status" in str(report["message"])
    assert not marker.exists()
    received = report["received"]
    assert isinstance(received, dict)
    assert growth_mib(report) < MEMORY_BOUND_MIB
    if how == "capture":
        # Far more came than the bound allows (about 200 MB here): unbounded buffers
        # would have shown it.
        assert received["stdout"] + received["stderr"] > 2 * (MEMORY_BOUND_MIB << 20), report
        assert report["kept"] == {"stdout": 1 << 20, "stderr": 1 << 20}
    else:
        # Nobody reads the host's end: vmrun holds at most its pending limit per stream
        # and still ends the run when the guest powers off.
        pending = report["pending"]
        assert isinstance(pending, dict)
        from vmrun.ports import PENDING_LIMIT

        assert 0 < pending["stdout"] <= PENDING_LIMIT + (1 << 16)
    assert report["events"] == ["started"]


@pytest.mark.parametrize(("mode", "message"), [
    ("malformed", "unknown status message"),
    ("binary", "malformed status message (not ASCII)"),
    ("oversized", "malformed status message (too long)"),
])
def test_malformed_status_messages_end_the_run(hostile_initrd: Path, tmp_path: Path,
                                               mode: str, message: str) -> None:
    report, marker = run_hostile(hostile_initrd, tmp_path, mode, "capture")
    assert report["code"] == 119, report
    assert message in str(report["message"])
    assert not marker.exists()
    assert growth_mib(report) < MEMORY_BOUND_MIB
