from __future__ import annotations

import glob
import os
import select
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmrun.channel import (
    MAX_STATUS_LINE,
    ROOT_FAILURES,
    Mount,
    Request,
    StatusReader,
    StdinMode,
    TokenScanner,
    encode_request,
    escape,
    new_token,
    parse_status_line,
)
from vmrun.errors import ChannelLost, UsageError
from vmrun.machine import Machine
from vmrun.ports import Output, Ports
from vmrun.spec import Command


def find_busybox() -> str | None:
    if Path("/bin/busybox").exists():
        return "/bin/busybox"
    found = sorted(glob.glob("/tmp/vmcache/busybox/*/bin/busybox"))
    return found[0] if found else None


BUSYBOX = find_busybox()
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="no busybox on this host")

# Exactly what the agent's unescape() does with a value.
UNESCAPE = 'v=$(printf "%bx" "$1"); printf %s "${v%x}"'


def unescape_in_busybox(escaped: str) -> bytes:
    assert BUSYBOX is not None
    done = subprocess.run([BUSYBOX, "sh", "-c", UNESCAPE, "sh", escaped],
                          capture_output=True, check=True, env={"PATH": "/usr/bin:/bin"})
    return done.stdout


def unescape_many_in_busybox(escaped: list[str]) -> list[bytes]:
    """One shell for many values: each result is framed by its length."""
    assert BUSYBOX is not None
    script = 'for a; do v=$(printf "%bx" "$a"); v=${v%x}; printf "%s\\n%s" "${#v}" "$v"; done'
    done = subprocess.run([BUSYBOX, "sh", "-c", script, "sh", *escaped],
                          capture_output=True, check=True,
                          env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    out = done.stdout
    results: list[bytes] = []
    while out:
        length, out = out.split(b"\n", 1)
        results.append(out[: int(length)])
        out = out[int(length):]
    return results


# --- escape() against busybox's printf %b --------------------------------------------


@needs_busybox
def test_escape_every_code_point_1_to_255_round_trips() -> None:
    values = [chr(b) for b in range(1, 256)]
    assert unescape_many_in_busybox([escape(v) for v in values]) == [v.encode() for v in values]


@needs_busybox
def test_escape_all_code_points_in_one_value() -> None:
    value = "".join(chr(b) for b in range(1, 256))
    assert unescape_in_busybox(escape(value)) == value.encode()


TRICKY = [
    "",
    "plain",
    "with space",
    "  leading and trailing  ",
    "tab\there",
    "single'quote",
    'double"quote',
    "back\\slash",
    "\\n not a newline",
    "\\0101 not an octal",
    "\\c stops printf %b",
    "trailing backslash\\",
    "new\nline",
    "ends with newlines\n\n",
    "\r\n",
    "$(touch /tmp/pwned)",
    "`touch /tmp/pwned`",
    "${HOME}",
    "$HOME",
    "%s %d %b %%",
    "*",
    "[a-z]?",
    "-n",
    "-e",
    "--",
    "a=b=c",
    "x",
    "ends with x",
    "héllo wörld",
    "日本語",
    "emoji 🎉",
    "\u00a0nbsp",
    "\x7f del",
    "\x01\x02\x1b[31m",
    ";|&<>(){}!#~",
]


@needs_busybox
@pytest.mark.parametrize("value", TRICKY)
def test_escape_tricky_strings_round_trip(value: str) -> None:
    assert unescape_in_busybox(escape(value)) == value.encode()


@needs_busybox
@settings(deadline=None, max_examples=60)  # one busybox process per example
@given(st.text(alphabet=st.characters(blacklist_characters="\0", codec="utf-8"), max_size=40))
def test_escape_round_trips_any_text(value: str) -> None:
    assert unescape_in_busybox(escape(value)) == value.encode()


@pytest.mark.parametrize("value", TRICKY)
def test_escaped_values_are_one_safe_word(value: str) -> None:
    escaped = escape(value)
    assert escaped.isascii()
    for forbidden in " \t\n\r'\"`$*?[;|&<>()":
        assert forbidden not in escaped
    # Only our own \0ooo sequences use a backslash.
    assert escaped.count("\\") == escaped.count("\\0")


@needs_busybox
def test_escape_non_utf8_argument() -> None:
    value = os.fsdecode(b"caf\xe9")
    assert unescape_in_busybox(escape(value)) == b"caf\xe9"


# --- encode_request ------------------------------------------------------------------


def full_request(stdin: StdinMode = StdinMode.NULL, data: bytes = b"") -> Request:
    return Request(
        argv=("sh", "-c", "echo $HOME\nexit 3", "multi\nline arg", ""),
        cwd="/work dir/x",
        env=(("A", "1 2"), ("B", "line\nbreak"), ("C", "")),
        token="<<vmrun-end-00ff>>",
        stdin=stdin,
        stdin_data=data,
        tty=(24, 80),
        mounts=(Mount("9p", "vmrun0", True, "/mnt/my share"),),
        net=True,
    )


def test_encode_request_snapshot() -> None:
    encoded = encode_request(full_request())
    assert encoded.decode().splitlines() == [
        "mount 9p vmrun0 ro /mnt/my\\0040share",
        "net user",
        "cwd /work\\0040dir/x",
        "env A=1\\00402",
        "env B=line\\0012break",
        "env C=",
        "arg sh",
        "arg -c",
        "arg echo\\0040\\0044HOME\\0012exit\\00403",
        "arg multi\\0012line\\0040arg",
        "arg ",
        "token <<vmrun-end-00ff>>",
        "stdin null 0",
        "tty 24 80",
        "run",
    ]
    assert encoded.endswith(b"\nrun\n")


@pytest.mark.parametrize("stdin", list(StdinMode))
def test_encode_request_one_field_per_line(stdin: StdinMode) -> None:
    data = b"stdin\ndata\nrun\n" if stdin == StdinMode.FILE else b""
    encoded = encode_request(full_request(stdin, data))
    head, sep, tail = encoded.partition(b"run\n")
    assert sep
    lines = head.decode("ascii").split("\n")
    assert lines[-1] == ""  # the head ends with a newline, right before "run"
    keys = [line.split(" ", 1)[0] for line in lines[:-1]]
    allowed = {"mount", "net", "cwd", "env", "arg", "token", "stdin", "tty"}
    assert set(keys) <= allowed
    assert keys.count("arg") == 5 and keys.count("env") == 3
    assert keys.count("cwd") == keys.count("token") == keys.count("stdin") == 1
    for line in lines[:-1]:
        assert "\r" not in line and "\0" not in line
        assert " " in line  # every field has a value part, even an empty one
    assert tail == data


def test_encode_request_stdin_file_appends_data_after_run() -> None:
    data = bytes(range(256)) * 3
    encoded = encode_request(full_request(StdinMode.FILE, data))
    assert encoded.endswith(b"stdin file 768\ntty 24 80\nrun\n" + data)


def test_encode_request_stdin_port_sends_no_data() -> None:
    request = Request(argv=("cat",), cwd="/", token="T", stdin=StdinMode.PORT)
    assert encode_request(request) == b"cwd /\narg cat\ntoken T\nstdin port 0\nrun\n"


def test_encode_request_minimal() -> None:
    request = Request(argv=("true",), cwd="/", token="T")
    assert encode_request(request) == b"cwd /\narg true\ntoken T\nstdin null 0\nrun\n"


def test_encode_request_root_comes_before_the_mounts() -> None:
    request = Request(argv=("true",), cwd="/w", token="T", disk=True, root=2, net=True,
                      mounts=(Mount("virtiofs", "vmrun0", False, "/w"),))
    assert encode_request(request).decode().splitlines() == [
        "disk", "root 2", "mount virtiofs vmrun0 rw /w", "net user", "cwd /w", "arg true",
        "token T", "stdin null 0", "run",
    ]
    assert b"root" not in encode_request(Request(argv=("true",), cwd="/", disk=True))


@pytest.mark.parametrize("number", [0, -1, 256, 1 << 40])
def test_encode_request_refuses_a_bad_root_number(number: int) -> None:
    with pytest.raises(ValueError, match="root partition"):
        encode_request(Request(argv=("true",), cwd="/", root=number))


AGENT = Path(__file__).resolve().parents[2] / "src/vmrun/guest/agent.sh"


def agent_function(name: str) -> str:
    """One shell function of the agent, as its text (they start and end at column 0)."""
    text = AGENT.read_text()
    start = text.index(f"\n{name}() {{\n") + 1
    return text[start:text.index("\n}\n", start) + 3]


@needs_busybox
def test_agent_resolves_paths_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for directory in ("usr/bin", "var/home/me", "etc", "a b/c"):
        (root / directory).mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")  # usrmerge
    (root / "home").symlink_to("/var/home")  # absolute: means the root's /var/home
    (root / "etc/resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    (root / "up").symlink_to("../../../../..")
    (root / "loop").symlink_to("loop")
    (root / "escape").symlink_to(str(tmp_path))
    cases = {
        "/": "", "/bin/sh": "/usr/bin/sh", "/home/me/work": "/var/home/me/work",
        "/etc/resolv.conf": "/run/systemd/resolve/stub-resolv.conf", "/up/etc": "/etc",
        "//a b/./c/../c/": "/a b/c", "/../../bin": "/usr/bin",
        "/escape/root": tmp_path.as_posix() + "/root",
        "/loop/x": "FAILED", "/not/there": "/not/there",
    }
    script = agent_function("inroot") + (
        'for p; do if inroot "$p"; then printf "%s\\n" "${v#"$root"}"; '
        'else echo FAILED; fi; done')
    done = subprocess.run([BUSYBOX or "", "sh", "-c", script, "sh", *cases],
                          env={"PATH": "/usr/bin:/bin", "root": str(root)},
                          capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == list(cases.values())


@needs_busybox
def test_agent_finds_commands_inside_a_root_without_a_shell(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for directory in ("usr/bin", "plain", "dir/tool", "abs", "work/rel", "app"):
        (root / directory).mkdir(parents=True)
    for name, mode in (("usr/bin/tool", 0o755), ("plain/tool", 0o644),
                       ("work/rel/here", 0o755), ("app/only-here", 0o755)):
        (root / name).write_text("#!/x\n")
        (root / name).chmod(mode)
    (root / "bin").symlink_to("usr/bin")
    (root / "abs/tool").symlink_to("/usr/bin/tool")  # absolute: inside the root only
    (root / "abs/dangling").symlink_to("/app/gone")
    cases = [  # (PATH, cwd, name) -> the path exec'd
        (("/nowhere:/plain:/dir:/abs:/bin", "/", "tool"), "/abs/tool"),
        (("/plain:/bin/", "/", "tool"), "/bin/tool"),
        (("/plain:/dir", "/", "tool"), "FAILED"),
        (("/bin", "/", "only-here"), "FAILED"),
        (("/abs:/bin", "/", "dangling"), "FAILED"),
        (("rel:/bin", "/work", "here"), "/work/rel/here"),
        ((":/bin", "/work/rel", "here"), "/work/rel/./here"),
        (("/bin", "/", "./app/only-here"), "./app/only-here"),
        (("/bin", "/", "/app/x; rm -rf /"), "/app/x; rm -rf /"),
        (("/bin", "/", "$(id)"), "FAILED"),
        (("/bin", "/", ""), "FAILED"),
    ]
    script = agent_function("inroot") + agent_function("find_command") + (
        'while [ $# -gt 0 ]; do PATH=$1; '
        'if find_command "$3" "$2"; then printf "%s\\n" "$v"; else echo FAILED; fi; '
        'shift 3; done')
    words = [word for case, _ in cases for word in case]
    done = subprocess.run([BUSYBOX or "", "sh", "-c", script, "sh", *words],
                          env={"root": str(root)}, capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == [found for _, found in cases]


@needs_busybox
def test_encoded_arguments_unescape_to_the_originals() -> None:
    request = full_request()
    lines = encode_request(request).decode().splitlines()
    args = [line.split(" ", 1)[1] for line in lines if line.startswith("arg ")]
    assert unescape_many_in_busybox(args) == [a.encode() for a in request.argv]


def test_new_token_is_printable_and_fresh() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert token.isascii() and token.isprintable() and " " not in token


# --- TokenScanner --------------------------------------------------------------------

TOKEN = b"<<vmrun-end-abc>>"


def scan(chunks: list[bytes], token: bytes = TOKEN) -> tuple[bytes, bool]:
    scanner = TokenScanner(token)
    out = b"".join(scanner.feed(chunk) for chunk in chunks)
    return out, scanner.done


def test_token_split_at_every_boundary() -> None:
    stream = b"hello world\n" + TOKEN + b"after"
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            out, done = scan([stream[:i], stream[i:j], stream[j:]])
            assert (out, done) == (b"hello world\n", True), (i, j)


def test_token_byte_by_byte() -> None:
    stream = b"abc" + TOKEN + b"xyz"
    out, done = scan([bytes([b]) for b in stream])
    assert (out, done) == (b"abc", True)


def test_token_prefix_is_held_back_then_released() -> None:
    scanner = TokenScanner(TOKEN)
    assert scanner.feed(b"data<<vmrun-") == b"data"
    assert scanner.held == b"<<vmrun-"
    assert scanner.feed(b"oops") == b"<<vmrun-oops"
    assert scanner.held == b""
    assert not scanner.done


def test_partial_prefix_held_again_after_release() -> None:
    scanner = TokenScanner(TOKEN)
    assert scanner.feed(b"<<") == b""
    # "<<<" : the first "<" is surely output, "<<" might still start the token
    assert scanner.feed(b"<") == b"<"
    assert scanner.feed(TOKEN[2:]) == b""
    assert scanner.done


def test_data_after_token_ignored() -> None:
    scanner = TokenScanner(TOKEN)
    assert scanner.feed(b"a" + TOKEN + b"b") == b"a"
    assert scanner.done
    assert scanner.feed(b"more") == b""
    assert scanner.feed(TOKEN) == b""


def test_token_only() -> None:
    assert scan([TOKEN]) == (b"", True)


def test_binary_data_with_partial_prefixes() -> None:
    noise = b"\x00\xff<\x00<<v\xfe<<vmrun-end-ab\x00<<vmrun-end-abc>\n\x80"
    out, done = scan([noise[:7], noise[7:20], noise[20:]])
    assert (out, done) == (noise, False)
    out, done = scan([noise, TOKEN[:5], TOKEN[5:], b"tail"])
    assert (out, done) == (noise, True)


def test_held_bytes_are_lost_only_if_token_follows() -> None:
    # At the end of a stream without the token, the caller flushes .held.
    scanner = TokenScanner(TOKEN)
    out = scanner.feed(b"x<<vmrun-end-ab")
    assert out + scanner.held == b"x<<vmrun-end-ab"


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=10)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# Bytes from the token's own alphabet make partial matches frequent.
TOKEN_HEAVY = st.lists(
    st.one_of(st.binary(max_size=4), st.sampled_from([TOKEN[:n] for n in range(1, len(TOKEN))])),
    max_size=12,
).map(b"".join)


@given(st.data(), st.one_of(st.binary(max_size=200), TOKEN_HEAVY))
def test_scanner_passes_everything_without_token(data: st.DataObject, payload: bytes) -> None:
    if TOKEN in payload:
        payload = payload.replace(TOKEN, b"")
    if TOKEN in payload:  # replacing can create a new occurrence
        return
    chunks = data.draw(chunked(payload))
    scanner = TokenScanner(TOKEN)
    out = b"".join(scanner.feed(chunk) for chunk in chunks)
    assert not scanner.done
    assert out + scanner.held == payload
    # What is held back is never more than a proper prefix of the token.
    assert len(scanner.held) < len(TOKEN)
    assert TOKEN.startswith(scanner.held)


@given(st.data(), TOKEN_HEAVY, st.binary(max_size=30))
def test_scanner_stops_at_first_token(data: st.DataObject, before: bytes, after: bytes) -> None:
    if TOKEN in before:
        return
    stream = before + TOKEN + after
    if stream.find(TOKEN) != len(before):
        return  # the token starts earlier, inside "before" + token overlap
    out, done = scan(data.draw(chunked(stream)))
    assert (out, done) == (before, True)


# --- status lines --------------------------------------------------------------------


@pytest.mark.parametrize("line", ["ready", "started", *(f"exit {n}" for n in range(256))])
def test_status_accepts(line: str) -> None:
    assert parse_status_line(line.encode()) == line


@pytest.mark.parametrize(
    "raw",
    [
        b"exit 256", b"exit -1", b"exit 1000", b"exit", b"exit ", b"exit +1", b"exit 1 2",
        b"exit 0x1", b"exit 1.0", b" exit 0", b"exit  0", b"exit 0\r", b"ready\r", b"READY",
        b"ready ", b"", b"garbage", b"started now", b"exit \xd9\xa3", b"r\xe9ady",
        b"\xff\xfe", b"ready\x00",
    ],
)
def test_status_rejects(raw: bytes) -> None:
    with pytest.raises(ChannelLost):
        parse_status_line(raw)


@pytest.mark.parametrize("reason", sorted(ROOT_FAILURES))
def test_status_accepts_a_root_failure(reason: str) -> None:
    assert parse_status_line(f"fail {reason}".encode()) == f"fail {reason}"


@pytest.mark.parametrize("raw", [b"fail", b"fail ", b"fail other", b"fail root-shell x",
                                 b"fail  root-shell", b"FAIL root-shell", b"fail root"])
def test_status_rejects_other_failures(raw: bytes) -> None:
    with pytest.raises(ChannelLost):
        parse_status_line(raw)


def test_status_rejects_over_long_line() -> None:
    with pytest.raises(ChannelLost, match="too long"):
        parse_status_line(b"exit " + b"0" * MAX_STATUS_LINE)


def test_status_reader_splits_lines_across_feeds() -> None:
    reader = StatusReader()
    assert reader.feed(b"rea") == []
    assert reader.feed(b"dy\nstar") == ["ready"]
    assert reader.feed(b"ted\nexit 4") == ["started"]
    assert reader.feed(b"2\nexit 0\nexit 255\n") == ["exit 42", "exit 0", "exit 255"]
    assert reader.buffer == b""


def test_status_reader_byte_by_byte() -> None:
    reader = StatusReader()
    lines: list[str] = []
    for byte in b"ready\nstarted\nexit 7\n":
        lines += reader.feed(bytes([byte]))
    assert lines == ["ready", "started", "exit 7"]


def test_status_reader_bounds_an_unterminated_line() -> None:
    reader = StatusReader()
    reader.feed(b"x" * MAX_STATUS_LINE)  # at the limit: still waiting for the newline
    with pytest.raises(ChannelLost, match="too long"):
        reader.feed(b"x")


def test_status_reader_rejects_long_line_in_one_feed() -> None:
    with pytest.raises(ChannelLost):
        StatusReader().feed(b"ready\n" + b"9" * 200 + b"\n")


def test_status_reader_rejects_garbage_line() -> None:
    reader = StatusReader()
    with pytest.raises(ChannelLost):
        reader.feed(b"ready\nexit 256\n")


# ---- what the host keeps of a guest's flood (vmrun.machine's side of the channel) --------

@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(vmrun's end, non-blocking; the guest's end) of a socketpair."""
    ours, guest = socket.socketpair()
    ours.setblocking(False)
    yield ours, guest
    ours.close()
    guest.close()


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_a_flood_of_valid_status_lines_grows_nothing(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, guest = pair
    quiet, _ = socket.socketpair()  # stdout and stderr: nothing arrives there
    ports = Ports({"status": ours, "stdout": quiet, "stderr": quiet}, None, None, tty=False)
    lines = b"started\nready\nexit 3\nexit 4\n" * 100
    for _ in range(2000):  # 800,000 valid lines
        guest.sendall(lines)
        while readable(ours):
            assert ports.handle([ours.fileno()], [])
    assert ports.events == ["started", "ready", "exit 3", "exit 4"]


@pytest.mark.parametrize("limit", [0, 1, 4096, 100_000])
def test_captured_output_stops_at_the_limit_and_says_so(
        pair: tuple[socket.socket, socket.socket], limit: int) -> None:
    ours, guest = pair
    token = b"<<vmrun-end-test>>"
    output = Output(ours, None)
    output.begin(token, capture=True, limit=limit)
    chunk = bytes(range(256)) * 256  # 64 KiB
    for _ in range(32):  # 2 MiB in all
        guest.sendall(chunk)
        while readable(ours):
            assert output.on_readable()
    guest.sendall(token)
    while not output.done:
        assert output.on_readable()
    assert bytes(output.capture or b"") == (chunk * 32)[:limit]
    assert output.truncated


def test_captured_output_within_the_limit_is_whole(
        pair: tuple[socket.socket, socket.socket]) -> None:
    ours, guest = pair
    output = Output(ours, None)
    output.begin(b"<<end>>", capture=True, limit=10)
    guest.sendall(b"0123456789<<end>>")
    while not output.done:
        assert output.on_readable()
    assert bytes(output.capture or b"") == b"0123456789"
    assert not output.truncated


def test_capture_limit_must_not_be_negative() -> None:
    machine = Machine()
    machine.qemu = object()  # type: ignore[assignment]  # the check comes before any I/O
    with pytest.raises(UsageError, match="capture_limit must not be negative"):
        machine.run(Command(("true",)), capture=True, capture_limit=-1)


def _sync_ports() -> tuple[Ports, dict[str, socket.socket]]:
    """Ports over fresh socketpairs, and the guest's ends by name."""
    ours: dict[str, socket.socket] = {}
    guest: dict[str, socket.socket] = {}
    for name in ("control", "status", "stdout", "stderr"):
        ours[name], guest[name] = socket.socketpair()
        ours[name].setblocking(False)
    return Ports(ours, None, None, tty=False), guest


@pytest.mark.parametrize("answer", [b"synced\n", b"syn", b"", b"bogus\n"])
def test_sync_waits_for_the_agents_word(answer: bytes) -> None:
    ports, guest = _sync_ports()
    qemu_r, qemu_w = os.pipe()  # QEMU's pidfd stand-in: readable once QEMU "exits"
    try:
        if answer:
            guest["status"].sendall(answer)
        else:
            guest["status"].close()  # the channel breaks
        synced = ports.sync(qemu_r, timeout=0.3)
        assert synced == (answer == b"synced\n")
        assert guest["control"].recv(64) == b"sync\n"
    finally:
        os.close(qemu_r)
        os.close(qemu_w)


def test_sync_gives_up_when_qemu_exits() -> None:
    ports, _guest = _sync_ports()
    qemu_r, qemu_w = os.pipe()
    os.write(qemu_w, b"x")
    try:
        assert not ports.sync(qemu_r, timeout=30)  # at once: QEMU is gone
    finally:
        os.close(qemu_r)
        os.close(qemu_w)
