"""cloud-init NoCloud seeds: check user-data, add vmrun's own config, write the `cidata` ISO.

vmrun never appends text to the user's user-data: a `#cloud-config` document is parsed,
merged and dumped again; anything else (a script, a MIME multipart, ...) is wrapped in a
MIME multipart next to a `text/cloud-config` part that cloud-init merges by appending lists.
"""

from __future__ import annotations

import email
import os
import secrets
import tempfile
from collections.abc import Mapping
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]

from vmrun.errors import UsageError
from vmrun.iso9660 import write_iso

VOLUME_ID = "cidata"
MERGE_HOW = "list(append)+dict(recurse_array)+str()"
_KINDS_HINT = ("user-data starts with '#cloud-config', '#!' (a script), '#include', "
               "'#cloud-boothook', or is a MIME multipart message")


class UserDataKind(StrEnum):
    CLOUD_CONFIG = "cloud-config"
    SCRIPT = "script"
    MULTIPART = "multipart"
    INCLUDE = "include"
    BOOTHOOK = "cloud-boothook"


# The MIME type cloud-init gives each kind when it is one part of a multipart message.
_MIME_SUBTYPE = {
    UserDataKind.CLOUD_CONFIG: "cloud-config",
    UserDataKind.SCRIPT: "x-shellscript",
    UserDataKind.INCLUDE: "x-include-url",
    UserDataKind.BOOTHOOK: "cloud-boothook",
}


def validate_user_data(data: bytes) -> str:
    """The kind of `data` (a `UserDataKind`, which is a str); UsageError if cloud-init
    would not understand it."""
    kind = _kind(data)
    if kind is UserDataKind.CLOUD_CONFIG:
        _cloud_config(data)
    elif kind is UserDataKind.MULTIPART:
        _multipart(data)
    else:
        _text(data, "user-data")
    return kind


def cloud_config_of(data: bytes) -> dict[str, Any] | None:
    """The parsed `#cloud-config` mapping of DATA, or None for other kinds of user-data."""
    return _cloud_config(data) if _kind(data) is UserDataKind.CLOUD_CONFIG else None


def merge_cloud_config(user_data: bytes, extra: Mapping[str, Any]) -> bytes:
    """`user_data` with vmrun's cloud-config `extra` added structurally.

    For `#cloud-config`: lists are appended (user's items first), mappings merged, and the
    user's scalars win. For other kinds: a MIME multipart holding the user's part unchanged
    and a `text/cloud-config` part whose lists cloud-init appends to the user's.
    """
    kind = _kind(user_data)
    if kind is UserDataKind.CLOUD_CONFIG:
        merged = _deep_merge(_cloud_config(user_data), extra, path="")
        return _dump_cloud_config(merged)

    outer = MIMEMultipart()
    if kind is UserDataKind.MULTIPART:
        outer.attach(_multipart(user_data))  # nested as is; cloud-init walks into it
    else:
        outer.attach(_part(_text(user_data, "user-data"), _MIME_SUBTYPE[UserDataKind(kind)]))
    ours = _part(_dump_cloud_config({**extra, "merge_how": MERGE_HOW}).decode("utf-8"),
                 "cloud-config")
    ours["Merge-Type"] = MERGE_HOW
    outer.attach(ours)
    return outer.as_bytes()


def meta_data(
    *,
    instance_id: str | None = None,
    hostname: str | None = None,
    user_meta: bytes | None = None,
) -> bytes:
    """NoCloud meta-data as YAML: `instance-id` and `local-hostname` first, then the
    user's other keys.

    The instance id is `instance_id` if given, else the one in `user_meta`, else a fresh
    `iid-vmrun-<hex>` (a new id makes cloud-init run its per-instance modules again).
    The host name likewise: `hostname`, the user's `local-hostname`, else `vmrun`.
    """
    user: dict[str, Any] = {}
    if user_meta is not None:
        loaded = _yaml(_text(user_meta, "meta-data"), "meta-data")
        if loaded is not None and not isinstance(loaded, dict):
            raise UsageError(f"meta-data is a YAML {type(loaded).__name__}, not a mapping",
                             hint="write meta-data as 'key: value' lines")
        user = dict(loaded or {})
    iid = instance_id or user.pop("instance-id", None) or f"iid-vmrun-{secrets.token_hex(8)}"
    host = hostname or user.pop("local-hostname", None) or "vmrun"
    user.pop("instance-id", None)
    user.pop("local-hostname", None)
    _check_word(str(iid), "instance-id")
    _check_word(str(host), "local-hostname")
    document = {"instance-id": str(iid), "local-hostname": str(host), **user}
    return _dump(document).encode("utf-8")


