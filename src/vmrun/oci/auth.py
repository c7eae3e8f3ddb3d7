"""Registry credentials from the user's docker config.json or containers auth.json."""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

from vmrun.oci.reference import DOCKER_HUB

_HUB_KEYS = {DOCKER_HUB, "index.docker.io", "registry-1.docker.io"}
_AUTH_FILE_LIMIT = 1 << 20


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials({self.username!r}, <hidden>)"


def auth_files(env: dict[str, str] | None = None, home: Path | None = None) -> list[Path]:
    """Where credentials are looked for, in order: containers' auth.json files, then docker's."""
    env = dict(os.environ) if env is None else env
    home = Path(env.get("HOME", str(Path.home()))) if home is None else home
    files: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    files.append(home / ".config" / "containers" / "auth.json")
    docker = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else home / ".docker"
    files.append(docker / "config.json")
    return files


def _key(raw: str) -> str:
    """An `auths` key as host[/namespace]: docker writes https://index.docker.io/v1/."""
    key = raw.strip()
    for scheme in ("https://", "http://"):
        key = key.removeprefix(scheme)
    key = key.rstrip("/")
    for suffix in ("/v1", "/v2"):
        key = key.removesuffix(suffix)
    host, slash, rest = key.partition("/")
    host = DOCKER_HUB if host.lower() in _HUB_KEYS else host.lower()
    return host + slash + rest


def _decode(entry: object) -> Credentials | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("auth"), str):
        return None
    try:
        user, colon, password = base64.b64decode(entry["auth"], validate=True).decode(
            "utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return Credentials(user, password) if colon and user else None


def _entries(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            document = json.loads(f.read(_AUTH_FILE_LIMIT))
    except (OSError, ValueError):
        return {}
    auths = document.get("auths") if isinstance(document, dict) else None
    return auths if isinstance(auths, dict) else {}


def find_credentials(registry: str, repository: str, files: list[Path] | None = None,
                     ) -> Credentials | None:
    """The credentials for REGISTRY/REPOSITORY: the most specific key of the first file
    that has one (containers allow keys like quay.io/org); None for anonymous access."""
    registry = DOCKER_HUB if registry.lower() in _HUB_KEYS else registry.lower()
    wanted = f"{registry}/{repository}"
    for path in auth_files() if files is None else files:
        best: tuple[int, Credentials] | None = None
        for raw, entry in _entries(path).items():
            key = _key(str(raw))
            if key != registry and not wanted.startswith(f"{key}/") and key != wanted:
                continue
            credentials = _decode(entry)
            if credentials is not None and (best is None or len(key) > best[0]):
                best = (len(key), credentials)
        if best is not None:
            return best[1]
    return None
