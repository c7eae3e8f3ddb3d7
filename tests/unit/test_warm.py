from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.unit.test_argv import INITRD, KERNEL, SANDBOX, X86, plan
from vmrun import cli
from vmrun.cache import sha256_file
from vmrun.channel import Request, encode_request
from vmrun.qemu.arch import ARCHES
from vmrun.qemu.argv import RamFile, ShareDevice, ShareKind, build_argv, kernel_cmdline
from vmrun.spec import Accel, MachineSpec, Share
from vmrun.warm import ramfile, store
from vmrun.warm.key import Shape, host_cpu, template_key
from vmrun.warm.start import Mode, choose, disk_kind, version_tuple, why_cold

SHAPE = Shape(
    arch="x86_64", accel="tcg", cpus=1, memory_mib=1024, share="9p", net=True, tty=False,
    disk="", guest="g" * 64, kernel="/c/vmlinux", initrd="/c/initrd", cmdline="console=x",
    tsc_khz=2_000_000, host_cpu="", qemu="/usr/bin/qemu-system-x86_64",
    qemu_version="7.2.22", qemu_identity="1:2:3", sandbox=True,
)
CHANGES: dict[str, object] = {
    "arch": "aarch64", "accel": "kvm", "cpus": 2, "memory_mib": 512, "share": "none",
    "net": False, "tty": True, "disk": "overlay", "guest": "h" * 64, "kernel": "/d/vmlinux",
    "initrd": "/d/initrd", "cmdline": "console=y", "tsc_khz": 2_100_000, "host_cpu": "ab",
    "qemu": "/opt/qemu", "qemu_version": "8.2.0", "qemu_identity": "1:2:4",
    "sandbox": False, "volumes": 2, "vmrun": "9.9", "recipe": "0",
}


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMRUN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---- key --------------------------------------------------------------------------------

def test_every_field_of_the_shape_is_in_the_key() -> None:
    assert set(CHANGES) == {f.name for f in dataclasses.fields(Shape)}
    keys = {template_key(dataclasses.replace(SHAPE, **{name: value}))  # type: ignore[arg-type]
            for name, value in CHANGES.items()}
    assert template_key(SHAPE) not in keys
    assert len(keys) == len(CHANGES)


def test_key_is_stable() -> None:
    assert template_key(SHAPE) == template_key(dataclasses.replace(SHAPE))
    assert len(template_key(SHAPE)) == 32


def test_host_cpu_follows_model_and_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor: 0\nmodel name: A\nflags: sse avx\ncpu MHz: 1\n\nprocessor: 1\n")
    first = host_cpu(info)
    info.write_text("processor: 0\nmodel name: A\nflags: sse avx\ncpu MHz: 2\n")
    assert host_cpu(info) == first  # the clock rate is not the CPU's shape
    info.write_text("processor: 0\nmodel name: A\nflags: sse\ncpu MHz: 1\n")
    assert host_cpu(info) != first


# ---- argv -------------------------------------------------------------------------------

MAKE_RAM = RamFile(Path("/run/ram"), shared=True)
COPY_RAM = RamFile(Path("/t/k/ram"), shared=False)


def _warm_snapshot(accel: Accel, cpu: list[str], ram: RamFile, incoming: bool) -> list[str]:
    share = "on" if ram.shared else "off"
    return [
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot", *SANDBOX, "-machine", "microvm,isa-serial=on,rtc=on,memory-backend=mem",
        "-global", "virtio-mmio.force-legacy=false", "-accel", str(accel), *cpu,
        "-smp", "2", "-m", "1024M",
        "-object", f"memory-backend-file,id=mem,size=1024M,mem-path={ram.path},share={share}",
        *(["-incoming", "defer"] if incoming else []),
        "-kernel", str(KERNEL), "-initrd", str(INITRD), "-append", "console=X quiet",
    ]


@pytest.mark.parametrize("accel,cpu", [(Accel.TCG, ["-cpu", "max"]),
                                       (Accel.KVM, ["-cpu", "host"]),
                                       (Accel.HVF, ["-cpu", "host"])])
@pytest.mark.parametrize("ram,incoming", [(MAKE_RAM, False), (COPY_RAM, True)])
def test_template_and_restore_argv(accel: Accel, cpu: list[str], ram: RamFile,
                                   incoming: bool) -> None:
    argv = build_argv(plan(X86, accel, ram=ram, incoming=incoming))
    expected = _warm_snapshot(accel, cpu, ram, incoming)
    assert argv[: len(expected)] == expected
    # The rest, the device layout, is the cold boot's: a restore needs the same devices.
    cold = build_argv(plan(X86, accel))
    assert argv[len(expected):] == cold[cold.index("-append") + 2:]


