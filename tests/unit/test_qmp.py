from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vmrun.errors import QemuError, QmpError
from vmrun.qemu.qmp import MAX_LINE, Qmp

GREETING = {"QMP": {"version": {"qemu": {"major": 8, "minor": 2, "micro": 0}},
                    "capabilities": []}}
STATUS = {"status": "running", "singlestep": False, "running": True}
STOP_EVENT = {"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}


class FakeQemu:
    """The QEMU end of the socketpair, driven by a script in its own thread."""

    def __init__(self, script: Callable[[FakeQemu], None]) -> None:
        self.host, self.peer = socket.socketpair()
        self.reader = self.peer.makefile("rb")
        self.received: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.release = threading.Event()  # lets a script that must stall finish
        self.thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self.thread.start()

    def _run(self, script: Callable[[FakeQemu], None]) -> None:
        try:
            script(self)
        except BrokenPipeError:
            pass  # the host hung up first: that is the host's business
        except BaseException as exc:  # reported by the fixture in the test's thread
            self.error = exc

    def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.peer.sendall(data)

    def receive(self) -> dict[str, Any]:
        line = self.reader.readline()
        assert line.endswith(b"\n"), line
        message: dict[str, Any] = json.loads(line)
        self.received.append(message)
        return message

    def expect(self, command: str) -> dict[str, Any]:
        message = self.receive()
        assert message["execute"] == command
        return message

    def close(self) -> None:
        self.reader.close()
        self.peer.close()


Start = Callable[[Callable[[FakeQemu], None]], FakeQemu]


@pytest.fixture
def start() -> Iterator[Start]:
    started: list[FakeQemu] = []

    def run(script: Callable[[FakeQemu], None]) -> FakeQemu:
        fake = FakeQemu(script)
        started.append(fake)
        return fake

    yield run
    for fake in started:
        fake.release.set()
        fake.host.close()
        fake.thread.join(timeout=10)
        assert not fake.thread.is_alive(), "the fake QEMU thread did not finish"
        fake.close()
        if fake.error is not None:
            raise fake.error


def handshake(fake: FakeQemu) -> None:
    fake.send(GREETING)
    fake.expect("qmp_capabilities")
    fake.send({"return": {}})


def test_execute_returns_the_reply(start: Start) -> None:
    def script(fake: FakeQemu) -> None:
        handshake(fake)
        fake.expect("query-status")
        fake.send({"return": STATUS})

    fake = start(script)
    qmp = Qmp(fake.host)
    assert qmp.execute("qmp_capabilities") == {}
    assert qmp.execute("query-status") == STATUS
    assert fake.received == [{"execute": "qmp_capabilities"}, {"execute": "query-status"}]
    assert qmp.events == []
    assert not qmp.closed


def test_execute_sends_arguments(start: Start) -> None:
    def script(fake: FakeQemu) -> None:
        fake.send(GREETING)
        fake.expect("human-monitor-command")
        fake.send({"return": "ok\r\n"})

    fake = start(script)
    qmp = Qmp(fake.host)
    assert qmp.execute("human-monitor-command", {"command-line": "info cpus"}) == "ok\r\n"
    assert fake.received == [
        {"execute": "human-monitor-command", "arguments": {"command-line": "info cpus"}}
    ]


def test_events_are_collected(start: Start) -> None:
    def script(fake: FakeQemu) -> None:
        handshake(fake)
        fake.expect("stop")
        # An event and the reply in one write, then an event after the reply.
        fake.send(json.dumps(STOP_EVENT).encode() + b"\n" + b'{"return": {}}\n')
        fake.send({"event": "RESUME", "timestamp": {"seconds": 3, "microseconds": 0}})
        fake.expect("query-status")
        fake.send({"return": STATUS})

    fake = start(script)
    qmp = Qmp(fake.host)
    qmp.execute("qmp_capabilities")
    assert qmp.execute("stop") == {}
    assert qmp.execute("query-status") == STATUS
    assert [event["event"] for event in qmp.events] == ["STOP", "RESUME"]
    assert qmp.events[0] == STOP_EVENT


def test_error_reply_raises_qmp_error(start: Start) -> None:
    def script(fake: FakeQemu) -> None:
        handshake(fake)
        fake.expect("no-such-command")
        fake.send({"error": {"class": "CommandNotFound",
                             "desc": "The command no-such-command has not been found"}})
        fake.expect("query-status")
        fake.send({"return": STATUS})

    fake = start(script)
    qmp = Qmp(fake.host)
    qmp.execute("qmp_capabilities")
    with pytest.raises(QmpError, match="no-such-command has not been found"):
        qmp.execute("no-such-command")
    # The monitor is still usable after an error reply.
    assert qmp.execute("query-status") == STATUS


def test_closed_peer_raises_qemu_error(start: Start) -> None:
    def script(fake: FakeQemu) -> None:
        handshake(fake)
        fake.expect("query-status")
        fake.close()

    fake = start(script)
    qmp = Qmp(fake.host)
    qmp.execute("qmp_capabilities")
    with pytest.raises(QemuError, match="closed its monitor during query-status") as info:
        qmp.execute("query-status")
    assert type(info.value) is QemuError
    assert qmp.closed


def test_send_to_closed_peer_raises_qemu_error(start: Start) -> None:
    fake = start(lambda fake: fake.close())
    fake.thread.join(timeout=10)
    qmp = Qmp(fake.host)
    with pytest.raises(QemuError, match="QMP connection lost"):
        qmp.send("quit")


@pytest.mark.parametrize(
    "line", [b"{not json\n", b"[1, 2, 3]\n", b"\"just a string\"\n", b"\xff\xfe\n"]
)
def test_malformed_line_raises_qmp_error(start: Start, line: bytes) -> None:
    def script(fake: FakeQemu) -> None:
        fake.send(GREETING)
        fake.expect("query-status")
        fake.send(line)

    qmp = Qmp(start(script).host)
    with pytest.raises(QmpError, match="malformed QMP message"):
        qmp.execute("query-status")


def test_blank_lines_are_ignored(start: Start) -> None:
    def script(fake: FakeQemu) -> None:
        fake.send(b"\n\r\n" + json.dumps(GREETING).encode() + b"\n  \n")
        fake.expect("query-status")
        fake.send(b'\n{"return": {"status": "paused"}}\n')

    qmp = Qmp(start(script).host)
    assert qmp.execute("query-status") == {"status": "paused"}


def test_reply_split_across_writes(start: Start) -> None:
    def script(fake: FakeQemu) -> None:
        fake.send(GREETING)
        fake.expect("query-status")
        reply = json.dumps({"return": STATUS}).encode() + b"\n"
        for i in range(len(reply)):
            fake.send(reply[i : i + 1])

    qmp = Qmp(start(script).host)
    assert qmp.execute("query-status") == STATUS


def test_too_long_message_is_refused(start: Start) -> None:
    def script(fake: FakeQemu) -> None:
        fake.send(GREETING)
        fake.expect("query-status")
        fake.send(b'{"return": "' + b"x" * MAX_LINE)  # no newline: never a whole message

    qmp = Qmp(start(script).host)
    with pytest.raises(QmpError, match="too long"):
        qmp.execute("query-status")


def test_execute_leaves_the_socket_non_blocking(start: Start) -> None:
    def script(fake: FakeQemu) -> None:
        fake.send(GREETING)
        fake.expect("query-status")
        fake.send({"return": STATUS})

    fake = start(script)
    qmp = Qmp(fake.host)
    qmp.execute("query-status")
    assert fake.host.gettimeout() == 0.0
    assert qmp.fileno() == fake.host.fileno()
    qmp.read_available()  # nothing to read: returns at once instead of blocking
    assert not qmp.closed


def stall_after_greeting(fake: FakeQemu) -> None:
    fake.send(GREETING)
    fake.expect("query-status")
    fake.release.wait(timeout=30)  # a hung QEMU: no reply until the test ends


def test_no_reply_within_timeout_raises_qmp_error(start: Start) -> None:
    qmp = Qmp(start(stall_after_greeting).host)
    with pytest.raises(QmpError, match="no reply to QMP query-status"):
        qmp.execute("query-status", timeout=0.2)
    assert not qmp.closed


def test_no_reply_within_timeout_raises(start: Start) -> None:
    # A hung QEMU does not hang vmrun.
    qmp = Qmp(start(stall_after_greeting).host)
    with pytest.raises(QemuError):
        qmp.execute("query-status", timeout=0.2)
