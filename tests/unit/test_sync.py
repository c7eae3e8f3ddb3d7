"""Copying in and out: rsync-style rules, pack/walk, the guest's sh+tar scripts (run here with
the host's sh and GNU tar, and with busybox), and unpacking hostile output from the guest."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vmrun.errors import UsageError, VmrunError
from vmrun.sync import (
    CollectReport,
    Limits,
    PackReport,
    Rule,
    TransferError,
    guest_pack_argv,
    guest_unpack_argv,
    is_selected,
    pack,
    parse_rules,
    unpack_collected,
    walk,
)

BUSYBOX = Path("/bin/busybox")
needs_busybox = pytest.mark.skipif(not BUSYBOX.exists(), reason="needs /bin/busybox")


def rules(*pairs: str) -> tuple[Rule, ...]:
    """rules("+src/***", "-*"): "+" includes, "-" excludes."""
    return parse_rules([("include" if p[0] == "+" else "exclude", p[1:]) for p in pairs])


# --- pattern semantics -----------------------------------------------------------------

PATTERN_CASES: list[tuple[tuple[str, ...], str, bool, bool]] = [
    # src/*** then *: src and everything beneath it, nothing else
    (("+src/***", "-*"), "src", True, True),
    (("+src/***", "-*"), "src/a.py", False, True),
    (("+src/***", "-*"), "src/deep/er/x.c", False, True),
    (("+src/***", "-*"), "README", False, False),
    (("+src/***", "-*"), "docs", True, False),
    (("+src/***", "-*"), "docs/src", True, False),   # docs itself is excluded
    (("+src/***", "-*"), "src", False, False),       # "src/***" names a directory
    # anchored at the root of the transfer
    (("-/build",), "build", True, False),
    (("-/build",), "build", False, False),
    (("-/build",), "build/x.o", False, False),
    (("-/build",), "sub/build", True, True),
    (("-/build",), "builds", True, True),
    # no "/": the last component at any depth
    (("-*.pyc",), "a.pyc", False, False),
    (("-*.pyc",), "x/y/a.pyc", False, False),
    (("-*.pyc",), "a.pyc.txt", False, True),
    (("-*.pyc",), "pyc", False, True),
    # trailing "/": directories only
    (("-__pycache__/",), "__pycache__", True, False),
    (("-__pycache__/",), "__pycache__", False, True),
    (("-__pycache__/",), "a/b/__pycache__", True, False),
    (("-__pycache__/",), "a/__pycache__/m.pyc", False, False),
    (("-build/",), "build", False, True),
    # "**" crosses "/", "*" does not; an inner "/" matches the trailing components
    (("-docs/**/*.md",), "docs/a/b.md", False, False),
    (("-docs/**/*.md",), "docs/a/b/c.md", False, False),
    (("-docs/**/*.md",), "x/docs/a/b.md", False, False),
    (("-docs/**/*.md",), "docs/b.md", False, True),  # like rsync: "/**/" needs a directory
    (("-docs/**/*.md",), "docs/a/b.txt", False, True),
    (("-/src/*.py",), "src/a.py", False, False),
    (("-/src/*.py",), "src/sub/a.py", False, True),
    (("-foo/bar",), "foo/bar", False, False),
    (("-foo/bar",), "x/foo/bar", False, False),
    (("-foo/bar",), "xfoo/bar", False, True),
    (("-**.log",), "a/b/c.log", False, False),
    # "?" and classes, none of which matches "/"
    (("-file?.txt",), "file1.txt", False, False),
    (("-file?.txt",), "file10.txt", False, True),
    (("-[ab].c",), "a.c", False, False),
    (("-[ab].c",), "c.c", False, True),
    (("-[!ab].c",), "c.c", False, False),
    (("-[!ab].c",), "a.c", False, True),
    (("-[0-9]*",), "7up", False, False),
    (("-a?b",), "a/b", False, True),
    (("-/a[/]b",), "a/b", False, True),
    (("-\\*",), "*", False, False),
    (("-\\*",), "x", False, True),
    # first match wins
    (("+keep.log", "-*.log"), "keep.log", False, True),
    (("+keep.log", "-*.log"), "other.log", False, False),
    (("-*.log", "+keep.log"), "keep.log", False, False),
    # an excluded directory is not descended into, whatever the later rules say
    (("-build/", "+*.o"), "build/x.o", False, False),
    (("+src/a.py", "-*"), "src/a.py", False, False),
    (("+src/", "+src/a.py", "-*"), "src/a.py", False, True),
    # no match: included
    ((), "anything/at/all", False, True),
    (("-nothing",), "something", True, True),
]


@pytest.mark.parametrize(("pairs", "path", "is_dir", "expected"), PATTERN_CASES)
def test_is_selected(pairs: tuple[str, ...], path: str, is_dir: bool, expected: bool) -> None:
    assert is_selected(path, is_dir, rules(*pairs)) is expected


def test_parse_rules_keeps_order_and_kind() -> None:
    assert parse_rules([("include", "src/***"), ("exclude", "*")]) == (
        Rule(include=True, pattern="src/***"), Rule(include=False, pattern="*"))


@pytest.mark.parametrize(("kind", "pattern", "message"), [
    ("exclude", "", "empty pattern"),
    ("exclude", "/", "empty pattern"),
    ("include", "a/../b", "'..'"),
    ("include", "..", "'..'"),
    ("exclude", "../x", "'..'"),
    ("exclude", "a\0b", "NUL"),
    ("exclude", "[z-a]", "bad pattern"),
    ("remove", "x", "unknown rule kind"),
])
def test_parse_rules_refuses(kind: str, pattern: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        parse_rules([(kind, pattern)])
    assert "\n" not in str(info.value)


NAME = st.text(st.sampled_from("abcxyz019._- "), min_size=1, max_size=8).filter(
    lambda name: name not in (".", ".."))


@given(st.lists(NAME, min_size=1, max_size=4))
def test_literal_pattern_matches_only_that_name(parts: list[str]) -> None:
    assume(parts[-1] + "x" not in parts)
    path = "/".join(parts)
    assert not is_selected(path, False, rules("-" + parts[-1]))
    assert not is_selected(path, False, rules("-/" + path))
    assert is_selected(path + "x", False, rules("-/" + path))
    assert is_selected(path, False, rules("-" + parts[-1] + "x"))


@given(st.lists(NAME, min_size=1, max_size=4), st.booleans())
def test_double_star_matches_everything(parts: list[str], is_dir: bool) -> None:
    path = "/".join(parts)
    assert not is_selected(path, is_dir, rules("-**"))
    assert is_selected(path, is_dir, rules("+**", "-*"))
    # An excluded ancestor excludes everything under it.
    assert not is_selected(path + "/leaf", is_dir, rules("-/" + parts[0] + "/"))


# --- walk and pack ---------------------------------------------------------------------


def make_tree(root: Path) -> None:
    """A project with a bit of everything walk() and pack() must tell apart."""
    (root / "src/pkg/__pycache__").mkdir(parents=True)
    (root / "build").mkdir()
    (root / "src/a.py").write_text("print('a')\n")
    (root / "src/pkg/b.py").write_text("b = 1\n")
    (root / "src/pkg/__pycache__/b.cpython-311.pyc").write_bytes(b"\0pyc")
    (root / "build/out.o").write_bytes(b"\x7fELF")
    (root / "README").write_text("readme\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o4755)
    (root / "secret").write_text("s\n")
    (root / "secret").chmod(0o600)
    (root / "link").symlink_to("src/a.py")
    (root / "dirlink").symlink_to("src")          # must not be descended into
    (root / "abslink").symlink_to("/etc/passwd")  # copying in trusts the project
    os.link(root / "README", root / "hardlink")
    os.mkfifo(root / "fifo")
    (root / "empty dir").mkdir()


def test_walk_order_selection_and_special_files(tmp_path: Path) -> None:
    make_tree(tmp_path)
    assert list(walk(tmp_path, rules("-__pycache__/", "-/build"))) == [
        "README", "abslink", "dirlink", "empty dir", "hardlink", "link", "run.sh", "secret",
        "src", "src/a.py", "src/pkg", "src/pkg/b.py",
    ]
    assert list(walk(tmp_path, rules("+src/***", "-*"))) == [
        "src", "src/a.py", "src/pkg", "src/pkg/__pycache__",
        "src/pkg/__pycache__/b.cpython-311.pyc", "src/pkg/b.py",
    ]


def test_walk_agrees_with_is_selected(tmp_path: Path) -> None:
    make_tree(tmp_path)
    chosen = rules("-*.pyc", "+src/***", "+README", "-*")
    everything = list(walk(tmp_path, ()))
    expected = [path for path in everything
                if is_selected(path, (tmp_path / path).is_dir()
                               and not (tmp_path / path).is_symlink(), chosen)]
    assert list(walk(tmp_path, chosen)) == expected


def test_walk_refuses_a_file_as_root(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(UsageError, match="not a directory"):
        list(walk(tmp_path / "f", ()))


def read_tar(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {member.name: member for member in tar.getmembers()}


def read_tar_contents(data: bytes) -> dict[str, bytes]:
    contents: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            file = tar.extractfile(member) if member.isreg() else None
            if file is not None:
                contents[member.name] = file.read()
    return contents


def test_pack_writes_links_modes_and_owners(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    make_tree(root)
    out = io.BytesIO()
    report = pack(root, rules("-__pycache__/"), out)
    members = read_tar(out.getvalue())
    assert list(members) == list(walk(root, rules("-__pycache__/")))
    assert "fifo" not in members
    assert not any(name.startswith("dirlink/") for name in members)
    assert members["link"].issym() and members["link"].linkname == "src/a.py"
    assert members["dirlink"].issym() and members["dirlink"].linkname == "src"
    assert members["abslink"].linkname == "/etc/passwd"
    assert members["hardlink"].isreg()  # a file of its own, not a hard link
    assert members["run.sh"].mode == 0o755  # setuid dropped
    assert members["secret"].mode == 0o600
    assert members["src"].isdir()
    for member in members.values():
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
    contents = read_tar_contents(out.getvalue())
    assert contents["hardlink"] == contents["README"] == b"readme\n"
    assert contents["build/out.o"] == b"\x7fELF"
    regular = [m for m in members.values() if m.isreg()]
    assert report == PackReport(files=len(members), bytes=sum(m.size for m in regular))


def test_pack_to_a_pipe(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 100_000)
    read_fd, write_fd = os.pipe()
    received: list[bytes] = []

    def drain() -> None:
        with os.fdopen(read_fd, "rb") as reader:
            received.append(reader.read())

    thread = threading.Thread(target=drain)
    thread.start()
    with os.fdopen(write_fd, "wb") as writer:
        pack(tmp_path, (), writer)
    thread.join()
    assert read_tar_contents(received[0]) == {"f": b"x" * 100_000}


def test_pack_names_that_are_long_or_not_utf8(tmp_path: Path) -> None:
    long = "d" * 120 + "/" + "f" * 200
    (tmp_path / long).parent.mkdir()
    (tmp_path / long).write_text("long")
    odd = os.fsdecode(b"caf\xe9")
    (tmp_path / odd).write_text("latin-1")
    out = io.BytesIO()
    pack(tmp_path, (), out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue()), encoding="utf-8",
                      errors="surrogateescape") as tar:
        assert set(tar.getnames()) == {"d" * 120, long, odd}


@pytest.mark.parametrize(("limits", "message"), [
    (Limits(max_files=3), "max_files=3 .*at "),
    (Limits(max_file_bytes=5), r"README \(7 bytes\) is over max_file_bytes=5"),
    (Limits(max_bytes=10), "max_bytes=10 at "),
])
def test_pack_limits(tmp_path: Path, limits: Limits, message: str) -> None:
    make_tree(tmp_path)
    out = io.BytesIO()
    with pytest.raises(UsageError, match=message) as info:
        pack(tmp_path, rules("-__pycache__/"), out, limits=limits)
    assert info.value.hint
    assert out.getvalue() == b""  # checked before a byte goes out


# --- the guest's scripts, run here ------------------------------------------------------


@dataclass(frozen=True)
class Shell:
    """How the guest's argv is run here: /bin/sh with GNU tar, or busybox sh with its tar."""

    name: str
    prefix: tuple[str, ...]
    path: str

    def run(self, argv: list[str], cwd: Path, stdin: bytes = b"") -> bytes:
        assert argv[:2] == ["sh", "-c"]
        done = subprocess.run([*self.prefix, *argv[1:]], cwd=cwd, input=stdin,
                              capture_output=True, env={"PATH": self.path}, check=False)
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return done.stdout