def test_restore_argv_differs_from_making_only_in_sharing_and_incoming() -> None:
    made = build_argv(plan(X86, Accel.TCG, ram=MAKE_RAM))
    restored = build_argv(plan(X86, Accel.TCG, ram=dataclasses.replace(MAKE_RAM, shared=False),
                               incoming=True))
    assert [w for w in restored if w not in ("-incoming", "defer")] == \
        [w.replace("share=on", "share=off") for w in made]


@pytest.mark.parametrize("field,kind", [("disk", "overlay"), ("root_image", "root-image")])
def test_each_copy_attaches_its_own_disk_under_the_templates_drive(field: str,
                                                                  kind: str) -> None:
    """A copy's block device differs from its template's only in the file behind it."""
    made = plan(X86, Accel.TCG, ram=MAKE_RAM, **{field: Path("/runs/a/disk")})
    copy = plan(X86, Accel.TCG, ram=MAKE_RAM, **{field: Path("/runs/b/disk")})
    assert disk_kind(made) == disk_kind(copy) == kind
    assert disk_kind(plan(X86, Accel.TCG)) == ""
    made_argv, copy_argv = build_argv(made), build_argv(copy)
    changed = [(a, b) for a, b in zip(made_argv, copy_argv, strict=True) if a != b]
    assert len(changed) == 1 and "id=disk0," in changed[0][0], changed
    assert changed[0][1] == changed[0][0].replace("/runs/a/", "/runs/b/")


def test_ram_file_path_with_comma_is_escaped() -> None:
    argv = build_argv(plan(X86, Accel.TCG, ram=RamFile(Path("/a,b/ram"), shared=False)))
    assert any("mem-path=/a,,b/ram," in word for word in argv)


def test_ram_file_and_virtiofs_are_refused() -> None:
    vfs = ShareDevice(ShareKind.VIRTIOFS, Path("/p"), False, Path("/s.sock"))
    with pytest.raises(ValueError):
        build_argv(plan(X86, Accel.TCG, ram=MAKE_RAM, share=vfs))


def test_cold_argv_has_no_ram_file() -> None:
    argv = build_argv(plan(X86, Accel.TCG))
    assert "-incoming" not in argv
    assert not any(w.startswith("memory-backend-file") for w in argv)


def test_kernel_cmdline_marks_warm_boots() -> None:
    assert "vmrun.warm" in kernel_cmdline(X86, console=False, warm=True).split()
    assert "vmrun.warm" not in kernel_cmdline(X86, console=False).split()


# ---- request ----------------------------------------------------------------------------

def test_request_carries_seed_and_clock_first() -> None:
    lines = encode_request(Request(argv=("true",), cwd="/", token="t", seed="ab12",
                                   clock=1700000000)).decode().splitlines()
    assert lines[:2] == ["seed ab12", "clock 1700000000"]


def test_cold_request_has_no_seed_or_clock() -> None:
    text = encode_request(Request(argv=("true",), cwd="/", token="t")).decode()
    assert "seed" not in text and "clock" not in text


@pytest.mark.parametrize("seed", ["", "AB", "zz", "ab;reboot", "ab\nrun"])
def test_seed_must_be_lowercase_hex(seed: str) -> None:
    with pytest.raises(ValueError):
        encode_request(Request(argv=("true",), cwd="/", token="t", seed=seed))


# ---- RAM file ---------------------------------------------------------------------------

def _ram(path: Path, size: int = 8 << 20, data: dict[int, bytes] | None = None) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, chunk in (data or {1 << 20: b"kernel", 5 << 20: b"x" * 70000}).items():
            f.seek(offset)
            f.write(chunk)
    return path


def test_sparse_copy_keeps_content_and_digest(tmp_path: Path) -> None:
    source = _ram(tmp_path / "src")
    digest = ramfile.copy_sparse(source, tmp_path / "dst")
    assert (tmp_path / "dst").read_bytes() == source.read_bytes()
    assert digest == ramfile.digest_of(source) == ramfile.digest_of(tmp_path / "dst")
    assert os.stat(tmp_path / "dst").st_blocks * 512 < 1 << 20  # holes stay holes


def test_digest_ignores_where_zeros_are_stored(tmp_path: Path) -> None:
    sparse = _ram(tmp_path / "a")
    dense = tmp_path / "b"
    dense.write_bytes(sparse.read_bytes())  # zeros written out, no holes
    assert ramfile.digest_of(sparse) == ramfile.digest_of(dense)


