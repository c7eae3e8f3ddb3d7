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
        self.unanswered: list[Any] = []  # ids of commands received, oldest first
        self.unanswered_seen: list[Any] = []  # every id received
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
        """Send MESSAGE; a reply without an id answers the oldest command, as QEMU would
        (QEMU echoes the id of the command a reply is for)."""
        if isinstance(message, dict) and ("return" in message or "error" in message) \
                and "id" not in message and self.unanswered:
            message = {**message, "id": self.unanswered.pop(0)}
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.peer.sendall(data)

    def receive(self) -> dict[str, Any]:
        line = self.reader.readline()
        assert line.endswith(b"\n"), line
        message: dict[str, Any] = json.loads(line)
        if "id" in message:
            self.unanswered.append(message["id"])
            self.unanswered_seen.append(message["id"])
        self.received.append({k: v for k, v in message.items() if k != "id"})
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
        reply = {"return": {}, "id": fake.unanswered.pop(0)}
        fake.send(json.dumps(STOP_EVENT).encode() + b"\n" + json.dumps(reply).encode() + b"\n")
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
        ident = json.dumps(fake.unanswered.pop(0)).encode()
        fake.send(b'\n{"return": {"status": "paused"}, "id": ' + ident + b'}\n')

    qmp = Qmp(start(script).host)
    assert qmp.execute("query-status") == {"status": "paused"}


def test_reply_split_across_writes(start: Start) -> None:
    def script(fake: FakeQemu) -> None:
        fake.send(GREETING)
        fake.expect("query-status")
        reply = json.dumps({"return": STATUS, "id": fake.unanswered.pop(0)}).encode() + b"\n"
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


def test_every_command_carries_its_own_id(start: Start) -> None:
    def script(fake: FakeQemu) -> None:
        handshake(fake)
        fake.expect("query-status")
        fake.send({"return": STATUS})

    fake = start(script)
    qmp = Qmp(fake.host)
    qmp.execute("qmp_capabilities")
    qmp.execute("query-status")
    ids = fake.unanswered_seen
    assert len(ids) == 2 and len(set(ids)) == 2
    assert all(isinstance(ident, str) and ident for ident in ids)


def test_a_late_reply_is_never_the_next_commands_answer(start: Start) -> None:
    # QEMU answers query-status only after the host gave up on it, right before the
    # answer to query-name: the host must take the second, not the late first.
    def script(fake: FakeQemu) -> None:
        handshake(fake)
        first = fake.expect("query-status")
        second = fake.expect("query-name")
        fake.send({"return": STATUS, "id": first["id"]})
        fake.send({"return": {"name": "vm0"}, "id": second["id"]})
        fake.unanswered.clear()

    fake = start(script)
    qmp = Qmp(fake.host)
    qmp.execute("qmp_capabilities")
    with pytest.raises(QmpError, match="no reply to QMP query-status"):
        qmp.execute("query-status", timeout=0.2)
    assert qmp.execute("query-name") == {"name": "vm0"}
    assert qmp.replies == {} and qmp.awaited == set()


def test_a_reply_with_a_foreign_or_missing_id_is_dropped(start: Start) -> None:
    def script(fake: FakeQemu) -> None:
        fake.send(GREETING)
        command = fake.expect("query-status")
        fake.send(b'{"return": {"status": "nobody asked"}}\n')
        fake.send({"return": {"status": "wrong"}, "id": "not-ours"})
        fake.send({"return": {"status": "wrong"}, "id": [command["id"]]})
        fake.send({"return": STATUS, "id": command["id"]})
        fake.unanswered.clear()

    qmp = Qmp(start(script).host)
    assert qmp.execute("query-status") == STATUS


def test_the_reply_to_a_command_only_sent_is_dropped(start: Start) -> None:
    def script(fake: FakeQemu) -> None:
        fake.send(GREETING)
        fake.expect("stop")
        fake.expect("query-status")
        fake.send({"return": {}})  # stop's reply, which nobody awaits
        fake.send({"return": STATUS})

    fake = start(script)
    qmp = Qmp(fake.host)
    qmp.send("stop")
    assert qmp.execute("query-status") == STATUS
    assert qmp.replies == {}


# ---- what QMP events mean for a run (vmrun.console) --------------------------------------

def event(name: str, **data: Any) -> dict[str, Any]:
    return {"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 0}}


def test_a_pause_fails_the_run_only_when_it_lasts(monkeypatch: pytest.MonkeyPatch) -> None:
    from vmrun import console

    now = [100.0]
    monkeypatch.setattr("vmrun.console.time.monotonic", lambda: now[0])
    pause = console.Pause()
    assert pause.deadline() is None and pause.failure() is None
    pause.on_event(event("STOP"))
    assert pause.deadline() == 100.0 + console.PAUSE_GRACE
    now[0] += console.PAUSE_GRACE - 0.1
    assert pause.failure() is None
    pause.on_event(event("RESUME"))  # resumed in time: forgiven
    now[0] += 60
    assert pause.deadline() is None and pause.failure() is None
    pause.on_event(event("BLOCK_IO_ERROR", device="disk0", operation="write",
                         action="stop", reason="Input/output error"))
    pause.on_event(event("STOP"))
    now[0] += console.PAUSE_GRACE
    message = pause.failure()
    assert message is not None
    assert "paused the VM after an I/O error on disk0: Input/output error" in message
    assert "did not resume" in message


def test_a_stop_on_the_way_out_is_no_pause() -> None:
    from vmrun import console

    pause = console.Pause()
    pause.on_event(event("SHUTDOWN", guest=True, reason="guest-shutdown"))
    pause.on_event(event("STOP"))
    assert pause.deadline() is None


@pytest.mark.parametrize(("name", "data", "kind", "message"), [
    ("GUEST_PANICKED", {"action": "pause"}, "GuestPanic", "panicked"),
    ("GUEST_CRASHLOADED", {"action": "run"}, "GuestPanic", "panicked"),
    ("BLOCK_IO_ERROR", {"nospace": True, "reason": "No space left on device"},
     "ImageError", "host disk full"),
    ("SUSPEND", {}, "ChannelLost", "suspended itself"),
])
def test_events_that_end_a_run_at_once(tmp_path: Any, name: str, data: dict[str, Any],
                                       kind: str, message: str) -> None:
    from vmrun import console

    serial = console.Serial(tmp_path / "serial.log")
    failure = console.event_failure(event(name, **data), serial, tmp_path)
    assert failure is not None and type(failure).__name__ == kind
    assert message in str(failure)


@pytest.mark.parametrize("name", ["STOP", "RESUME", "SHUTDOWN", "RESET", "POWERDOWN",
                                  "NIC_RX_FILTER_CHANGED", "RTC_CHANGE"])
def test_events_that_do_not_end_a_run_at_once(tmp_path: Any, name: str) -> None:
    from vmrun import console

    serial = console.Serial(tmp_path / "serial.log")
    assert console.event_failure(event(name), serial, tmp_path) is None
    write_error = event("BLOCK_IO_ERROR", device="disk0", operation="write",
                        action="report", reason="Input/output error")
    assert console.event_failure(write_error, serial, tmp_path) is None