def busybox_shell(bin_dir: Path) -> Shell:
    bin_dir.mkdir()
    for applet in ("sh", "tar", "mkdir", "dd", "ls"):
        (bin_dir / applet).symlink_to(BUSYBOX)
    return Shell("busybox", (str(BUSYBOX), "sh"), str(bin_dir))


@pytest.fixture(params=["gnu", pytest.param("busybox", marks=needs_busybox)])
def shell(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Shell:
    if request.param == "gnu":
        tar = shutil.which("tar")
        assert tar is not None
        version = subprocess.run([tar, "--version"], capture_output=True, text=True).stdout
        assert "GNU tar" in version
        return Shell("gnu", ("/bin/sh",), os.environ.get("PATH", "/usr/bin:/bin"))
    shell = busybox_shell(tmp_path_factory.mktemp("busybox") / "bin")
    found = subprocess.run([*shell.prefix, "-c", "command -v tar"], capture_output=True,
                           text=True, env={"PATH": shell.path}).stdout.strip()
    assert found in (shell.path + "/tar", "tar")  # "tar": busybox runs its own applet
    return shell


HOSTILE_FILES = [
    "plain.txt", "with space.txt", "quote'\"s.txt", "$(touch pwned).txt", "`touch pwned`.txt",
    "semi;colon.txt", "new\nline.txt", "-rf", "--help", "-", ".hidden", "*", "-C",
]


def make_guest_dir(root: Path) -> None:
    root.mkdir()
    for name in HOSTILE_FILES:
        (root / name).write_text(name)
    (root / "sub dir").mkdir()
    (root / "sub dir/x.txt").write_text("x")


def normalized(names: Iterator[str] | list[str]) -> set[str]:
    return {name.removeprefix("./") for name in names} - {".", ""}


@pytest.mark.parametrize(("patterns", "expected"), [
    (["*.txt"], {"plain.txt", "with space.txt", "quote'\"s.txt", "$(touch pwned).txt",
                 "`touch pwned`.txt", "semi;colon.txt", "new\nline.txt"}),
    (["-rf", "--help", "-", "-C"], {"-rf", "--help", "-", "-C"}),
    (["sub dir"], {"sub dir", "sub dir/x.txt"}),
    (["sub dir/*"], {"sub dir/x.txt"}),
    (["nothing*", "plain.txt", "also-not-there"], {"plain.txt"}),
    (["plain.txt\n-rf"], {"plain.txt", "-rf"}),
    ([".*"], {".hidden"}),
    (["[*]"], {"*"}),  # a backslash from a variable is not an escape in every sh
    (["."], set(HOSTILE_FILES) | {"sub dir", "sub dir/x.txt"}),
])
def test_guest_pack_argv_matches_literally(
    shell: Shell, tmp_path: Path, patterns: list[str], expected: set[str],
) -> None:
    make_guest_dir(tmp_path / "work dir")
    out = shell.run(guest_pack_argv("work dir", patterns), tmp_path)
    assert normalized(list(read_tar(out))) == expected
    assert not list(tmp_path.rglob("pwned"))


@pytest.mark.parametrize("patterns", [
    ["$(touch pwned)"], ["`touch pwned`"], ["nothing-here*"], ["a;touch pwned"], [],
])
def test_guest_pack_argv_nothing_matched_gives_an_empty_archive(
    shell: Shell, tmp_path: Path, patterns: list[str],
) -> None:
    make_guest_dir(tmp_path / "work")
    out = shell.run(guest_pack_argv("work", patterns), tmp_path)
    assert out == bytes(1024)
    assert read_tar(out) == {}
    assert not list(tmp_path.rglob("pwned"))
    assert unpack_collected(io.BytesIO(out), tmp_path / "back") == CollectReport(0, 0, (), 0)


def test_guest_pack_argv_directory_with_a_leading_dash(shell: Shell, tmp_path: Path) -> None:
    make_guest_dir(tmp_path / "-C $(touch pwned) 'q'")
    out = shell.run(guest_pack_argv("-C $(touch pwned) 'q'", ["plain.txt"]), tmp_path)
    assert list(read_tar(out)) == ["plain.txt"]
    assert not list(tmp_path.rglob("pwned"))
    absolute = shell.run(guest_pack_argv(str(tmp_path / "-C $(touch pwned) 'q'"), ["-rf"]),
                         tmp_path)
    assert list(read_tar(absolute)) == ["-rf"]


def test_guest_argv_pass_values_as_arguments() -> None:
    hostile = "$(touch pwned) `x` 'q' \"d\""
    argv = guest_pack_argv(hostile, [hostile + "*"])
    assert argv[:2] == ["sh", "-c"] and argv[3] == "sh"
    assert argv[4:] == ["./" + hostile, hostile + "*"]
    assert hostile not in argv[2]
    unpack = guest_unpack_argv(hostile)
    assert unpack[:2] == ["sh", "-c"] and unpack[3:] == ["sh", hostile]
    assert hostile not in unpack[2]


@pytest.mark.parametrize("pattern", ["", "/etc", "/", "..", "a/../b", "../x", "ok\n/etc",
                                     "ok\n..", "\n", "a\0b"])
def test_guest_pack_argv_refuses(pattern: str) -> None:
    with pytest.raises(UsageError):
        guest_pack_argv("work", ["fine", pattern])


@pytest.mark.parametrize("dest", ["", "a\0b"])
def test_guest_unpack_argv_refuses(dest: str) -> None:
    with pytest.raises(UsageError):
        guest_unpack_argv(dest)


Snapshot = dict[str, tuple[object, ...]]


def snapshot(root: Path) -> Snapshot:
    """Each entry under ROOT: its type, permission bits and contents or link target."""
    tree: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            relpath = path.relative_to(root).as_posix()
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                tree[relpath] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                tree[relpath] = ("dir", stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                tree[relpath] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return tree


def expected_copy(root: Path, chosen: tuple[Rule, ...]) -> Snapshot:
    """What a copy of ROOT under CHOSEN rules holds: no FIFO, setuid bits dropped."""
    tree = snapshot(root)
    kept: Snapshot = {}
    for relpath in walk(root, chosen):
        entry = tree[relpath]
        if entry[0] == "file":
            entry = ("file", int(str(entry[1])) & 0o777, entry[2])
        kept[relpath] = entry
    return kept


def round_trip_tree(root: Path) -> None:
    make_tree(root)
    for directory in ("src", "src/pkg", "build", "empty dir"):
        (root / directory).chmod(0o755)
    (root / "src/pkg/odd 'name' $(x)\n.txt").write_text("odd")
    (root / ("long" * 40)).write_text("a name over 100 bytes")


def test_round_trip_through_the_guests_unpack(shell: Shell, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    round_trip_tree(source)
    chosen = rules("-__pycache__/")
    stream = io.BytesIO()
    pack(source, chosen, stream)
    guest = tmp_path / "guest"
    guest.mkdir()
    dest = "-in $(touch pwned) 'x'/project"
    shell.run(guest_unpack_argv(dest), guest, stream.getvalue())
    expected = expected_copy(source, chosen)
    assert snapshot(guest / dest) == expected
    assert not list(tmp_path.rglob("pwned"))

    # And back: the guest packs what it has, the host unpacks it, but for the link out.
    out = shell.run(guest_pack_argv(dest, ["*"]), guest)
    back = tmp_path / "back"
    report = unpack_collected(io.BytesIO(out), back)
    del expected["abslink"]
    assert snapshot(back) == expected
    assert report.skipped == ("abslink: symlink to an absolute path (/etc/passwd)",)


def test_round_trip_pack_to_unpack_collected(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    round_trip_tree(source)
    (source / "abslink").unlink()  # results never keep a link out of their directory
    stream = io.BytesIO()
    packed = pack(source, (), stream)
    stream.seek(0)
    report = unpack_collected(stream, tmp_path / "back")
    assert snapshot(tmp_path / "back") == expected_copy(source, ())
    assert (report.files, report.bytes, report.skipped_count) == (packed.files, packed.bytes, 0)


# --- unpack_collected: hostile output from the guest ------------------------------------


@dataclass(frozen=True)
class Entry:
    name: str
    kind: bytes = tarfile.REGTYPE
    data: bytes = b""
    linkname: str = ""
    mode: int = 0o644
    size: int | None = None  # a header's claim, with no data behind it


def tar_bytes(entries: list[Entry], fmt: int = tarfile.PAX_FORMAT, *, end: bool = True) -> bytes:
    out = io.BytesIO()
    tar = tarfile.open(fileobj=out, mode="w", format=fmt)
    for entry in entries:
        info = tarfile.TarInfo(entry.name)
        info.type = entry.kind
        info.linkname = entry.linkname
        info.mode = entry.mode
        info.mtime = 1_700_000_000
        if entry.kind == tarfile.CHRTYPE:
            info.devmajor, info.devminor = 1, 3
        if "\0" in entry.name:  # only a pax record can carry it
            info.pax_headers = {"path": entry.name}
        if entry.size is not None:
            info.size = entry.size
            tar.addfile(info)
        elif entry.kind == tarfile.REGTYPE:
            info.size = len(entry.data)
            tar.addfile(info, io.BytesIO(entry.data))
        else:
            tar.addfile(info)
    if end:
        tar.close()
    return out.getvalue()


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    """DEST and a sibling directory that must stay empty."""
    (tmp_path / "dest").mkdir()
    (tmp_path / "outside").mkdir()
    return tmp_path / "dest", tmp_path / "outside"


def assert_contained(dest: Path, outside: Path) -> None:
    assert list(outside.iterdir()) == []
    assert sorted(path.name for path in dest.parent.iterdir()) == ["dest", "outside"]
    assert not list(dest.rglob(".vmrun-*"))


def test_hostile_corpus(places: tuple[Path, Path]) -> None:
    dest, outside = places
    (dest / "hostlink").symlink_to(outside)  # already on the host, pointing out
    passwd = Path("/etc/passwd").read_bytes()
    ok, refused = [], []

    def good(entry: Entry) -> Entry:
        ok.append(entry.name)
        return entry

    def bad(entry: Entry) -> Entry:
        refused.append(entry.name)
        return entry

    corpus = [
        bad(Entry("../outside/escape", data=b"x")),
        bad(Entry(str(outside / "abs"), data=b"x")),
        bad(Entry("a/../../outside/b", data=b"x")),
        bad(Entry("link", tarfile.SYMTYPE, linkname=str(outside))),
        good(Entry("link/passwd", data=b"harmless")),  # "link" was refused: a plain directory
        bad(Entry("up", tarfile.SYMTYPE, linkname="../outside")),
        bad(Entry("etc", tarfile.SYMTYPE, linkname="/etc")),
        good(Entry("sub", tarfile.DIRTYPE, mode=0o3775)),
        good(Entry("sub/kept.txt", data=b"kept")),
        bad(Entry("sub/escape", tarfile.SYMTYPE, linkname="../../outside")),
        good(Entry("sub/ok", tarfile.SYMTYPE, linkname="../sub/kept.txt")),
        good(Entry("inner", tarfile.SYMTYPE, linkname="sub")),
        bad(Entry("inner/through.txt", data=b"through a link")),
        bad(Entry("tricky", tarfile.SYMTYPE, linkname="sub/../../outside")),
        bad(Entry("hostlink/pwned", data=b"x")),
        bad(Entry("hostlink/deeper/pwned", data=b"x")),
        bad(Entry("hard", tarfile.LNKTYPE, linkname="/etc/passwd")),
        bad(Entry("hard2", tarfile.LNKTYPE, linkname="sub/kept.txt")),
        bad(Entry("null", tarfile.CHRTYPE)),
        bad(Entry("block", tarfile.BLKTYPE)),
        bad(Entry("fifo", tarfile.FIFOTYPE)),
        bad(Entry("nul\0name", data=b"x")),
        bad(Entry("empty", tarfile.SYMTYPE, linkname="")),
        good(Entry("suid", data=b"#!/bin/sh\n", mode=0o4755)),
        good(Entry("sub/kept.txt", data=b"replaced")),
    ]
    report = unpack_collected(io.BytesIO(tar_bytes(corpus)), dest)
    assert_contained(dest, outside)
    assert Path("/etc/passwd").read_bytes() == passwd
    assert report.skipped_count == len(refused)
    assert [line.split(":")[0] for line in report.skipped] == [
        ascii(name) if not name.isprintable() else name for name in refused]
    assert report.files == len(ok)
    assert (dest / "link").is_dir() and not (dest / "link").is_symlink()
    assert (dest / "link/passwd").read_bytes() == b"harmless"
    assert (dest / "sub/kept.txt").read_bytes() == b"replaced"
    assert os.readlink(dest / "sub/ok") == "../sub/kept.txt"
    assert os.readlink(dest / "inner") == "sub"
    assert not (dest / "sub/through.txt").exists()
    assert stat.S_IMODE((dest / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "sub").stat().st_mode) == 0o775
    assert os.readlink(dest / "hostlink") == str(outside)
    for name in ("up", "etc", "tricky", "hard", "hard2", "null", "block", "fifo", "empty"):
        assert not os.path.lexists(dest / name), name
    reasons = {name: reason for name, _, reason in
               (line.partition(": ") for line in report.skipped)}
    assert "symlink on the host" in reasons["hostlink/pwned"]
    assert "hard link" in reasons["hard"]
    assert "FIFO" in reasons["fifo"]
    assert "device" in reasons["null"]


def test_existing_file_replaced_directory_merged(places: tuple[Path, Path]) -> None:
    dest, outside = places
    (dest / "d").mkdir()
    (dest / "d/mine").write_text("mine")
    (dest / "f").write_text("old")
    (dest / "in the way").mkdir()
    (dest / "was a link").symlink_to(outside)
    stream = tar_bytes([Entry("d", tarfile.DIRTYPE, mode=0o755), Entry("d/theirs", data=b"t"),
                        Entry("f", data=b"new"), Entry("in the way", data=b"x"),
                        Entry("was a link", data=b"a file now")])
    report = unpack_collected(io.BytesIO(stream), dest)
    assert (dest / "d/mine").read_text() == "mine"
    assert (dest / "d/theirs").read_text() == "t"
    assert (dest / "f").read_text() == "new"
    assert (dest / "in the way").is_dir()
    assert not (dest / "was a link").is_symlink()
    assert (dest / "was a link").read_text() == "a file now"
    assert report.skipped == ("in the way: a directory is in the way on the host",)
    assert_contained(dest, outside)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_huge_size_is_refused_before_writing(places: tuple[Path, Path], fmt: int) -> None:
    dest, outside = places
    stream = tar_bytes([Entry("small", data=b"s"), Entry("huge", size=1 << 40)], fmt, end=False)
    with pytest.raises(TransferError, match=r"huge \(1099511627776 bytes\).*max_file_bytes"):
        unpack_collected(io.BytesIO(stream), dest)
    assert [path.name for path in dest.iterdir()] == ["small"]
    assert_contained(dest, outside)


def test_max_files(places: tuple[Path, Path]) -> None:
    dest, outside = places
    stream = tar_bytes([Entry(f"f{i:03}", data=b"x") for i in range(200)])
    with pytest.raises(TransferError, match="max_files=100 .*at f100"):
        unpack_collected(io.BytesIO(stream), dest, limits=Limits(max_files=100))
    assert len(list(dest.iterdir())) == 100
    assert_contained(dest, outside)


def test_skipped_entries_count_against_max_files(places: tuple[Path, Path]) -> None:
    dest, outside = places
    stream = tar_bytes([Entry(f"fifo{i}", tarfile.FIFOTYPE) for i in range(20)])
    with pytest.raises(TransferError, match="max_files=10"):
        unpack_collected(io.BytesIO(stream), dest, limits=Limits(max_files=10))
    assert_contained(dest, outside)


def test_max_bytes(places: tuple[Path, Path]) -> None:
    dest, outside = places
    stream = tar_bytes([Entry(f"f{i}", data=bytes(100) + b"x") for i in range(5)])
    with pytest.raises(TransferError, match="max_bytes=350 at f3"):
        unpack_collected(io.BytesIO(stream), dest, limits=Limits(max_bytes=350))
    assert sorted(path.name for path in dest.iterdir()) == ["f0", "f1", "f2"]
    assert (dest / "f0").read_bytes() == bytes(100) + b"x"
    assert_contained(dest, outside)


def test_skipped_list_is_capped(places: tuple[Path, Path]) -> None:
    dest, _ = places
    stream = tar_bytes([Entry(f"dev{i}", tarfile.CHRTYPE) for i in range(30)])
    report = unpack_collected(io.BytesIO(stream), dest)
    assert report.skipped_count == 30
    assert len(report.skipped) == 20
    assert report.skipped[0] == "dev0: device node, not copied"


def whole() -> bytes:
    return tar_bytes([Entry("first", data=b"1" * 600), Entry("second", data=b"2" * 3000),
                      Entry("third", data=b"3")])


@pytest.mark.parametrize(("cut", "message", "written"), [
    (lambda data: b"", "ends before the end-of-archive", []),
    (lambda data: data[:512 * 3 + 1000], "in the middle of second", ["first"]),
    (lambda data: data[:512 * 3 + 300], "in the middle of a header", ["first"]),
    (lambda data: data[:512 * 3 + 512 + 3072 + 1024], "ends before the end-of-archive",
     ["first", "second", "third"]),
    (lambda data: data[:512 * 3 + 20] + b"\xff" + data[512 * 3 + 21:], "bad checksum",
     ["first"]),
    (lambda data: b"garbage" * 100, "bad checksum", []),
])
def test_broken_streams(places: tuple[Path, Path], cut: Callable[[bytes], bytes],
                        message: str, written: list[str]) -> None:
    dest, outside = places
    with pytest.raises(TransferError, match="the guest's tar stream is broken: .*" + message):
        unpack_collected(io.BytesIO(cut(whole())), dest)
    # What was complete stays; no partial file under its final name, no temp file.
    assert sorted(path.name for path in dest.iterdir()) == written
    assert_contained(dest, outside)


def test_long_names_in_every_format(places: tuple[Path, Path]) -> None:
    dest, _ = places
    long = "l" * 150 + "/" + "n" * 150
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        ustar = fmt == tarfile.USTAR_FORMAT
        name = "p" * 120 + "/" + "u" * 90 if ustar else long
        target = "n" * (90 if ustar else 150)
        stream = tar_bytes([Entry(name, data=b"deep"),
                            Entry(name + "-link", tarfile.SYMTYPE, linkname=target)], fmt)
        report = unpack_collected(io.BytesIO(stream), dest)
        assert report.skipped_count == 0, report
        assert (dest / name).read_bytes() == b"deep"
        assert os.readlink(dest / (name + "-link")) == target


needs_gnu_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="needs tar")


@needs_gnu_tar
@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_sparse_members_are_skipped_and_the_rest_read(
    places: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, fmt: str,
) -> None:
    dest, outside = places
    work = tmp_path_factory.mktemp("work")
    with open(work / "holes", "wb") as file:
        file.truncate(50 << 20)
        file.seek(10 << 20)
        file.write(b"data")
    (work / "zafter").write_text("after")
    stream = subprocess.run(["tar", "-c", "-S", f"--format={fmt}", "-f", "-", "holes", "zafter"],
                            cwd=work, check=True, capture_output=True).stdout
    report = unpack_collected(io.BytesIO(stream), dest)
    assert report.skipped == ("holes: sparse file, not supported",)
    assert (dest / "zafter").read_text() == "after"
    with pytest.raises(TransferError, match="max_file_bytes"):
        unpack_collected(io.BytesIO(stream), dest, limits=Limits(max_file_bytes=1 << 20))
    assert_contained(dest, outside)


def test_zeros_become_holes(places: tuple[Path, Path]) -> None:
    dest, _ = places
    data = bytes(8 << 20) + b"end"
    unpack_collected(io.BytesIO(tar_bytes([Entry("zeros", data=data)])), dest)
    assert (dest / "zeros").read_bytes() == data
    assert os.stat(dest / "zeros").st_blocks * 512 < (1 << 20)


def test_oversized_extended_header(places: tuple[Path, Path]) -> None:
    dest, _ = places
    info = tarfile.TarInfo("x")
    info.pax_headers = {"comment": "c" * (100 << 10)}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info)
    with pytest.raises(TransferError, match="an extended header of"):
        unpack_collected(io.BytesIO(out.getvalue()), dest)


COMPONENTS = st.sampled_from(["a", "b", "..", ".", "", "outside", "link", "x y", "-"])
KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE])


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(COMPONENTS, min_size=1, max_size=4), st.booleans(), KINDS,
                          st.lists(COMPONENTS, min_size=1, max_size=4), st.booleans()),
                max_size=12), st.booleans())
