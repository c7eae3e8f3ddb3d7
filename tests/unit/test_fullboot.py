"""Full boot without a VM: argv, firmware choice, SSH options and keys, seeds, bake helpers."""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import stat
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from vmrun import bake as bakelib
from vmrun import seed as seedlib
from vmrun import ssh as sshlib
from vmrun.errors import ChannelLost, QemuError, UsageError
from vmrun.fullboot import (
    MAX_READY_LINES,
    ExitTrailer,
    FullMachine,
    FullOptions,
    ready_unit_command,
    run_cloud_config,
)
from vmrun.qemu import firmware as fw
from vmrun.qemu.arch import ARCHES
from vmrun.qemu.argv import READY_PORT, SERIAL_SSH_PORT, FullBootPlan, full_boot_argv
from vmrun.spec import Accel, MachineSpec, Share

FDS = {"qmp": 3, "serial": 4, "ready": 5, "ssh": 6}


def plan(arch: str = "x86_64", **changes: object) -> FullBootPlan:
    fields: dict[str, object] = dict(
        arch=ARCHES[arch], accel=Accel.TCG, cpus=2, memory_mib=1024,
        disk=Path("/run/d,isk.qcow2"), seed=Path("/run/seed.iso"), fds=FDS)
    fields.update(changes)
    return FullBootPlan(**fields)  # type: ignore[arg-type]


def option_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, word in enumerate(argv) if word == flag]


def test_x86_bios_argv() -> None:
    argv = full_boot_argv(plan(), "qemu")
    assert argv[:6] == ["qemu", "-nodefaults", "-no-user-config", "-display", "none",
                        "-no-reboot"]
    assert option_after(argv, "-machine") == ["q35"]
    assert ["-accel", "tcg", "-cpu", "max"] == argv[argv.index("-accel"):argv.index("-accel") + 4]
    assert "if=pflash" not in " ".join(argv)
    assert option_after(argv, "-smbios") == ["type=1,serial=ds=nocloud"]
    netdev = option_after(argv, "-netdev")[0]
    # Loopback only, the port chosen by the kernel: the image's sshd and vmrun's early one.
    assert netdev == ("user,id=net0,hostfwd=tcp:127.0.0.1:0-:22,"
                      "hostfwd=tcp:127.0.0.1:0-:10022")
    drives = option_after(argv, "-drive")
    assert drives[0].startswith("file=/run/d,,isk.qcow2,format=qcow2,")  # comma doubled
    assert "werror=report" in drives[0]
    assert drives[1] == "file=/run/seed.iso,format=raw,if=none,id=seed,readonly=on"
    devices = option_after(argv, "-device")
    assert f"virtserialport,chardev=ready,name={READY_PORT}" in devices
    # The run hook's SSH port, on QEMU's end of a socketpair vmrun holds from the start.
    assert f"virtserialport,chardev=sshport,name={SERIAL_SSH_PORT}" in devices
    assert "socket,id=sshport,fd=6" in option_after(argv, "-chardev")
    assert "virtio-serial-pci,max_ports=4" in devices
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in devices
    assert "virtio-rng-pci" in devices
    assert "socket,id=qmp,fd=3" in option_after(argv, "-chardev")
    assert "-sandbox" in argv


def test_uefi_argv_uses_read_only_code_and_a_private_vars_copy() -> None:
    argv = full_boot_argv(plan(uefi_code=Path("/fw/CODE.fd"), uefi_vars=Path("/run/vars.fd")))
    drives = option_after(argv, "-drive")
    assert drives[0] == "if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd"
    assert drives[1] == "if=pflash,format=raw,unit=1,file=/run/vars.fd"


def test_no_outbound_network_still_forwards_ssh() -> None:
    netdev = option_after(full_boot_argv(plan(net_outbound=False)), "-netdev")[0]
    assert netdev.endswith(",restrict=on") and "hostfwd=tcp:127.0.0.1:0-:22" in netdev


