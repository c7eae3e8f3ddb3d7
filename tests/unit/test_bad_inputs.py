"""Bad inputs end as exit 125 or 118 and one clear line: never a traceback, a hang or a VM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vmrun.cli.common
import vmrun.cli.run
from vmrun.errors import ImageError, UsageError
from vmrun.images import attach
from vmrun.images.rawdisk import disk_signature
from vmrun.spec import (
    Accel,
    Boot,
    Command,
    MachineSpec,
    boot_timeout_for,
    default_boot_timeout,
    host_memory_mib,
)
from vmrun.userfiles import USER_FILE_LIMIT, read_user_file

SRC = str(Path(__file__).resolve().parents[2] / "src")


class NoMachine:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("the CLI must not boot a machine here")


@pytest.fixture(autouse=True)
def sandbox(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(vmrun.cli.run, "Machine", NoMachine)
    monkeypatch.setenv("VMRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VMRUN_RUNS_DIR", str(tmp_path / "runs"))
    yield
    signal.signal(signal.SIGTERM, previous)


def fails(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 125) -> str:
    """Run the CLI on ARGV; it must exit CODE with one error line (and at most a hint)."""
    assert vmrun.cli.main(argv) == code
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[0].startswith("vmrun: error: "), lines
    assert all(line.startswith("hint: ") for line in lines[1:]) and len(lines) <= 2, lines
    return lines[0]


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail with TimeoutError, instead of stalling the test run, if the body hangs."""
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still blocked after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def vmrun_process(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "vmrun", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


# --- files read into memory --------------------------------------------------------------


def test_seed_user_data_dev_zero_is_refused(capsys: pytest.CaptureFixture[str],
                                            tmp_path: Path) -> None:
    line = fails(capsys, ["seed", str(tmp_path / "s.iso"), "--user-data", "/dev/zero"])
    assert "--user-data /dev/zero is a character device, not a regular file" in line
    assert not (tmp_path / "s.iso").exists()


def test_bake_user_data_dev_zero_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    line = fails(capsys, ["image", "bake", "base", "--user-data", "/dev/zero", "--name", "x"])
    assert "user-data /dev/zero is a character device" in line


def test_a_huge_regular_file_is_refused_past_the_limit(capsys: pytest.CaptureFixture[str],
                                                       tmp_path: Path) -> None:
    huge = tmp_path / "user-data"
    with open(huge, "wb") as f:
        f.write(b"#cloud-config\n")
        f.truncate(USER_FILE_LIMIT + 1)  # sparse: costs no disk
    line = fails(capsys, ["seed", str(tmp_path / "s.iso"), "--user-data", str(huge)])
    assert "is larger than 16 MiB" in line


def test_a_file_at_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)
    assert read_user_file(path, "--x", limit=1000) == b"x" * 1000
    with pytest.raises(UsageError, match="larger than 999 bytes"):
        read_user_file(path, "--x", limit=999)


@pytest.mark.parametrize("option", ["--user-data", "--meta-data", "--network-config"])
def test_seed_inputs_refuse_a_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                        option: str) -> None:
    ok = tmp_path / "ud"
    ok.write_text("#cloud-config\n")
    argv = ["seed", str(tmp_path / "s.iso"), "--user-data", str(ok), option, str(tmp_path)]
    assert f"{option} {tmp_path} is a directory" in fails(capsys, argv)