def test_nothing_ever_lands_outside(
    entries: list[tuple[list[str], bool, bytes, list[str], bool]], hostlink: bool,
) -> None:
    with tempfile.TemporaryDirectory() as top:
        dest, outside = Path(top) / "dest", Path(top) / "outside"
        dest.mkdir()
        outside.mkdir()
        if hostlink:
            (dest / "hostlink").symlink_to(outside)
        corpus = []
        for parts, absolute, kind, target, absolute_target in entries:
            name = ("/" if absolute else "") + "/".join(parts)
            link = ("/" if absolute_target else "") + "/".join(target)
            if kind == tarfile.SYMTYPE and absolute_target:
                link = str(outside) + link
            corpus.append(Entry(name or "x", kind, data=b"d", linkname=link))
        report = unpack_collected(io.BytesIO(tar_bytes(corpus)), dest)
        assert list(outside.iterdir()) == []
        assert report.files + report.skipped_count <= len(corpus)
        if hostlink:
            return  # a link may lead into the host's own link out: that one is the user's
        # Judged by the link's text (realpath makes no sense of a link that loops, such as
        # a -> a//a): relative, and never climbing above DEST.
        for path in dest.rglob("*"):
            if path.is_symlink():
                lexical = os.path.normpath(os.path.join(path.parent, os.readlink(path)))
                assert lexical == str(dest) or lexical.startswith(str(dest) + "/"), path