@pytest.mark.parametrize(("accel", "cpu"), [(Accel.KVM, ["-accel", "kvm", "-cpu", "host"]),
                                             (Accel.HVF, ["-accel", "hvf", "-cpu", "host"])])
def test_hardware_accelerators(accel: Accel, cpu: list[str]) -> None:
    argv = full_boot_argv(plan(accel=accel))
    assert argv[argv.index("-accel"):argv.index("-accel") + 4] == cpu


def test_aarch64_kvm_and_other_transports() -> None:
    argv = full_boot_argv(plan("aarch64", accel=Accel.KVM))
    assert option_after(argv, "-machine") == ["virt,gic-version=host"]
    s390 = full_boot_argv(plan("s390x"))
    assert "virtio-blk-ccw,drive=disk0,bootindex=0" in option_after(s390, "-device")
    assert "sclpconsole,chardev=serial" in option_after(s390, "-device")
    assert "-smbios" not in s390
    ppc = full_boot_argv(plan("ppc64le"))
    assert option_after(ppc, "-machine")[0].startswith("pseries")


# ---- firmware -----------------------------------------------------------------------------

def gpt_head(*types: str) -> bytes:
    head = bytearray(64 * 512)
    head[510:512] = b"\x55\xaa"
    header = bytearray(92)
    header[:8] = b"EFI PART"
    struct.pack_into("<QII", header, 72, 2, 128, 128)
    head[512:512 + 92] = header
    for index, text in enumerate(types):
        start = 1024 + index * 128
        head[start:start + 16] = uuid.UUID(text).bytes_le
    return bytes(head)


HYBRID = gpt_head(str(fw.BIOS_BOOT), str(fw.ESP), "4f68bce3-e8cd-4db1-96e7-fbcaf984b709")
UEFI_ONLY = gpt_head(str(fw.ESP), "0fc63daf-8483-4772-8e79-3d69d8477de4")


def test_bootable_by_reads_the_partition_table() -> None:
    assert fw.bootable_by(HYBRID) == {fw.Firmware.BIOS, fw.Firmware.UEFI}
    assert fw.bootable_by(UEFI_ONLY) == {fw.Firmware.UEFI}
    mbr = bytearray(512)
    mbr[0] = 0xEB  # boot code
    mbr[446 + 4] = 0x83
    mbr[510:512] = b"\x55\xaa"
    assert fw.bootable_by(bytes(mbr)) == {fw.Firmware.BIOS}
    assert fw.bootable_by(bytes(512)) == set()


def test_choose_firmware() -> None:
    both = {fw.Firmware.BIOS, fw.Firmware.UEFI}
    assert fw.choose_firmware("x86_64", fw.Firmware.AUTO, both, "img") == fw.Firmware.BIOS
    assert fw.choose_firmware("x86_64", fw.Firmware.AUTO, {fw.Firmware.UEFI}, "img") == \
        fw.Firmware.UEFI
    assert fw.choose_firmware("aarch64", fw.Firmware.AUTO, both, "img") == fw.Firmware.UEFI
    assert fw.choose_firmware("x86_64", fw.Firmware.UEFI, both, "img") == fw.Firmware.UEFI
    with pytest.raises(UsageError, match="cannot boot with bios"):
        fw.choose_firmware("aarch64", fw.Firmware.BIOS, both, "img")
    with pytest.raises(UsageError, match="no bootloader"):
        fw.choose_firmware("x86_64", fw.Firmware.AUTO, set(), "img")
    with pytest.raises(UsageError, match="boots with bios"):
        fw.choose_firmware("aarch64", fw.Firmware.AUTO, {fw.Firmware.BIOS}, "img")