@pytest.mark.parametrize("offset", [0, 1 << 20, (5 << 20) + 69999, (8 << 20) - 1])
def test_digest_sees_one_changed_byte(tmp_path: Path, offset: int) -> None:
    path = _ram(tmp_path / "a")
    before = ramfile.digest_of(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 1]))
    assert ramfile.digest_of(path) != before


# ---- store ------------------------------------------------------------------------------

def _template(shape: Shape = SHAPE) -> store.Template:
    key = template_key(shape)
    staging = store.staging_directory(key) if store.templates_root().is_dir() else None
    if staging is None:
        store.templates_root().mkdir(parents=True)
        staging = store.staging_directory(key)
    digest = ramfile.copy_sparse(_ram(staging / "src"), staging / "ram")
    (staging / "src").unlink()
    (staging / "state").write_bytes(b"QEVM device state")
    files = {"ram": store.file_record(staging / "ram", digest),
             "state": store.file_record(staging / "state",
                                        sha256_file(staging / "state"))}
    store.write_meta(staging, key, shape, files, made=1.0)
    return store.publish(staging, key)


def test_a_fresh_template_is_accepted() -> None:
    template = _template()
    assert store.refusal(template, template_key(SHAPE), SHAPE) is None
    plan = choose(SHAPE, cold=False, why_not="", notice=print)
    assert plan.mode == Mode.RESTORE and plan.template == template


def test_ram_with_a_changed_byte_is_refused() -> None:
    template = _template()
    with open(template.ram, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"K")
    assert store.refusal(template, template_key(SHAPE), SHAPE) == "its ram file changed on disk"


def test_ram_changed_with_its_mtime_put_back_is_refused() -> None:
    template = _template()
    info = os.stat(template.ram)
    with open(template.ram, "r+b") as f:
        f.seek(5 << 20)
        f.write(b"y")
    os.utime(template.ram, ns=(info.st_atime_ns, info.st_mtime_ns))  # ctime still moves
    assert store.refusal(template, template_key(SHAPE), SHAPE) == "its ram file changed on disk"


def test_same_content_under_a_new_identity_is_accepted_and_noted() -> None:
    template = _template()
    copy = template.ram.with_name("copy")
    copy.write_bytes(template.ram.read_bytes())
    os.replace(copy, template.ram)
    assert store.refusal(template, template_key(SHAPE), SHAPE) is None
    meta = json.loads(template.meta.read_text())
    assert meta["files"]["ram"]["ino"] == os.stat(template.ram).st_ino


@pytest.mark.parametrize("name", ["ram", "state"])
def test_truncated_files_are_refused(name: str) -> None:
    template = _template()
    os.truncate(template.directory / name, 4)
    assert "truncated" in str(store.refusal(template, template_key(SHAPE), SHAPE))


def test_changed_state_is_refused_even_with_the_same_size() -> None:
    template = _template()
    template.state.write_bytes(b"QEVM device stat!")
    assert store.refusal(template, template_key(SHAPE), SHAPE) == \
        "its state file changed on disk"


def test_template_of_another_shape_is_refused() -> None:
    template = _template()
    other = dataclasses.replace(SHAPE, qemu_version="8.2.0")
    os.rename(template.directory, template.directory.with_name(template_key(other)))
    found = store.find(template_key(other))
    assert found is not None
    assert "another machine" in str(store.refusal(found, template_key(other), other))
    lines: list[str] = []
    plan = choose(other, cold=False, why_not="", notice=lines.append)
    assert plan.mode == Mode.MAKE and len(lines) == 1 and "refused" in lines[0]
    assert store.find(template_key(other)) is None  # removed, to be made again


def test_missing_metadata_is_refused() -> None:
    template = _template()
    template.meta.unlink()
    assert store.refusal(template, template_key(SHAPE), SHAPE) is not None


def test_staging_directories_are_never_found_and_go_with_the_next_maker() -> None:
    store.templates_root().mkdir(parents=True)
    key = template_key(SHAPE)
    staging = store.staging_directory(key)
    (staging / "ram").write_bytes(b"half")
    assert store.find(key) is None
    assert choose(SHAPE, cold=False, why_not="", notice=print).mode == Mode.MAKE
    with store.maker_lock(key) as mine:
        assert mine and not staging.exists()


def test_only_one_maker_at_a_time() -> None:
    with store.maker_lock("k") as first, store.maker_lock("k") as second:
        assert first and not second