def test_dest_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="cannot write results to"):
        unpack_collected(io.BytesIO(bytes(1024)), tmp_path / "file")


def test_transfer_error_is_a_vmrun_error_with_the_root_code() -> None:
    assert issubclass(TransferError, VmrunError)
    assert TransferError.exit_code == VmrunError.exit_code


def test_entries_named_like_a_host_symlink_or_directory_change_nothing_outside(
    places: tuple[Path, Path],
) -> None:
    # A directory entry over the host's own link out must not chmod what it points to, and
    # a symlink entry must not replace a directory the host has there.
    dest, outside = places
    outside.chmod(0o755)
    (dest / "hostlink").symlink_to(outside)
    (dest / "hostdir").mkdir()
    (dest / "hostdir/mine").write_text("mine")
    stream = tar_bytes([Entry("hostlink", tarfile.DIRTYPE, mode=0o777),
                        Entry("hostdir", tarfile.SYMTYPE, linkname="hostlink")])
    report = unpack_collected(io.BytesIO(stream), dest)
    assert stat.S_IMODE(outside.stat().st_mode) == 0o755
    assert os.readlink(dest / "hostlink") == str(outside)
    assert (dest / "hostdir/mine").read_text() == "mine"
    assert report.skipped == ("hostlink/: hostlink/ is a symlink on the host",
                              "hostdir: a directory is in the way on the host")
    assert_contained(dest, outside)