def test_find_uefi_searches_the_distributions_places(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VMRUN_UEFI_CODE", raising=False)
    fedora = tmp_path / "edk2" / "ovmf"
    fedora.mkdir(parents=True)
    (fedora / "OVMF_CODE.fd").write_bytes(b"c")
    (fedora / "OVMF_VARS.fd").write_bytes(b"v")
    found = fw.find_uefi("x86_64", [str(tmp_path / "none"), str(tmp_path)])
    assert (found.code, found.vars_template) == (fedora / "OVMF_CODE.fd", fedora / "OVMF_VARS.fd")
    brew = tmp_path / "brew" / "qemu"
    brew.mkdir(parents=True)
    (brew / "edk2-aarch64-code.fd").write_bytes(b"c")
    (brew / "edk2-arm-vars.fd").write_bytes(b"v")
    assert fw.find_uefi("aarch64", [str(tmp_path / "brew")]).code == brew / "edk2-aarch64-code.fd"
    with pytest.raises(UsageError, match="no UEFI firmware") as caught:
        fw.find_uefi("x86_64", [str(tmp_path / "none")])
    assert caught.value.hint is not None and "ovmf" in caught.value.hint


# ---- ssh ---------------------------------------------------------------------------------

def test_keys_are_fresh_private_and_pinned(tmp_path: Path) -> None:
    keys = sshlib.make_keys(tmp_path / "ssh")
    other = sshlib.make_keys(tmp_path / "ssh2")
    assert stat.S_IMODE(os.stat(keys.directory).st_mode) == 0o700
    for path in (keys.client_key, keys.known_hosts):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert keys.client_public.startswith("ssh-ed25519 ")
    assert keys.client_public != other.client_public
    assert keys.host_public != other.host_public
    line = keys.known_hosts.read_text().split()
    assert line[0] == sshlib.HOST_ALIAS and " ".join(line[1:3]) == " ".join(
        keys.host_public.split()[:2])
    assert "PRIVATE KEY" in keys.host_private


def test_ssh_argv_talks_to_nothing_but_the_pinned_guest(tmp_path: Path) -> None:
    keys = sshlib.make_keys(tmp_path / "ssh")
    argv = sshlib.ssh_argv(keys, 40123, ["sh", "-c", "echo $HOME; rm -rf /", "x y"])
    options = option_after(argv, "-o")
    for wanted in ("StrictHostKeyChecking=yes", "PasswordAuthentication=no", "BatchMode=yes",
                   "IdentitiesOnly=yes", f"HostKeyAlias={sshlib.HOST_ALIAS}",
                   f"UserKnownHostsFile={keys.known_hosts}", "GlobalKnownHostsFile=/dev/null"):
        assert wanted in options
    assert "StrictHostKeyChecking=no" not in options
    assert argv[argv.index("-F") + 1] == "/dev/null"
    assert argv[argv.index("-p") + 1] == "40123"
    assert "vmrun@127.0.0.1" in argv
    # The remote string is what the guest's /bin/sh parses: each word comes back as given.
    words = subprocess.run(["sh", "-c", f"for w in {argv[-1]}; do printf '%s\\n' \"$w\"; done"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert words == ["sh", "-c", "echo $HOME; rm -rf /", "x y"]


def test_exit_trailer_takes_the_status_and_passes_the_rest() -> None:
    trailer = ExitTrailer(b"<<tok>>")
    out = trailer.feed(b"error text <<t") + trailer.feed(b"ok>>4") + trailer.feed(b"2\nafter")
    assert out == b"error text "
    assert trailer.status == 42
    lost = ExitTrailer(b"<<tok>>")
    assert lost.feed(b"ssh: connect to host 127.0.0.1: refused\n").startswith(b"ssh:")
    assert lost.status is None and b"refused" in lost.rest
    bad = ExitTrailer(b"<<tok>>")
    bad.feed(b"<<tok>>99999\n")
    assert bad.status == 255


# ---- seeds and bake -----------------------------------------------------------------------

def test_run_config_pins_the_host_key_and_signals_readiness(tmp_path: Path) -> None:
    keys = sshlib.make_keys(tmp_path / "ssh")
    config = run_cloud_config(keys)
    merged = yaml.safe_load(seedlib.merge_cloud_config(b"#cloud-config\n", config))
    user = merged["users"][0]
    assert user["ssh_authorized_keys"] == [keys.client_public]
    assert user["hashed_passwd"] == "*"  # no password matches; not "locked" for sshd
    assert merged["ssh_pwauth"] is False
    assert merged["ssh_genkeytypes"] == ["ed25519"]  # the type the seed brings: none made
    assert merged["ssh_keys"]["ed25519_public"] == keys.host_public
    assert merged["growpart"] == {"mode": "off"} and merged["resize_rootfs"] is False
    assert ["systemctl", "set-property", "--runtime", "cloud-final.service",
            "CPUWeight=1"] in merged["bootcmd"]
    bootcmd = merged["bootcmd"][-1]
    assert bootcmd[:2] == ["systemd-run", "--no-block"]
    assert "--property=After=ssh.service" in bootcmd
    assert bootcmd[-1] == f"echo ssh 22 > /dev/virtio-ports/{READY_PORT}"
    early, early_ready = merged["bootcmd"][-3:-1]
    assert "--unit=vmrun-sshd" in early and "--property=Type=notify" in early
    assert "--property=After=cloud-init-local.service" in early
    assert "--property=After=systemd-networkd-wait-online.service" in early
    assert "--property=After=cloud-init.service" not in early
    assert "-p 10022" in early[-1] and "PasswordAuthentication=no" in early[-1]
    assert "--property=Requisite=vmrun-sshd.service" in early_ready
    assert early_ready[-1] == f"echo ssh 10022 > /dev/virtio-ports/{READY_PORT}"


def test_ready_unit_orders_after_the_given_units() -> None:
    argv = ready_unit_command("done", ["After=cloud-final.service"])
    assert "--property=After=cloud-final.service" in argv


def test_bake_user_data_adds_power_off_or_keeps_the_users() -> None:
    ours = yaml.safe_load(bakelib.bake_user_data(b"#cloud-config\npackages: [hello]\n"))
    assert ours["packages"] == ["hello"]
    assert ours["power_state"]["mode"] == "poweroff"
    assert ours["power_state"]["condition"][:2] == ["/bin/sh", "-c"]
    theirs = yaml.safe_load(bakelib.bake_user_data(
        b"#cloud-config\npower_state:\n  mode: reboot\n  condition: false\n"))
    assert theirs["power_state"]["mode"] == "reboot"
    assert theirs["power_state"]["condition"] is False
    script = bakelib.bake_user_data(b"#!/bin/sh\necho hi\n")
    assert b"multipart" in script.lower() and b"power_state" in script


def test_parse_result() -> None:
    result = {"v1": {"datasource": "DataSourceNoCloud", "errors": ["runcmd failed"]}}
    line = b"result " + base64.b64encode(json.dumps(result).encode())
    parsed = bakelib.parse_result(line)
    assert parsed is not None and bakelib.result_errors(parsed) == ["runcmd failed"]
    assert bakelib.parse_result(b"result !!!not base64") is None
    assert bakelib.parse_result(b"result " + base64.b64encode(b"[1, 2]")) is None


def test_bake_key_changes_with_every_input() -> None:
    key = bakelib.bake_key("a" * 64, b"ud", None, "x86_64")
    assert key == bakelib.bake_key("a" * 64, b"ud", None, "x86_64")
    assert len({key, bakelib.bake_key("b" * 64, b"ud", None, "x86_64"),
                bakelib.bake_key("a" * 64, b"ud2", None, "x86_64"),
                bakelib.bake_key("a" * 64, b"ud", b"md", "x86_64"),
                bakelib.bake_key("a" * 64, b"ud", None, "aarch64")}) == 5


def test_a_file_base_gets_a_store_name_of_its_own() -> None:
    from vmrun.images.store import check_name

    for file_name in ("debian-12.qcow2", "my image (1).img", ".hidden", "é.raw"):
        name = bakelib._store_name(file_name)
        assert name.startswith("bake-base-") and check_name(name) == name


# ---- what a failed full boot or bake leaves behind ---------------------------------------

# A QEMU built without seccomp whose every start fails (after QEMU opened nothing).
FAILING_QEMU = """#!/bin/sh
case " $* " in
  *" -version "*) case " $* " in *" -sandbox "*) exit 1 ;; esac
                  echo "QEMU emulator version 7.2.0"; exit 0 ;;
esac
echo "qemu-system-x86_64: cannot start: injected failure" >&2
exit 1
"""


@pytest.fixture
def failing_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH with a QEMU that fails to start, a private cache and runs directory, and a
    small qcow2 disk to boot; the runs directory is returned."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "qemu-system-x86_64").write_text(FAILING_QEMU)
    (bindir / "qemu-system-x86_64").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("VMRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VMRUN_RUNS_DIR", str(tmp_path / "runs"))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "disk.qcow2"),
                    "64M"], check=True)
    return tmp_path / "runs"