def validate_network_config(data: bytes) -> None:
    """UsageError unless `data` is a YAML mapping (cloud-init's network config v1 or v2)."""
    loaded = _yaml(_text(data, "network-config"), "network-config")
    if not isinstance(loaded, dict):
        raise UsageError(f"network-config is a YAML {type(loaded).__name__}, not a mapping",
                         hint="network-config starts with 'version: 2' (or 1)")


def instance_id_of(meta: bytes) -> str:
    """The `instance-id` in meta-data written by `meta_data`."""
    return str(yaml.safe_load(meta.decode("utf-8"))["instance-id"])


def write_seed(
    path: Path, *, user_data: bytes, meta_data: bytes, network_config: bytes | None = None,
) -> None:
    """Write a NoCloud seed ISO (label `cidata`) to `path` atomically, mode 0444.

    An existing file at `path` is replaced; callers that must not overwrite check first.
    """
    files = {"user-data": user_data, "meta-data": meta_data}
    if network_config is not None:
        files["network-config"] = network_config
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            write_iso(out, files, volume_id=VOLUME_ID)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o444)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def _kind(data: bytes) -> UserDataKind:
    first = data.split(b"\n", 1)[0].rstrip(b"\r")
    if first.startswith(b"#cloud-config"):
        return UserDataKind.CLOUD_CONFIG
    if first.startswith(b"#!"):
        return UserDataKind.SCRIPT
    if first.startswith(b"#include"):
        return UserDataKind.INCLUDE
    if first.startswith(b"#cloud-boothook"):
        return UserDataKind.BOOTHOOK
    if first.lower().startswith((b"content-type: multipart/", b"mime-version:")):
        return UserDataKind.MULTIPART
    shown = first[:40].decode("utf-8", "replace")
    raise UsageError(f"user-data has an unknown format (first line {shown!r})", hint=_KINDS_HINT)


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{what} is not UTF-8 (byte {error.start})",
                         hint=f"save {what} as UTF-8 text") from None


def _yaml(text: str, what: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        where = f" on line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{what}: YAML error{where}: {problem}",
                         hint=f"check {what}'s indentation and quoting") from None


def _cloud_config(data: bytes) -> dict[str, Any]:
    loaded = _yaml(_text(data, "user-data"), "user-data")
    if loaded is None:
        return {}  # a bare '#cloud-config' line: nothing to do, and cloud-init agrees
    if not isinstance(loaded, dict):
        raise UsageError(f"user-data's cloud-config is a YAML {type(loaded).__name__}, "
                         "not a mapping", hint="cloud-config is 'key: value' at the top level")
    return loaded


def _multipart(data: bytes) -> Message:
    message = email.message_from_bytes(data)
    if message.defects:
        raise UsageError(f"user-data's MIME message is malformed: "
                         f"{type(message.defects[0]).__name__}",
                         hint="build multipart user-data with cloud-init's make-mime")
    parts = message.get_payload() if message.is_multipart() else []
    if not parts:
        raise UsageError("user-data's MIME message has no parts",
                         hint="build multipart user-data with cloud-init's make-mime")
    return message


def _part(text: str, subtype: str) -> MIMEText:
    # ASCII stays readable (7bit); anything else is base64, which cloud-init decodes.
    return MIMEText(text, subtype, "us-ascii" if text.isascii() else "utf-8")


def _dump_cloud_config(config: Mapping[str, Any]) -> bytes:
    return ("#cloud-config\n" + _dump(config)).encode("utf-8")


def _dump(document: Mapping[str, Any]) -> str:
    text: str = yaml.safe_dump(dict(document), sort_keys=False, allow_unicode=True)
    return text


def _deep_merge(user: Mapping[str, Any], extra: Mapping[str, Any], *, path: str) -> dict[str, Any]:
    merged = dict(user)
    for key, ours in extra.items():
        where = f"{path}{key}"
        if key not in merged:
            merged[key] = ours
            continue
        theirs = merged[key]
        if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
            merged[key] = _deep_merge(theirs, ours, path=f"{where}.")
        elif isinstance(ours, list) and isinstance(theirs, list):
            merged[key] = theirs + ours
        elif isinstance(ours, list | Mapping):
            # A scalar would silently drop what vmrun needs (its ssh key, its agent).
            kind = "list" if isinstance(ours, list) else "mapping"
            raise UsageError(f"user-data's cloud-config key {where!r} is a "
                             f"{type(theirs).__name__}, vmrun needs to add a {kind}",
                             hint=f"write {where!r} as a {kind}")
        # else: both scalars (or the user's is a container): the user's value wins
    return merged


def _check_word(value: str, what: str) -> None:
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise UsageError(f"meta-data {what} {value!r} is empty or has spaces",
                         hint=f"use letters, digits, '-' and '.' in {what}")
