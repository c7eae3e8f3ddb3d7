"""The host side of the agent protocol: encoding requests, reading what the guest sends.

The guest agent (guest/agent.sh) documents the wire format. Everything the guest sends
is treated as data: status lines are bounded and parsed strictly, and output streams
are only copied, never interpreted except to find the end-of-command token.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from enum import StrEnum

from vmrun.errors import ChannelLost

MAX_STATUS_LINE = 64

# Why the agent could not set up the request's root ("fail REASON" instead of "started").
ROOT_FAILURES: dict[str, str] = {
    "root-absent": "did not appear in the guest",
    "root-mount": "holds no filesystem the guest can mount (ext4, xfs)",
    "root-shell": "has no /bin/sh, so it is no root filesystem",
    "root-squashfs": "could not be mounted as a squashfs root under an overlay",
}
SQUASHFS_ROOT = "squashfs"  # Request.root for an OCI image's root (the VM's only disk)
_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/._-+,:@%=")


def escape(value: str) -> str:
    """Encode VALUE for the agent's `printf %b`: every byte outside a safe set as \\0ooo."""
    return "".join(chr(b) if b in _PLAIN else f"\\0{b:03o}" for b in os.fsencode(value))


class StdinMode(StrEnum):
    NULL = "null"
    PORT = "port"  # streamed over the stdin port; EOF when the host closes it
    FILE = "file"  # given up front: sent on the control port after the request


@dataclass(frozen=True)
class Mount:
    kind: str  # 9p | virtiofs
    tag: str
    readonly: bool
    path: str


@dataclass(frozen=True)
class Request:
    argv: tuple[str, ...]
    cwd: str
    env: tuple[tuple[str, str], ...] = ()
    token: str = ""
    stdin: StdinMode = StdinMode.NULL
    stdin_data: bytes = b""
    tty: tuple[int, int] | None = None  # rows, cols
    mounts: tuple[Mount, ...] = ()
    net: bool = False
    disk: bool = False
    # The commands' root (first request only): /dev/vdaN, or SQUASHFS_ROOT for /dev/vda
    # as a read-only squashfs under a per-run overlay.
    root: int | str | None = None
    user: tuple[int, int] | None = None  # uid, gid to run the command as (-u, OCI User)
    # After a warm start (first request only): hex entropy for the kernel's generator, and
    # the host's time in whole seconds.
    seed: str | None = None
    clock: int | None = None


def new_token() -> str:
    # Printable, since a shell variable in the agent holds it; 128 random bits make a
    # collision with real output practically impossible.
    return "<<vmrun-end-" + secrets.token_hex(16) + ">>"


def encode_request(request: Request) -> bytes:
    lines: list[str] = []
    if request.seed is not None:
        if not request.seed or any(c not in "0123456789abcdef" for c in request.seed):
            raise ValueError("the seed must be lowercase hex")
        lines.append(f"seed {request.seed}")
    if request.clock is not None:
        lines.append(f"clock {int(request.clock)}")
    if request.disk:
        lines.append("disk")
    if request.root is not None:
        # Before the mounts: the share is then mounted inside the root.
        lines.append(f"root {_root_word(request.root)}")
    for mount in request.mounts:
        mode = "ro" if mount.readonly else "rw"
        lines.append(f"mount {mount.kind} {mount.tag} {mode} {escape(mount.path)}")
    if request.net:
        lines.append("net user")
    lines.append(f"cwd {escape(request.cwd)}")
    lines += [f"env {escape(key + '=' + value)}" for key, value in request.env]
    lines += [f"arg {escape(arg)}" for arg in request.argv]
    if request.user is not None:
        uid, gid = request.user
        if not (0 <= uid < 1 << 32 and 0 <= gid < 1 << 32):
            raise ValueError(f"bad user {uid}:{gid}")
        lines.append(f"user {uid} {gid}")
    lines.append(f"token {request.token}")
    lines.append(f"stdin {request.stdin} {len(request.stdin_data)}")
    if request.tty is not None:
        lines.append(f"tty {request.tty[0]} {request.tty[1]}")
    lines.append("run")
    payload = ("\n".join(lines) + "\n").encode()
    if request.stdin == StdinMode.FILE:
        payload += request.stdin_data
    return payload


def _root_word(root: int | str) -> str:
    if isinstance(root, str):
        if root != SQUASHFS_ROOT:
            raise ValueError(f"bad root {root!r}")
        return root
    if not 1 <= root <= 255:
        raise ValueError(f"bad root partition number {root}")
    return str(root)


class TokenScanner:
    """Passes a stream through until TOKEN; holds back bytes that might start it."""

    def __init__(self, token: bytes) -> None:
        self.token = token
        self.held = b""
        self.done = False
        self.after = b""  # what came after the token in the same read

    def feed(self, data: bytes) -> bytes:
        """Return the bytes that surely belong to the output; sets .done at the token."""
        if self.done:
            return b""
        data = self.held + data
        index = data.find(self.token)
        if index >= 0:
            self.done = True
            self.held = b""
            self.after = data[index + len(self.token):]
            return data[:index]
        keep = 0
        for size in range(min(len(self.token) - 1, len(data)), 0, -1):
            if self.token.startswith(data[-size:]):
                keep = size
                break
        self.held = data[len(data) - keep:] if keep else b""
        return data[: len(data) - keep]


@dataclass
class StatusReader:
    """Splits the status port into bounded lines."""

    buffer: bytes = b""

    def feed(self, data: bytes) -> list[str]:
        self.buffer += data
        lines: list[str] = []
        while b"\n" in self.buffer:
            raw, self.buffer = self.buffer.split(b"\n", 1)
            lines.append(parse_status_line(raw))
        if len(self.buffer) > MAX_STATUS_LINE:
            raise ChannelLost("the guest sent a malformed status message (too long)")
        return lines


def parse_status_line(raw: bytes) -> str:
    if len(raw) > MAX_STATUS_LINE:
        raise ChannelLost("the guest sent a malformed status message (too long)")
    try:
        line = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ChannelLost("the guest sent a malformed status message (not ASCII)") from None
    if line in ("ready", "started", "synced"):
        return line
    word, _, number = line.partition(" ")
    if word == "exit" and number.isdigit() and 0 <= int(number) <= 255:
        return line
    if word == "fail" and number in ROOT_FAILURES:
        return line
    raise ChannelLost(f"the guest sent an unknown status message {line[:32]!r}")