def secrets_left(runs: Path) -> list[Path]:
    return sorted([*runs.rglob("seed.iso"), *runs.rglob("ssh_host_ed25519_key")])


@pytest.mark.parametrize("keep", [False, True])
def test_a_full_boot_that_fails_leaves_no_seed_and_no_host_key(
        failing_qemu: Path, tmp_path: Path, keep: bool) -> None:

    spec = MachineSpec(image=str(tmp_path / "disk.qcow2"), accel=Accel.TCG,
                       share=Share.NONE, keep=keep)
    notices: list[str] = []
    with pytest.raises(QemuError), FullMachine(spec, FullOptions(firmware=fw.Firmware.BIOS),
                                               notice=notices.append):
        pass
    assert secrets_left(failing_qemu) == []
    kept = [p for p in failing_qemu.iterdir() if p.is_dir()]
    assert len(kept) == (1 if keep else 0)
    if keep:
        # The seed was made and attached, then removed; -sandbox was left out, said once.
        argv = (kept[0] / "qemu.argv").read_text()
        assert "seed.iso" in argv and "-sandbox" not in argv
        assert (kept[0] / "ssh" / "known_hosts").exists()
        assert any("without seccomp" in notice for notice in notices)


def test_a_bake_that_fails_leaves_no_seed(failing_qemu: Path, tmp_path: Path) -> None:

    spec = MachineSpec(accel=Accel.TCG, keep=True)
    with pytest.raises(QemuError):
        bakelib.bake(str(tmp_path / "disk.qcow2"), name="failing-bake",
                     user_data=b"#cloud-config\n{}\n", spec=spec,
                     options=FullOptions(firmware=fw.Firmware.BIOS), notice=lambda _: None)
    kept = [p for p in failing_qemu.iterdir() if p.is_dir()]
    assert len(kept) == 1 and "seed.iso" in (kept[0] / "qemu.argv").read_text()
    assert secrets_left(failing_qemu) == []