def test_a_fifo_as_user_data_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = vmrun_process("seed", "s.iso", "--user-data", str(fifo), cwd=tmp_path)
    assert done.returncode == 125, done.stderr
    assert f"--user-data {fifo} is a FIFO, not a regular file" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_fifo_swapped_in_after_the_stat_is_caught(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    # The race: the path is a regular file when stat'ed, a FIFO when opened. The open
    # must not block (no writer) and the fstat after it must refuse.
    fifo, regular = tmp_path / "fifo", tmp_path / "regular"
    os.mkfifo(fifo)
    regular.write_text("x")
    real_stat = os.stat
    monkeypatch.setattr(os, "stat",
                        lambda path, *a, **k: real_stat(regular) if path == fifo
                        else real_stat(path, *a, **k))
    with deadline(20), pytest.raises(UsageError, match="is a FIFO"):
        read_user_file(fifo, "--user-data")


def test_a_missing_file_names_the_option(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    line = fails(capsys, ["seed", str(tmp_path / "s.iso"), "--user-data",
                          str(tmp_path / "missing")])
    assert "cannot read --user-data" in line and "No such file" in line


# --- files given as disks ------------------------------------------------------------------


def test_image_etc_passwd_is_refused_before_anything_boots(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not look like a disk image") as info:
        attach.prepare("/etc/passwd", guest_arch="x86_64", debian_arch="amd64",
                       notice=print)
    assert info.value.hint is not None and "--image-format raw" in info.value.hint


def test_image_etc_passwd_on_the_command_line(tmp_path: Path) -> None:
    done = vmrun_process("--image", "/etc/passwd", "--", "true", cwd=tmp_path)
    assert done.returncode == 118, done.stderr
    assert "/etc/passwd does not look like a disk image" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "runs").exists()


def test_image_format_raw_takes_a_file_without_signature(tmp_path: Path) -> None:
    image = tmp_path / "notes.raw"
    image.write_bytes(b"by-path" + bytes(1 << 20))
    with pytest.raises(ImageError, match="does not look like a disk image"):
        attach.prepare(str(image), guest_arch="x86_64", debian_arch="amd64", notice=print)
    base = attach.prepare(str(image), guest_arch="x86_64", debian_arch="amd64", notice=print,
                          image_format="raw")
    assert base.format == "raw" and base.path == image


def test_image_format_raw_refuses_a_file_with_another_header(tmp_path: Path) -> None:
    image = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    with pytest.raises(ImageError, match="has a qcow2 header, not raw"):
        attach.prepare(str(image), guest_arch="x86_64", debian_arch="amd64", notice=print,
                       image_format="raw")


def test_disks_pass_without_a_declared_format(tmp_path: Path) -> None:
    from tests.unit.test_partitions import by_arch, gpt_disk

    gpt = tmp_path / "gpt.raw"
    gpt_disk(gpt, [by_arch("x86_64")])
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(1 << 20)
    for image in (gpt, blank):
        assert attach.prepare(str(image), guest_arch="x86_64", debian_arch="amd64",
                              notice=print).format == "raw"


@pytest.mark.parametrize(("offset", "magic", "what"), [
    (510, b"\x55\xaa", "MBR"), (0x438, b"\x53\xef", "ext2/3/4"), (0, b"XFSB", "XFS"),
    (0x10040, b"_BHRfS_M", "btrfs"), (0, b"hsqs", "squashfs"), (4086, b"SWAPSPACE2", "swap"),
])
def test_disk_signatures(offset: int, magic: bytes, what: str) -> None:
    head = bytearray(b"x" * 0x10048)
    head[offset:offset + len(magic)] = magic
    signature = disk_signature(bytes(head))
    assert signature is not None and what in signature
    assert disk_signature(b"root:x:0:0:root:/root:/bin/sh\n" * 100) is None


def test_image_import_refuses_a_text_file(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n" * 1000)
    line = fails(capsys, ["image", "import", str(text)], code=118)
    assert "does not look like a disk image" in line
    assert vmrun.cli.main(["image", "import", str(text), "--format", "raw"]) == 0
    assert capsys.readouterr().out.startswith("notes.txt  sha256:")


def test_image_import_refuses_a_fifo(capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    line = fails(capsys, ["image", "import", str(tmp_path / "fifo")], code=118)
    assert "not a regular file" in line


def test_image_inspect_of_a_missing_path(capsys: pytest.CaptureFixture[str],
                                         tmp_path: Path) -> None:
    missing = tmp_path / "nope.qcow2"
    line = fails(capsys, ["image", "inspect", str(missing)], code=118)
    assert line == f"vmrun: error: {missing} does not exist"
    line = fails(capsys, ["image", "inspect", "no-such-name"], code=118)
    assert "not in the store" in line or "no image" in line


def test_image_inspect_of_a_fifo_does_not_hang(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with deadline(20):
        line = fails(capsys, ["image", "inspect", str(tmp_path / "fifo")], code=118)
    assert "not a regular file" in line


# --- sizes and counts ------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["--memory", "99999999G"], "--memory 102399998976M is more than this host's"),
    (["--cpus", "0"], "--cpus must be between 1 and 64, not 0"),
    (["--cpus", "-1"], "--cpus takes a whole number, not '-1'"),
    (["--cpus", "1000000"], "--cpus must be between 1 and 64, not 1000000"),
    (["--cpus", "1e3"], "--cpus takes a whole number, not '1e3'"),
    (["--jobs", "0", "--arch", "x86_64,aarch64"], "--jobs must be between 1 and 256, not 0"),
    (["-j", "0"], "--jobs must be between 1 and 256, not 0"),
])
def test_sizes_and_counts(capsys: pytest.CaptureFixture[str], argv: list[str],
                          message: str) -> None:
    assert message in fails(capsys, [*argv, "--", "true"])


def test_memory_ceiling_is_the_hosts_memory() -> None:
    ceiling = host_memory_mib()
    assert 128 < ceiling <= 16 << 20
    assert MachineSpec(memory_mib=ceiling).memory_mib == ceiling
    with pytest.raises(UsageError, match="more than this host's"):
        MachineSpec(memory_mib=ceiling + 1)


# --- numbers that are not finite --------------------------------------------------------------


@pytest.mark.parametrize("option", ["--timeout", "--boot-timeout"])
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "infinity", "1e400", "0",
                                   "-1", "1e9"])
def test_timeouts_refuse_non_finite_and_non_positive(capsys: pytest.CaptureFixture[str],
                                                     option: str, value: str) -> None:
    line = fails(capsys, [f"{option}={value}", "--", "true"])
    assert f"{option} must be a number of seconds above 0 and at most 31536000" in line


def test_bake_timeout_refuses_nan(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ud = tmp_path / "ud"
    ud.write_text("#cloud-config\n")
    line = fails(capsys, ["image", "bake", "b", "--user-data", str(ud), "--name", "x",
                          "--timeout", "nan"])
    assert "--timeout must be a number of seconds" in line


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 0.0, 1e12])
def test_the_api_refuses_non_finite_timeouts(value: float) -> None:
    with pytest.raises(UsageError, match="--timeout"):
        Command(("true",), timeout=value)
    with pytest.raises(UsageError, match="--boot-timeout"):
        MachineSpec(boot_timeout=value)


