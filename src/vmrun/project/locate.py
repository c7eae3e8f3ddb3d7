"""Find the line of a TOML key (tomllib gives none) by scanning the file's text."""

from __future__ import annotations

import re
from collections.abc import Sequence

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_HEADER = re.compile(r"^\s*\[(\[)?(?P<body>[^\]]*)\]\]?")


def _split_dotted(text: str) -> list[str] | None:
    """The parts of a dotted TOML key (bare or quoted), or None when TEXT is not one."""
    parts: list[str] = []
    rest = text.strip()
    while rest:
        if rest[0] in "\"'":
            end = rest.find(rest[0], 1)
            if end < 0:
                return None
            parts.append(rest[1:end])
            rest = rest[end + 1:].lstrip()
        else:
            match = _BARE.match(rest)
            if match is None:
                return None
            parts.append(match.group())
            rest = rest[match.end():].lstrip()
        if rest.startswith("."):
            rest = rest[1:].lstrip()
        elif rest:
            return None
    return parts


def _key_of(line: str) -> list[str] | None:
    """The dotted key a `key = value` line sets, or None."""
    depth_quote = ""
    for at, char in enumerate(line):
        if depth_quote:
            if char == depth_quote:
                depth_quote = ""
        elif char in "\"'":
            depth_quote = char
        elif char == "=":
            return _split_dotted(line[:at])
        elif char == "#":
            return None
    return None


def key_lines(text: str) -> list[tuple[int, tuple[str, ...]]]:
    """(line number, full key path) for each table header and key line of TEXT; lines
    inside multi-line strings are skipped."""
    found: list[tuple[int, tuple[str, ...]]] = []
    table: tuple[str, ...] = ()
    in_string = ""
    for number, line in enumerate(text.splitlines(), 1):
        if in_string:
            if line.count(in_string) % 2 == 1:
                in_string = ""
            continue
        header = _HEADER.match(line)
        if header is not None and "=" not in line.split("]")[0]:
            parts = _split_dotted(header.group("body"))
            if parts is not None:
                table = tuple(parts)
                found.append((number, table))
            continue
        key = _key_of(line)
        if key is not None:
            found.append((number, table + tuple(key)))
        for quote in ('"""', "'''"):
            if line.count(quote) % 2 == 1:
                in_string = quote
    return found


def locate(text: str, path: Sequence[str]) -> int | None:
    """The line that sets PATH (like ("profile", "py", "image")): the key's own line, else
    the line of its nearest enclosing table or key; None when nothing of it is found."""
    wanted = tuple(path)
    best: tuple[int, int] | None = None  # (matched length, line)
    for number, key in key_lines(text):
        if wanted[:len(key)] == key and (best is None or len(key) > best[0]):
            best = (len(key), number)
    return None if best is None else best[1]