# ---- the ready port under a flood ----------------------------------------------------------

def ready_machine() -> tuple[FullMachine, socket.socket, socket.socket]:
    machine = FullMachine(MachineSpec(image="unused.qcow2"))
    ours, guest = socket.socketpair()
    ours.setblocking(False)
    machine.socks["ready"] = ours
    return machine, ours, guest


def drain_ready(machine: FullMachine, ours: socket.socket) -> None:
    while select.select([ours], [], [], 0)[0]:
        machine._read_ready()


def test_a_flood_of_the_same_ready_lines_grows_nothing() -> None:
    machine, ours, guest = ready_machine()
    try:
        for _ in range(500):
            guest.sendall(b"ssh 22\nssh 10022\n" * 200)  # 200,000 lines in all
            drain_ready(machine, ours)
        assert machine.ready_lines == [b"ssh 22", b"ssh 10022"]
    finally:
        ours.close()
        guest.close()


def test_a_flood_of_distinct_ready_lines_is_refused() -> None:

    machine, ours, guest = ready_machine()
    try:
        guest.sendall(b"".join(b"line %d\n" % n for n in range(MAX_READY_LINES)))
        drain_ready(machine, ours)
        assert len(machine.ready_lines) == MAX_READY_LINES
        guest.sendall(b"one more\n")
        with pytest.raises(ChannelLost, match="too many messages on vmrun's ready port"):
            drain_ready(machine, ours)
    finally:
        ours.close()
        guest.close()