def test_timeout_inf_ends_as_one_line_in_a_real_process(tmp_path: Path) -> None:
    # Was: `--timeout inf` booted and ended in an OverflowError traceback; nan spun.
    for value in ("inf", "nan"):
        done = vmrun_process("--timeout", value, "--", "true", cwd=tmp_path)
        assert done.returncode == 125, done.stderr
        assert done.stderr.startswith("vmrun: error: --timeout must be a number of seconds")
        assert "Traceback" not in done.stderr


# --- typo'd subcommands ----------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "message"), [
    (["images"], "unknown command 'images'; did you mean 'vmrun image'?"),
    (["imgae", "ls"], "unknown command 'imgae'; did you mean 'vmrun image'?"),
    (["ps"], "unknown command 'ps'"),
    (["uname", "-r"], "unknown command 'uname'"),
    (["--cpus", "2", "nproc"], "unexpected 'nproc': the command goes after '--'"),
    (["run", "images"], "unexpected 'images': the command goes after '--'"),
])
def test_typos_never_boot(capsys: pytest.CaptureFixture[str], argv: list[str],
                          message: str) -> None:
    assert fails(capsys, argv) == f"vmrun: error: {message}"


def test_unknown_command_hint_shows_how_to_run_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert vmrun.cli.main(["ps"]) == 125
    hint = capsys.readouterr().err.splitlines()[1]
    assert hint == "hint: commands: run, info, seed, image, disk, template, doctor, " \
        "completion, test, config, cluster; to run 'ps' in a VM: vmrun [OPTIONS] -- ps ..."


# --- boot timeouts that fit the boot ---------------------------------------------------------


def test_default_boot_timeout_by_mode_accel_and_arch() -> None:
    assert default_boot_timeout(Boot.AUTO, Accel.KVM, "x86_64") == 60
    assert default_boot_timeout(Boot.FAST, Accel.HVF, "aarch64") == 60
    assert default_boot_timeout(Boot.FAST, Accel.TCG, "x86_64") == 180
    assert default_boot_timeout(Boot.DISK, Accel.AUTO, "x86_64") == 180
    assert default_boot_timeout(Boot.FAST, Accel.TCG, "s390x") == 360
    assert default_boot_timeout(Boot.FULL, Accel.KVM, "x86_64") == 180
    assert default_boot_timeout(Boot.FULL, Accel.TCG, "x86_64") == 600
    assert default_boot_timeout(Boot.FULL, Accel.TCG, "riscv64") == 1200
    # Every full boot under TCG leaves more than the 120 s a loaded host needed.
    assert all(default_boot_timeout(Boot.FULL, Accel.TCG, arch) > 2 * 120
               for arch in ("x86_64", "aarch64", "ppc64le"))


def test_an_explicit_boot_timeout_always_wins() -> None:
    spec = MachineSpec(boot_timeout=7.5, boot=Boot.FULL)
    assert boot_timeout_for(spec, Accel.TCG, "s390x") == 7.5
    assert boot_timeout_for(MachineSpec(), Accel.TCG, "x86_64") == 180


def test_the_cli_leaves_the_boot_timeout_to_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[MachineSpec] = []

    class Recorder:
        def __init__(self, spec: MachineSpec, *args: Any, **kwargs: Any) -> None:
            seen.append(spec)
            raise UsageError("recorded")

    monkeypatch.setattr(vmrun.cli.run, "Machine", Recorder)
    vmrun.cli.main(["--", "true"])
    vmrun.cli.main(["--boot-timeout", "42", "--", "true"])
    assert [spec.boot_timeout for spec in seen] == [None, 42.0]


def test_help_documents_the_boot_timeout_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        vmrun.cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: 180 under TCG, 60 with KVM or HVF; --boot full: 600 and 180" in text
