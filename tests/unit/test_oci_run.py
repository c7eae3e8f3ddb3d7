"""Running OCI images: config semantics (docker run's), users, insecure registries, the
request and the QEMU argv for a squashfs root, and the command line's options."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests import ocitools as ot
from tests.unit.test_argv import X86, plan
from vmrun.channel import SQUASHFS_ROOT, Request, encode_request
from vmrun.cli.run import machine_spec, run_parser
from vmrun.errors import ImageError, UsageError
from vmrun.oci.manifest import ImageConfig
from vmrun.oci.pull import RootImage
from vmrun.oci.reference import insecure_registries, is_insecure
from vmrun.oci.run import (
    Identity,
    OciRun,
    apply,
    command_argv,
    image_env,
    read_image_file,
    resolve_user,
)
from vmrun.qemu.argv import build_argv
from vmrun.spec import Accel, Command

PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "app:x:1234:2345:App:/home/app:/bin/sh\n"
          "nohome:x:77:88::/:/bin/sh\n")
GROUP = "root:x:0:\napp:x:2345:\nother:x:3456:\n"
FILES = {"/etc/passwd": PASSWD, "/etc/group": GROUP}


@pytest.mark.parametrize(("entrypoint", "cmd", "argv", "expected"), [
    ((), ("sh",), (), ("sh",)),  # no command: the image's Cmd
    (("/entry",), ("default",), (), ("/entry", "default")),  # Entrypoint + Cmd
    (("/entry",), ("default",), ("ls", "-l"), ("/entry", "ls", "-l")),  # argv replaces Cmd
    ((), ("default",), ("ls",), ("ls",)),
    (("/entry",), None, (), ("/entry",)),
])
def test_command_argv_like_docker_run(entrypoint: tuple[str, ...], cmd: tuple[str, ...] | None,
                                      argv: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert command_argv(entrypoint, cmd, argv) == expected


def test_no_command_and_no_default_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="no command given, and the image has no default"):
        command_argv((), None, ())
    with pytest.raises(UsageError):
        command_argv((), (), ())


def test_env_layers_home_then_image_then_cli() -> None:
    env = image_env(("PATH=/bin", "A=image", "B=image", "junk", "=x"), Identity(5, 5, "/h"),
                    (("B", "cli"), ("C", "cli")))
    assert env == (("HOME", "/h"), ("PATH", "/bin"), ("A", "image"), ("B", "cli"),
                   ("C", "cli"))
    assert dict(image_env(("HOME=/image",), Identity(), ()))["HOME"] == "/image"


def oci_run(**config: object) -> OciRun:
    base = ImageConfig(architecture="amd64", os="linux", diff_ids=(), env=("PATH=/bin",),
                       entrypoint=("/entry",), cmd=("default",), working_dir="/srv")
    image = RootImage(Path("/cache/root.sqfs"), dataclasses.replace(base, **config),  # type: ignore[arg-type]
                      "docker://r/x:1", "sha256:" + "a" * 64, "sha256:" + "b" * 64, "x86_64")
    return OciRun(image, image.config.entrypoint or (), Identity(1234, 2345, "/home/app"))


def test_apply_working_dir_only_without_a_share() -> None:
    run = oci_run()
    shared = apply(run, Command(()), shared=True)
    assert shared.argv == ("/entry", "default") and shared.cwd is None  # the share's path
    alone = apply(run, Command(("ls",), cwd=None), shared=False)
    assert alone.argv == ("/entry", "ls") and alone.cwd == "/srv"
    assert apply(oci_run(working_dir=""), Command(("ls",)), shared=False).cwd == "/"
    assert apply(run, Command(("ls",), cwd="/given"), shared=False).cwd == "/given"
    assert dict(alone.env) == {"HOME": "/home/app", "PATH": "/bin"}


@pytest.mark.parametrize(("user", "expected"), [
    ("", Identity(0, 0, "/root")),
    ("app", Identity(1234, 2345, "/home/app")),
    ("1234", Identity(1234, 2345, "/home/app")),  # a known uid takes its passwd gid
    ("999", Identity(999, 0, "/")),  # unknown uid: gid 0, home /
    ("app:other", Identity(1234, 3456, "/home/app")),
    ("app:42", Identity(1234, 42, "/home/app")),
    ("1234:other", Identity(1234, 3456, "/home/app")),
    ("0", Identity(0, 0, "/root")),
    ("nohome", Identity(77, 88, "/")),
])
def test_resolve_user(user: str, expected: Identity) -> None:
    assert resolve_user(user, FILES.get, "img") == expected


@pytest.mark.parametrize(("user", "message"), [
    ("ghost", "user 'ghost' is not in its /etc/passwd"),
    ("app:ghosts", "group 'ghosts' is not in its /etc/group"),
    ("99999999999", "out of range"),
])
def test_resolve_user_refuses_unknown_names(user: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        resolve_user(user, FILES.get, "img")


def test_resolve_user_without_passwd_file() -> None:
    assert resolve_user("5:6", lambda name: None, "img") == Identity(5, 6, "/")
    with pytest.raises(ImageError):
        resolve_user("app", lambda name: None, "img")


@pytest.mark.skipif(ot.TAR2SQFS is None, reason="needs squashfs-tools-ng")
def test_read_image_file_from_a_real_squashfs(tmp_path: Path) -> None:
    import subprocess

    tar = ot.tar_of([ot.directory("etc"), ot.file("etc/passwd", PASSWD),
                     ot.symlink("etc/group", "/elsewhere")])
    image = tmp_path / "root.sqfs"
    subprocess.run([str(ot.TAR2SQFS), "--quiet", str(image)], input=tar, check=True)
    assert read_image_file(image, "/etc/passwd") == PASSWD
    assert read_image_file(image, "/etc/group") is None  # a link is not followed
    assert read_image_file(image, "/etc/shadow") is None


def test_insecure_registries_from_options_and_environment() -> None:
    got = insecure_registries(["Reg.Example:5000", ""],
                              {"VMRUN_INSECURE_REGISTRIES": " a.example , ,reg.example:5000"})
    assert got == ("reg.example:5000", "a.example")
    assert is_insecure("reg.example:5000", got)
    assert is_insecure("a.example:443", got)  # a host alone covers its ports
    assert not is_insecure("reg.example:5001", got)
    assert not is_insecure("b.example", got)


def test_request_for_a_squashfs_root_and_a_user() -> None:
    request = Request(argv=("id",), cwd="/srv", token="T", disk=True, root=SQUASHFS_ROOT,
                      user=(1234, 3456))
    assert encode_request(request).decode().splitlines() == [
        "disk", "root squashfs", "cwd /srv", "arg id", "user 1234 3456", "token T",
        "stdin null 0", "run"]
    with pytest.raises(ValueError, match="bad root"):
        encode_request(Request(argv=("id",), cwd="/", root="ext4; reboot"))
    with pytest.raises(ValueError, match="bad user"):
        encode_request(Request(argv=("id",), cwd="/", user=(-1, 0)))


def test_root_image_is_attached_raw_and_read_only() -> None:
    argv = build_argv(plan(X86, Accel.TCG, root_image=Path("/c/oci/roots/k.sqfs")))
    drive = argv[argv.index("-drive") + 1]
    assert drive == "file=/c/oci/roots/k.sqfs,format=raw,if=none,id=disk0,readonly=on"
    assert argv[argv.index("-drive") + 3] == "virtio-blk-device,drive=disk0,serial=vmrun-root"
    assert argv.count("-drive") == 1


def test_cli_entrypoint_and_insecure_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMRUN_INSECURE_REGISTRIES", "env.example")
    args = run_parser().parse_args(["--image", "docker://r.example/a", "--entrypoint", "",
                                    "--insecure-registry", "r.example"])
    spec = machine_spec(args)
    assert spec.entrypoint == () and spec.insecure_registries == ("r.example", "env.example")
    args = run_parser().parse_args(["--entrypoint", "/bin/tini"])
    assert machine_spec(args).entrypoint == ("/bin/tini",)
    assert machine_spec(run_parser().parse_args([])).entrypoint is None
