"""--boot fast: commands run chrooted in a disk image's root partition (real VMs).

The image is made here without loop devices or mounts: a directory tree with a static
busybox becomes an ext4 filesystem (`mke2fs -d`), which is written into the second
partition of a GPT that `sfdisk` lays out on a plain file, behind a small ESP.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmrun.cache import sha256_file
from vmrun.errors import ImageError, UsageError
from vmrun.guest.build import Guest
from vmrun.images import store
from vmrun.machine import Machine
from vmrun.spec import Boot, Command, MachineSpec, Net, Share

pytestmark = pytest.mark.vm

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "echo", "ls", "pwd", "env", "sha256sum", "mkdir", "touch", "rm",
           "sync", "dd", "head", "test", "[", "true", "false", "id", "printf", "grep", "stat")
SECTOR = 512
MIB = 1 << 20
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
LINUX_DATA = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
DPS_ROOT = {"x86_64": ROOT_X86_64, "aarch64": "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"}


def _tools() -> None:
    for tool in ("mke2fs", "sfdisk"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run scripts/setup --dev (e2fsprogs, fdisk)")
    if not BUSYBOX.is_file():
        pytest.fail("/bin/busybox is missing: run scripts/setup --dev (busybox-static)")


def root_tree(top: Path, *, shell: bool = True) -> Path:
    """What the image's root holds: busybox and its applets, an os-release, a marker."""
    for directory in ("bin", "etc", "root", "tmp", "proc", "sys", "dev", "run"):
        (top / directory).mkdir(parents=True)
    (top / "tmp").chmod(0o1777)
    if shell:
        shutil.copy2(BUSYBOX, top / "bin/busybox")
        for applet in APPLETS:
            (top / "bin" / applet).symlink_to("busybox")
    (top / "etc/os-release").write_text("ID=vmruntest\nNAME=\"vmrun test root\"\n")
    (top / "vmrun-marker").write_text("in the image\n")
    return top


def ext4_fs(path: Path, tree: Path, mib: int) -> None:
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "root", "-d", str(tree),
                    str(path), f"{mib}M"], check=True, capture_output=True)


def xfs_fs(path: Path, tree: Path, mib: int) -> None:
    """An xfs made from TREE through a mkfs.xfs prototype file (no mount needed)."""
    def walk(directory: Path, depth: int) -> list[str]:
        lines = []
        for entry in sorted(directory.iterdir()):
            pad = " " * depth
            mode = entry.lstat().st_mode & 0o777  # the format has no sticky bit
            if entry.is_symlink():
                lines.append(f"{pad}{entry.name} l--{mode:03o} 0 0 {os.readlink(entry)}")
            elif entry.is_dir():
                lines += [f"{pad}{entry.name} d--{mode:03o} 0 0",
                          *walk(entry, depth + 1), f"{pad}$"]
            else:
                lines.append(f"{pad}{entry.name} ---{mode:03o} 0 0 {entry}")
        return lines

    proto = path.with_suffix(".proto")
    proto.write_text("\n".join(["/dev/null", "0 0", "d--755 0 0", *walk(tree, 1), "$", ""]))
    subprocess.run(["mkfs.xfs", "-q", "-f", "-L", "root", "-p", str(proto),
                    "-d", f"file=1,name={path},size={mib}m"], check=True, capture_output=True)
    proto.unlink()


