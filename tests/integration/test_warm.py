"""Warm starts on real VMs: copies restored from one template are machines of their own,
behave like cold runs, and a template that is not exactly what it was is never restored."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.vmtools import run_cli, vmrun_argv, vmrun_env
from vmrun import Command, Machine, MachineSpec, Net, Share
from vmrun.cache import sha256_file
from vmrun.guest.build import Guest
from vmrun.qemu.process import qemu_version
from vmrun.warm import store
from vmrun.warm.key import Shape
from vmrun.warm.start import PPC_DECR_MIGRATED, version_tuple

pytestmark = pytest.mark.vm

# A shape of its own (odd memory size, no net): nothing else in the suite uses its
# template, so tampering with it disturbs no other test.
SHAPE_ARGS = ("--memory", "392M", "--net", "none", "--share", "none")


def shape_spec(**changes: object) -> MachineSpec:
    fields: dict[str, object] = {"memory_mib": 392, "net": Net.NONE, "share": Share.NONE,
                                 "verbose": True, **changes}
    return MachineSpec(**fields)  # type: ignore[arg-type]


def run_once(spec: MachineSpec, argv: tuple[str, ...] = ("true",)) -> tuple[list[str], int]:
    lines: list[str] = []
    with Machine(spec, notice=lines.append) as vm:
        code = vm.run(Command(argv), capture=True).exit_code
    return lines, code


def start_of(lines: list[str]) -> str:
    return next(line.split()[1] for line in lines if line.startswith("start: "))


def shape_template() -> store.Template:
    """A fresh template of the test shape: the tests' own (392M and 393M) go first, so what
    a failed or interrupted tampering test left in the shared cache never counts."""
    for stale in store.all_templates():
        if (store.read_meta(stale) or {}).get("shape", {}).get("memory_mib") in (392, 393):
            store.remove(stale)
    lines, _ = run_once(shape_spec())
    found = [t for t in store.all_templates()
             if (store.read_meta(t) or {}).get("shape", {}).get("memory_mib") == 392]
    assert len(found) == 1, lines
    return found[0]


@pytest.mark.parametrize("cold", [False, True], ids=["warm", "cold"])
def test_commands_behave_alike_warm_and_cold(guest: Guest, workdir: Path, cold: bool) -> None:
    spec = MachineSpec(share_dir=workdir, cold=cold)
    run_once(spec)  # a template exists for the warm case from here on
    with Machine(spec) as vm:
        assert ("restore" in vm.timings) != cold and ("boot" in vm.timings) == cold
        for code in (0, 1, 42, 255):
            assert vm.run(Command(("sh", "-c", f"exit {code}"))).exit_code == code
        assert vm.run(Command(("sh", "-c", "kill -9 $$"))).exit_code == 137
        split = vm.run(Command(("sh", "-c", "echo out; echo err >&2; echo more")),
                       capture=True)
        assert (split.stdout, split.stderr) == (b"out\nmore\n", b"err\n")
        fed = vm.run(Command(("sh", "-c", "tr a-z A-Z"), input=b"hello\n"), capture=True)
        assert fed.stdout == b"HELLO\n"
        assert vm.run(Command(("pwd",)), capture=True).stdout == f"{workdir}\n".encode()
        net = vm.run(Command(("sh", "-c", "ip -4 addr show eth0; ip route")), capture=True)
        assert net.stdout is not None and b"10.0.2.15/24" in net.stdout
        assert b"default via 10.0.2.2" in net.stdout


@pytest.mark.parametrize("cold", [False, True], ids=["warm", "cold"])
def test_cli_stdin_stdout_stderr_and_exit_code(guest: Guest, workdir: Path, cold: bool) -> None:
    flags = ("--cold",) if cold else ()
    run_cli(*flags, "--", "true", cwd=workdir)
    done = run_cli(*flags, "--verbose", "--", "sh", "-c", "wc -c; echo to-stderr >&2; exit 7",
                   cwd=workdir, input=b"x" * 100_000)
    assert done.returncode == 7, done.stderr
    assert done.stdout.strip() == b"100000"
    assert b"to-stderr" in done.stderr
    assert (b"start: warm" in done.stderr) != cold


def test_parallel_copies_differ_and_keep_the_hosts_time(guest: Guest, workdir: Path) -> None:
    run_cli("--", "true", cwd=workdir)
    script = ("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
              "cat /proc/sys/kernel/random/boot_id; date +%s")
    before = time.time()
    runs = [subprocess.Popen(vmrun_argv("--verbose", "--", "sh", "-c", script), cwd=workdir,
                             env=vmrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(4)]
    outputs = [run.communicate(timeout=300) for run in runs]
    after = time.time()
    for run, (_out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, err
        assert b"start: warm" in err
    lines = [out.decode().split() for out, _ in outputs]
    assert len({line[0] for line in lines}) == 4, lines  # random bytes
    assert len({line[1] for line in lines}) == 4, lines  # boot ids
    for line in lines:
        assert before - 1 <= int(line[2]) <= after + 1


@pytest.mark.parametrize("arch", ["s390x", "ppc64le", "i386", "armv7"])
def test_foreign_copies_differ_keep_time_and_exit_codes(workdir: Path, arch: str) -> None:
    # s390x has no suspend state: its copies are reseeded by vmrun-reseed alone, as the
    # 32-bit guests' are (its ELF32 builds). ppc64le's copies need their decrementer
    # restored (`sleep` returns).
    if arch == "ppc64le":
        qemu = shutil.which("qemu-system-ppc64")
        if qemu is None or version_tuple(qemu_version(qemu)) < PPC_DECR_MIGRATED:
            pytest.skip("ppc64le starts warm on QEMU 8.2 or later")
    run_cli("--arch", arch, "--", "true", cwd=workdir)
    script = ("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; "
              "cat /proc/sys/kernel/random/boot_id; sleep 0.2; date +%s; exit 3")
    before = time.time()
    runs = [subprocess.Popen(vmrun_argv("--arch", arch, "--verbose", "--", "sh", "-c", script),
                             cwd=workdir, env=vmrun_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    after = time.time()
    for run, (_out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 3, err
        assert b"start: warm" in err, err
    lines = [out.decode().split() for out, _ in outputs]
    assert lines[0][0] != lines[1][0] and lines[0][1] != lines[1][1], lines
    for line in lines:
        assert before - 1 <= int(line[2]) <= after + 1


def test_clock_within_a_second_of_the_hosts(guest: Guest, workdir: Path) -> None:
    spec = MachineSpec(share_dir=workdir)
    run_once(spec)
    with Machine(spec) as vm:
        assert "restore" in vm.timings
        before = time.time()
        result = vm.run(Command(("date", "+%s")), capture=True)
        after = time.time()
    assert result.stdout is not None
    # date +%s truncates: the guest's second lies in [before - 1, after] within a second.
    assert before - 1.0 <= int(result.stdout) <= after + 1.0, (before, result.stdout, after)


def test_each_copy_sees_its_own_share(guest: Guest, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "only-a").write_text("a")
    done = run_cli("--verbose", "--", "sh", "-c", "ls; echo 1 > made-in-a", cwd=first)
    done = run_cli("--verbose", "--", "sh", "-c", "ls; echo 2 > made-in-b", cwd=first)
    assert b"start: warm" in done.stderr
    done = run_cli("--verbose", "--", "ls", "-a", cwd=second)
    assert b"start: warm" in done.stderr, done.stderr
    assert done.stdout.split() == [b".", b".."]
    assert sorted(p.name for p in first.iterdir()) == ["made-in-a", "made-in-b", "only-a"]
    assert [p.name for p in second.iterdir()] == []


# ---- templates that are not what they were -----------------------------------------------

def _flip_a_byte(template: store.Template) -> None:
    with open(template.ram, "r+b") as f:
        f.seek(1 << 20)  # inside the kernel's image: never zero
        byte = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([byte[0] ^ 0x40]))


def _truncate(name: str) -> Callable[[store.Template], None]:
    return lambda template: os.truncate(template.directory / name, 4096)


def _other_qemu(template: store.Template) -> None:
    meta = json.loads(template.meta.read_text())
    meta["shape"]["qemu_version"] = "6.2.0"
    template.meta.write_text(json.dumps(meta))


def _other_shape(template: store.Template) -> None:
    """The template of this shape moved to where one with 393M would be looked up."""
    with Machine(shape_spec(memory_mib=393), notice=lambda _: None) as vm:
        assert vm.qemu is not None
    for made in store.all_templates():
        if (store.read_meta(made) or {}).get("shape", {}).get("memory_mib") == 393:
            store.remove(made)
            os.rename(template.directory, made.directory)


@pytest.mark.parametrize("tamper,memory", [
    (_flip_a_byte, 392), (_truncate("ram"), 392), (_truncate("state"), 392),
    (_other_qemu, 392), (_other_shape, 393),
], ids=["ram-one-byte", "ram-truncated", "state-truncated", "other-qemu", "other-shape"])
def test_changed_templates_are_refused_and_replaced(
        guest: Guest, tamper: Callable[[store.Template], None], memory: int) -> None:
    template = shape_template()
    tamper(template)
    lines, code = run_once(shape_spec(memory_mib=memory), ("true",))
    assert code == 0
    refused = [line for line in lines if "refused" in line]
    assert len(refused) == 1 and start_of(lines) == "make", lines
    lines, code = run_once(shape_spec(memory_mib=memory))
    assert code == 0 and start_of(lines) == "warm", lines


def test_a_failed_restore_boots_cold_with_one_line(guest: Guest) -> None:
    template = shape_template()
    # Garbage that passes the checks (its digest recorded): only QEMU can refuse it.
    meta = json.loads(template.meta.read_text())
    template.state.write_bytes(b"QEVM" + os.urandom(4000))
    meta["files"]["state"] = store.file_record(template.state, sha256_file(template.state))
    template.meta.write_text(json.dumps(meta))
    lines, code = run_once(shape_spec(), ("sh", "-c", "exit 3"))
    assert code == 3
    assert len([line for line in lines if "warm start failed" in line]) == 1, lines
    lines, _ = run_once(shape_spec())
    assert start_of(lines) == "warm", lines


def test_sigkill_while_making_a_template_leaves_nothing_trusted(
        guest: Guest, workdir: Path) -> None:
    template = shape_template()
    key = template.key
    store.remove(template)
    run = subprocess.Popen(vmrun_argv("--verbose", *SHAPE_ARGS, "--", "true"), cwd=workdir,
                           env=vmrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    root = store.templates_root()
    while not list(root.glob(f".{key}.part-*")) and run.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=30)
    found = store.find(key)
    # Killed before the rename: no template; after it: a whole one.
    assert found is None or store.refusal(found, key, _shape_of(found)) is None
    lines, code = run_once(shape_spec())
    assert code == 0 and start_of(lines) in ("make", "warm")
    assert not list(root.glob(f".{key}.part-*"))
    lines, _ = run_once(shape_spec())
    assert start_of(lines) == "warm"


def _shape_of(template: store.Template) -> Shape:
    meta = store.read_meta(template)
    assert meta is not None
    return Shape(**meta["shape"])


# ---- image runs ------------------------------------------------------------------------

def _forget_templates(memory_mib: int) -> None:
    for made in store.all_templates():
        if (store.read_meta(made) or {}).get("shape", {}).get("memory_mib") == memory_mib:
            store.remove(made)


def _warm_image_run(spec: MachineSpec, script: str) -> tuple[bool, bytes]:
    """Run SCRIPT in a machine of SPEC; whether it was restored, and what it wrote."""
    with Machine(spec, notice=lambda _: None) as vm:
        result = vm.run(Command(("sh", "-c", script)), capture=True)
    assert result.exit_code == 0, result.stderr
    return "restore" in vm.timings, result.stdout or b""


def test_disk_image_copies_read_their_own_partition_table(guest: Guest,
                                                          tmp_path: Path) -> None:
    """One template serves disk images whose partitions lie elsewhere: a copy reads its own
    disk's table and root, never the template maker's, and keeps nothing of an earlier run."""
    from tests.integration.test_fastboot import DPS_ROOT, LINUX_DATA, gpt_image, root_tree

    root_type = DPS_ROOT.get(guest.arch.name, LINUX_DATA)
    disks = {}
    for name, esp_mib, root_mib in (("a", 4, 32), ("b", 9, 24)):
        tree = root_tree(tmp_path / f"tree-{name}")
        (tree / "vmrun-marker").write_text(f"disk {name}\n")
        disks[name] = tmp_path / f"{name}.raw"
        gpt_image(disks[name], tree, root_type=root_type, root_mib=root_mib, esp_mib=esp_mib)
    script = ("cat /vmrun-marker; test -e /left-behind && echo left-behind; "
              "echo x > /left-behind; sync; "
              "cat /proc/partitions | grep -c 'vda[0-9]'")

    def spec(name: str) -> MachineSpec:
        return shape_spec(image=str(disks[name]), memory_mib=394, verbose=False)

    _forget_templates(394)
    for n, name in enumerate(("a", "b", "a", "b")):
        restored, out = _warm_image_run(spec(name), script)
        assert restored == (n > 0), name  # the first makes the template, and writes on
        assert out.splitlines() == [f"disk {name}".encode(), b"2"], (name, out)
    # The ESPs differ in size: a copy that kept a's table would not find b's root at all.
    restored, out = _warm_image_run(spec("b"), "grep vda2 /proc/partitions")
    assert restored and out.split()[2] == str(24 * 1024).encode(), out


def test_oci_image_copies_mount_their_own_root(guest: Guest, tmp_path: Path) -> None:
    from tests import ocitools as ot

    if ot.TAR2SQFS is None:
        pytest.skip("needs squashfs-tools-ng")
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(guest.arch.name)
    if arch is None or guest.arch.name != os.uname().machine:
        pytest.skip("the image uses this host's busybox")
    images = {}
    for name in ("x", "y"):
        layer = [*ot.busybox_layer(), ot.symlink("bin/cat", "busybox"),
                 ot.symlink("bin/test", "busybox"), ot.directory("etc"),
                 ot.file("etc/which", f"image {name}\n")]
        image = ot.make_image([(layer, "gzip")], architecture=arch,
                              config={"Env": ["PATH=/bin"]})
        images[name] = f"oci:{ot.write_layout(tmp_path / name, image, 'v1')}:v1"
    script = "cat /etc/which; test -e /left-behind && echo left-behind; echo x > /left-behind"

    def spec(name: str) -> MachineSpec:
        return shape_spec(image=images[name], memory_mib=395, verbose=False)

    _forget_templates(395)
    for n, name in enumerate(("x", "y", "x")):
        restored, out = _warm_image_run(spec(name), script)
        assert restored == (n > 0) and out == f"image {name}\n".encode(), (name, out)