def test_publish_replaces_the_old_template() -> None:
    old = _template()
    old_ino = os.stat(old.ram).st_ino
    new = _template()
    assert new.directory == old.directory and os.stat(new.ram).st_ino != old_ino
    assert [p.name for p in store.templates_root().iterdir() if p.name.startswith(".")] == []


def test_cold_and_ineligible_runs_never_look() -> None:
    _template()
    assert choose(SHAPE, cold=True, why_not="", notice=print).mode == Mode.COLD
    assert choose(None, cold=False, why_not="x", notice=print).mode == Mode.COLD


def test_why_cold() -> None:
    def why(spec: MachineSpec, arch: str = "x86_64", custom: bool = False,
            via: str = "auto") -> str:
        return why_cold(spec, arch=arch, custom_guest=custom, share_via=via)

    for arch in ("x86_64", "i386", "aarch64", "armv7", "s390x"):
        assert why(MachineSpec(), arch) == "", arch
    # riscv64 copies lose their timer (QEMU saves neither time_delta nor Sstc).
    assert "not verified" in why(MachineSpec(), "riscv64")
    assert why(MachineSpec(), custom=True) != ""
    # Images start warm: the template is taken before the guest reads the disk.
    assert why(MachineSpec(image="x.qcow2")) == why(MachineSpec(image="docker://a/b")) == ""
    assert "virtiofs" in why(MachineSpec(), via="virtiofs")
    assert why(MachineSpec(share=Share.NONE), via="virtiofs") == ""


# ---- vmrun template ---------------------------------------------------------------------

def test_template_ls_rm_prune(capsys: pytest.CaptureFixture[str]) -> None:
    template = _template()
    other = _template(dataclasses.replace(SHAPE, memory_mib=512))
    assert cli.main(["template", "ls", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["key"] for r in rows} == {template.key, other.key}
    assert all(r["size"] > 0 and r["last_used"] == 1.0 for r in rows)
    assert cli.main(["template", "ls"]) == 0
    assert template.key in capsys.readouterr().out
    assert cli.main(["template", "rm", other.key[:10]]) == 0
    assert not other.directory.exists()
    store.mark_used(template)
    assert cli.main(["template", "prune"]) == 0
    assert template.directory.exists()  # used just now
    assert cli.main(["template", "prune", "--unused-days", "0"]) == 0
    assert not template.directory.exists()
    assert cli.main(["template", "rm", "nope"]) == 125


def test_arches_all_build_warm_argv() -> None:
    for arch in ARCHES.values():
        argv = build_argv(plan(arch, Accel.TCG, ram=COPY_RAM, incoming=True))
        assert "memory-backend=mem" in argv[argv.index("-machine") + 1]


def test_qemu_versions_compare_by_major_and_minor() -> None:
    assert version_tuple("7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)") == (7, 2)
    assert version_tuple("10.0.2 (Debian 1:10.0.2+ds-2)") == (10, 0) > (8, 2)
    assert version_tuple("") == version_tuple("unknown") == ()


def test_ppc64le_starts_warm_only_where_a_copy_keeps_its_timer() -> None:
    # The installed QEMU's version (bookworm: 7.2, which does not migrate the decrementer;
    # put bookworm-backports' 10.0 first on PATH for the other branch).
    from vmrun.qemu.process import qemu_version

    qemu = shutil.which("qemu-system-ppc64")
    if qemu is None:
        pytest.skip("no qemu-system-ppc64 here")

    spec = MachineSpec()
    why = why_cold(spec, arch="ppc64le", custom_guest=False, share_via="auto", qemu=qemu)
    if version_tuple(qemu_version(qemu)) >= (8, 2):
        assert why == ""
        big = MachineSpec(memory_mib=4096)
        assert "2048 MiB" in why_cold(big, arch="ppc64le", custom_guest=False,
                                      share_via="auto", qemu=qemu)
    else:
        assert "QEMU 8.2" in why


def test_a_pseries_template_leaves_the_device_trees_window_alone() -> None:
    ppc = ARCHES["ppc64le"]
    assert "mem=1020M" in kernel_cmdline(ppc, console=False, warm=True,
                                         memory_mib=1024).split()
    assert not any(w.startswith("mem=") for w in kernel_cmdline(ppc, console=False,
                                                                  memory_mib=1024).split())
    assert not any(w.startswith("mem=") for w in kernel_cmdline(
        ARCHES["x86_64"], console=False, warm=True, memory_mib=1024).split())
