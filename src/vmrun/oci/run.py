"""Running an OCI image: its root image for the VM, and its config applied to each command.

Like `docker run`: the image's Env comes first and -e on top; the command given replaces
Cmd, --entrypoint replaces Entrypoint (an empty one clears it), no command runs the
image's default; User (uid, uid:gid, name, name:group) is resolved on the host from the
image's /etc/passwd and /etc/group and the guest gets numeric ids only; the command
starts in the shared directory, or without a share in the image's WorkingDir.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmrun.errors import ImageError, UsageError
from vmrun.oci.disks import PulledDisk
from vmrun.oci.pull import RootImage, ensure_image
from vmrun.oci.reference import ImageRef, RegistryRef, is_insecure, parse_reference
from vmrun.progress import Progress
from vmrun.spec import Boot, Command, MachineSpec, User

Notice = Callable[[str], None]

RDSQUASHFS = "rdsquashfs"
# /etc/passwd or /etc/group bigger than this is not read (a hostile image's file).
_ACCOUNTS_LIMIT = 4 << 20


@dataclass(frozen=True)
class Identity:
    """Who commands run as in the image: numeric ids, and the home directory for HOME."""

    uid: int = 0
    gid: int = 0
    home: str = "/root"


@dataclass(frozen=True)
class OciRun:
    """An OCI image made ready to run: its root image and what its config asks for."""

    image: RootImage
    entrypoint: tuple[str, ...]  # the image's, or --entrypoint's
    identity: Identity


def prepare(spec: MachineSpec, *, arch: str, notice: Notice,
            progress: Progress | None = None) -> OciRun | None:
    """Pull and convert SPEC's image (unless cached) and read what its config asks for;
    None when the reference is a VM disk (pulled into the store, to attach like any disk:
    see vmrun.images.attach)."""
    assert spec.image is not None
    ref = parse_reference(spec.image)
    image = ensure_image(ref, arch=arch, progress=progress, notice=notice,
                         insecure=reference_insecure(ref, spec.insecure_registries))
    if isinstance(image, PulledDisk):
        return None
    if spec.boot not in (Boot.AUTO, Boot.FAST):
        raise UsageError(f"--boot {spec.boot} cannot run an OCI image",
                         hint="an OCI image always boots vmrun's kernel (--boot fast)")
    config = image.config
    entrypoint = spec.entrypoint if spec.entrypoint is not None else (config.entrypoint or ())
    identity = resolve_user(config.user, lambda name: read_image_file(image.path, name),
                            str(ref))
    return OciRun(image=image, entrypoint=entrypoint, identity=identity)


def reference_insecure(ref: ImageRef, insecure_registries: Sequence[str]) -> bool:
    """Whether REF's registry is to be spoken to over plain HTTP though not on loopback."""
    return isinstance(ref, RegistryRef) and is_insecure(ref.registry, insecure_registries)


def command_argv(entrypoint: Sequence[str], cmd: Sequence[str] | None,
                 argv: Sequence[str]) -> tuple[str, ...]:
    """ENTRYPOINT followed by ARGV, or by the image's CMD when ARGV is empty."""
    words = (*entrypoint, *(argv or cmd or ()))
    if not words:
        raise UsageError("no command given, and the image has no default command "
                         "(Entrypoint or Cmd)", hint="vmrun --image REF -- COMMAND [ARGS...]")
    return words


def image_env(config_env: Sequence[str], identity: Identity,
              env: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """HOME for the user, the image's Env over it, ENV (-e) over both."""
    merged: dict[str, str] = {"HOME": identity.home}
    for entry in config_env:
        key, sep, value = entry.partition("=")
        if key and sep:
            merged[key] = value
    merged.update(env)
    return tuple(merged.items())


def apply(run: OciRun, command: Command, *, shared: bool) -> Command:
    """COMMAND as the image's config makes it: argv, env and, without a share, cwd."""
    config = run.image.config
    cwd = command.cwd
    if cwd is None and not shared:
        cwd = config.working_dir or "/"
    identity, user = run.identity, command.user
    if user is not None:
        # -u: the group (when not given) and home from the image's /etc/passwd, as docker.
        wanted = str(user.uid) if user.gid is None else f"{user.uid}:{user.gid}"
        identity = resolve_user(wanted, lambda name: read_image_file(run.image.path, name),
                                "")
        user = User(identity.uid, identity.gid)
    return dataclasses.replace(
        command, argv=command_argv(run.entrypoint, config.cmd, command.argv),
        env=image_env(config.env, identity, command.env), cwd=cwd, user=user)


# ---- User ---------------------------------------------------------------------------------

def resolve_user(user: str, read: Callable[[str], str | None], what: str) -> Identity:
    """USER from an image config as numeric ids; READ gives the image's /etc/passwd and
    /etc/group (None when absent). Names missing from them are an ImageError."""
    if not user:
        return Identity()
    name, _, group = user.partition(":")
    passwd = _entries(read("/etc/passwd"))
    entry = next((e for e in passwd if (e[2] if name.isdigit() else e[0]) == name), None)
    if name.isdigit():
        uid = int(name)
    elif entry is not None and entry[2].isdigit():
        uid = int(entry[2])
    else:
        raise ImageError(f"image {what}: user {name!r} is not in its /etc/passwd")
    home = entry[5] if entry is not None and len(entry) > 5 and entry[5] else "/"
    if not group:
        gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    elif group.isdigit():
        gid = int(group)
    else:
        found = next((e for e in _entries(read("/etc/group")) if e[0] == group), None)
        if found is None or not found[2].isdigit():
            raise ImageError(f"image {what}: group {group!r} is not in its /etc/group")
        gid = int(found[2])
    if uid >= 1 << 32 or gid >= 1 << 32:
        raise ImageError(f"image {what}: user {user!r} is out of range")
    return Identity(uid, gid, "/root" if uid == 0 and home == "/" else home)


def _entries(text: str | None) -> list[list[str]]:
    rows = []
    for line in (text or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and not line.startswith("#"):
            rows.append(fields)
    return rows


def read_image_file(image: Path, name: str) -> str | None:
    """The text of NAME in the squashfs IMAGE, or None when it has no such regular file."""
    if shutil.which(RDSQUASHFS) is None:
        raise ImageError("rdsquashfs not found; it reads the image's /etc/passwd",
                         hint="install squashfs-tools-ng")
    try:
        result = subprocess.run([RDSQUASHFS, "--cat", name, str(image)], capture_output=True,
                                timeout=60, check=False)
    except subprocess.TimeoutExpired:
        return None
    if result.returncode != 0 or len(result.stdout) > _ACCOUNTS_LIMIT:
        return None
    return result.stdout.decode("utf-8", "replace")

