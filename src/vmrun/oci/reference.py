"""Image references: docker://[REGISTRY/]REPO[:TAG][@DIGEST], oci:DIR[:TAG], oci-archive:FILE."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmrun.errors import UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"
SCHEMES = ("docker://", "oci:", "oci-archive:")
INSECURE_ENV = "VMRUN_INSECURE_REGISTRIES"

# The distribution project's reference grammar (reference/regexp.go).
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_LABEL = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?")
_NAME_MAX = 255
_HUB_NAMES = (DOCKER_HUB, "index.docker.io", DOCKER_HUB_API)
_LAYOUT_TAG = re.compile(r"[A-Za-z0-9._-][A-Za-z0-9._:@+-]{0,127}")


@dataclass(frozen=True)
class RegistryRef:
    """An image in a registry: docker://REGISTRY/REPOSITORY[:TAG][@DIGEST]."""

    registry: str  # host[:port], as the user means it (docker.io for Docker Hub)
    repository: str
    tag: str | None = None
    digest: str | None = None  # "sha256:HEX"

    @property
    def api_host(self) -> str:
        """The host[:port] that answers the registry API."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What to ask the manifests endpoint for: the digest when given, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        text = f"docker://{self.registry}/{self.repository}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


@dataclass(frozen=True)
class LayoutRef:
    """An OCI image layout directory, and the ref.name of one of its manifests."""

    path: Path
    tag: str | None = None

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag is not None else "")


@dataclass(frozen=True)
class ArchiveRef:
    """A tar file holding an OCI image layout."""

    path: Path
    tag: str | None = None

    def __str__(self) -> str:
        return f"oci-archive:{self.path}" + (f":{self.tag}" if self.tag is not None else "")


ImageRef = RegistryRef | LayoutRef | ArchiveRef


def is_image_reference(text: str) -> bool:
    """Whether TEXT names an OCI image (it starts with one of the SCHEMES)."""
    return text.startswith(SCHEMES)


def parse_reference(text: str) -> ImageRef:
    """TEXT as a typed reference; UsageError naming what is wrong otherwise."""
    if text.startswith("docker://"):
        return _parse_docker(text, text[len("docker://"):])
    if text.startswith("oci-archive:"):
        path, tag = _split_path(text, text[len("oci-archive:"):])
        return ArchiveRef(path, tag)
    if text.startswith("oci:"):
        path, tag = _split_path(text, text[len("oci:"):])
        return LayoutRef(path, tag)
    raise UsageError(
        f"bad image reference {text!r}: no scheme",
        hint="use docker://REPO[:TAG], oci:DIR[:TAG] or oci-archive:FILE",
    )


def _bad(text: str, why: str) -> UsageError:
    return UsageError(f"bad image reference {text!r}: {why}",
                      hint="docker://[REGISTRY/]REPO[:TAG][@sha256:DIGEST]")


def _parse_docker(text: str, rest: str) -> RegistryRef:
    if "\x00" in rest or any(c.isspace() for c in rest):
        raise _bad(text, "contains whitespace or NUL")
    name, at, digest = rest.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise _bad(text, "the digest must be sha256: and 64 lowercase hex digits")
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise _bad(text, f"bad tag {tag!r}")
    registry, repository = _split_registry(text, name)
    if not _REPOSITORY.fullmatch(repository):
        raise _bad(text, f"bad repository {repository!r} (lowercase letters, digits, . _ - /)")
    if len(registry) + 1 + len(repository) > _NAME_MAX:
        raise _bad(text, f"name longer than {_NAME_MAX} characters")
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if tag is None and not at:
        tag = DEFAULT_TAG
    return RegistryRef(registry, repository, tag, digest if at else None)


def _split_registry(text: str, name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if not name:
        raise _bad(text, "no repository")
    if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        if not _HOST.fullmatch(first):
            raise _bad(text, f"bad registry {first!r}")
        registry = first.lower()
        return (DOCKER_HUB if registry in _HUB_NAMES else registry), rest
    return DOCKER_HUB, name


def _split_path(text: str, rest: str) -> tuple[Path, str | None]:
    if "\x00" in rest:
        raise UsageError(f"bad image reference {text!r}: contains NUL")
    path, colon, tag = rest.rpartition(":")
    if not colon or "/" in tag or not path:
        path, tag = rest, ""
    elif not _LAYOUT_TAG.fullmatch(tag):
        raise UsageError(f"bad image reference {text!r}: bad tag {tag!r}")
    if not path:
        raise UsageError(f"bad image reference {text!r}: no path",
                         hint="use oci:DIR[:TAG] or oci-archive:FILE[:TAG]")
    return Path(path), tag or None


def insecure_registries(given: Sequence[str], environ: Mapping[str, str]) -> tuple[str, ...]:
    """--insecure-registry values, then $VMRUN_INSECURE_REGISTRIES's (comma-separated)."""
    from_env = [word.strip() for word in environ.get(INSECURE_ENV, "").split(",")]
    return tuple(dict.fromkeys(word.lower() for word in (*given, *from_env) if word))


def is_insecure(registry: str, insecure: Sequence[str]) -> bool:
    """Whether REGISTRY (host[:port]) is named in INSECURE: exactly, or by its host alone."""
    host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
    return registry.lower() in insecure or host.lower() in insecure