def gpt_image(path: Path, tree: Path, *, root_type: str, root_mib: int = 32,
              make_fs: Callable[[Path, Path, int], None] = ext4_fs, esp_mib: int = 4) -> None:
    """A GPT disk: partition 1 an (empty) ESP, partition 2 a filesystem made from TREE."""
    fs = path.with_suffix(".fs")
    make_fs(fs, tree, root_mib)
    esp_start, esp_size = MIB // SECTOR, esp_mib * MIB // SECTOR
    root_start, root_size = esp_start + esp_size, root_mib * MIB // SECTOR
    with open(path, "wb") as f:
        f.truncate((root_start + root_size) * SECTOR + MIB)
    layout = (f"label: gpt\n"
              f"start={esp_start}, size={esp_size}, type={ESP_TYPE}\n"
              f"start={root_start}, size={root_size}, type={root_type}\n")
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(path)],
                   input=layout.encode(), check=True, capture_output=True)
    # Like dd conv=notrunc,sparse: what is all zeros stays a hole in the disk file.
    with open(fs, "rb") as src, open(path, "r+b") as dst:
        offset = root_start * SECTOR
        while chunk := src.read(MIB):
            if chunk.count(0) != len(chunk):
                dst.seek(offset)
                dst.write(chunk)
            offset += len(chunk)
    fs.unlink()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, guest: Guest) -> dict[str, Path]:
    _tools()
    top = tmp_path_factory.mktemp("fastboot")
    root_type = DPS_ROOT.get(guest.arch.name, LINUX_DATA)
    made = {
        "root": top / "root.raw",
        "noshell": top / "noshell.raw",
        "plain": top / "plain.raw",
    }
    gpt_image(made["root"], root_tree(top / "tree"), root_type=root_type)
    gpt_image(made["noshell"], root_tree(top / "bare", shell=False), root_type=LINUX_DATA,
              root_mib=8)
    # An empty MBR (its signature, no partitions): a disk, with nothing to mount.
    made["plain"].write_bytes(b"plain-disk" + bytes(500) + b"\x55\xaa" + bytes(1 << 20))
    return made


@pytest.fixture(scope="module")
def stored(images: dict[str, Path]) -> store.StoredImage:
    return store.import_image(images["root"], name="vmrun-test-fastboot")


def spec(image: str, share_dir: Path, boot: Boot = Boot.FAST, *, share: Share = Share.RW,
         net: Net = Net.USER) -> MachineSpec:
    return MachineSpec(image=image, boot=boot, share_dir=share_dir, share=share, net=net)


@dataclass(frozen=True)
class Done:
    exit_code: int
    stdout: bytes
    stderr: bytes


def run(vm: Machine, *argv: str, env: tuple[tuple[str, str], ...] = (), cwd: str | None = None,
        input: bytes | None = None) -> Done:
    result = vm.run(Command(argv=argv, env=env, cwd=cwd, input=input), capture=True)
    return Done(result.exit_code, result.stdout or b"", result.stderr or b"")


@pytest.fixture
def share(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "shared dir"  # a space: the path goes through the escapes
    directory.mkdir()
    yield directory


def test_commands_run_in_the_image_root(guest: Guest, stored: store.StoredImage,
                                        share: Path) -> None:
    with Machine(spec(stored.digest[:16], share)) as vm:
        done = run(vm, "cat", "/etc/os-release", "/vmrun-marker")
        assert done.exit_code == 0, done.stderr
        assert b"ID=vmruntest\n" in done.stdout and b"in the image\n" in done.stdout
        # The shared directory is there, at the same path, and is the cwd.
        done = run(vm, "sh", "-c", "pwd; echo from the guest > written; echo $HOME $PATH")
        assert done.exit_code == 0, done.stderr
        path = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        assert done.stdout.splitlines() == [str(share).encode(), b"/root " + path]
        # "sh" is the image's /bin/sh, not the agent's busybox applet of that name.
        done = run(vm, "sh", "-c", 'test "$(stat -L -c %d /proc/$$/exe)" = "$(stat -c %d /)"')
        assert done.exit_code == 0, done.stderr
        assert (share / "written").read_text() == "from the guest\n"
        # Exit codes, stdin and stderr pass through as ever.
        assert run(vm, "sh", "-c", "echo oops >&2; exit 3").stderr == b"oops\n"
        assert run(vm, "sh", "-c", "exit 3").exit_code == 3
        assert run(vm, "true").exit_code == 0
        assert run(vm, "no-such-command").exit_code == 127
        assert run(vm, "cat", input=b"via stdin").stdout == b"via stdin"
        # /proc, /dev and a fresh /run are mounted in the root; the network's resolver too.
        done = run(vm, "sh", "-c", "test -e /proc/self/stat && test -c /dev/null && "
                   "test -e /dev/pts/ptmx && ls -A /run | grep -c . ; cat /etc/resolv.conf")
        assert done.stdout.splitlines() == [b"0", b"nameserver 10.0.2.3"], done.stderr
        # A write inside the root lands on the run's overlay, and the next command sees it.
        assert run(vm, "sh", "-c", "echo changed > /vmrun-marker; sync").exit_code == 0
        assert run(vm, "cat", "/vmrun-marker").stdout == b"changed\n"
        # An env and a cwd of the request apply inside the root.
        done = run(vm, "sh", "-c", "pwd; echo $MODE", env=(("MODE", "fast $x"),),
                   cwd="/made/by the agent")
        assert done.stdout == b"/made/by the agent\nfast $x\n", done.stderr
    assert sha256_file(stored.path) == stored.digest


def test_auto_picks_fast_for_a_root_partition(guest: Guest, images: dict[str, Path],
                                              share: Path) -> None:
    before = sha256_file(images["root"])
    with Machine(spec(str(images["root"]), share, Boot.AUTO, net=Net.NONE)) as vm:
        assert vm.root == 2
        done = run(vm, "sh", "-c", "cat /vmrun-marker; grep ^ID= /etc/os-release")
        # A fresh overlay: what the first test wrote into the root is gone.
        assert done.stdout == b"in the image\nID=vmruntest\n", done.stderr
    assert sha256_file(images["root"]) == before


def test_auto_attaches_an_image_without_partitions_as_a_disk(
        guest: Guest, images: dict[str, Path], tmp_path: Path) -> None:
    with Machine(spec(str(images["plain"]), tmp_path, Boot.AUTO, share=Share.NONE,
                      net=Net.NONE)) as vm:
        assert vm.root is None
        done = run(vm, "sh", "-c", "test -e /etc/os-release && exit 9; head -c 10 /dev/vda")
        assert done.exit_code == 0, done.stderr
        assert done.stdout == b"plain-disk"


def test_fast_needs_a_root_partition(images: dict[str, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def no_vm(*args: object, **kwargs: object) -> None:
        raise AssertionError("a VM was started")

    monkeypatch.setattr("vmrun.machine.process.spawn", no_vm)
    with pytest.raises(UsageError, match="has no root partition") as caught:
        with Machine(spec(str(images["plain"]), tmp_path)):
            pass
    assert caught.value.hint == "use --boot disk to attach it as a plain disk"
    with pytest.raises(UsageError, match="vmrun.fullboot"):
        with Machine(spec(str(images["root"]), tmp_path, Boot.FULL)):
            pass


def test_a_root_without_a_shell_is_a_clear_error(guest: Guest, images: dict[str, Path],
                                                 tmp_path: Path) -> None:
    with Machine(spec(str(images["noshell"]), tmp_path, share=Share.NONE,
                      net=Net.NONE)) as vm:
        with pytest.raises(ImageError, match="partition 2 of image .* has no /bin/sh"):
            run(vm, "true")


@pytest.mark.skipif(shutil.which("mkfs.xfs") is None, reason="mkfs.xfs (xfsprogs) is missing")
def test_an_xfs_root(guest: Guest, tmp_path: Path) -> None:
    image = tmp_path / "xfs.raw"
    gpt_image(image, root_tree(tmp_path / "tree"), root_type=LINUX_DATA, root_mib=300,
              make_fs=xfs_fs)
    with Machine(spec(str(image), tmp_path, share=Share.NONE, net=Net.NONE)) as vm:
        done = run(vm, "sh", "-c", "grep ^ID= /etc/os-release; echo new > /tmp/x; cat /tmp/x")
        assert done.stdout == b"ID=vmruntest\nnew\n", done.stderr


def test_disk_boot_leaves_the_partitions_alone(guest: Guest, images: dict[str, Path],
                                               tmp_path: Path) -> None:
    with Machine(spec(str(images["root"]), tmp_path, Boot.DISK, share=Share.NONE,
                      net=Net.NONE)) as vm:
        assert vm.root is None
        done = run(vm, "sh", "-c", "test -e /etc/os-release && exit 9; test -b /dev/vda2")
        assert done.exit_code == 0, done.stderr

