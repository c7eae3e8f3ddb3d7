"""The image store against a real local HTTP server: verification, resume, stampede."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vmrun.cache import key_of, locked, sha256_file
from vmrun.cli.image import cmd_image
from vmrun.errors import FetchError, ImageError, UsageError, VerificationError
from vmrun.images import aliases, store

SRC = Path(__file__).resolve().parents[2] / "src"
MiB = 1 << 20


@dataclass
class Fault:
    """What goes wrong with the next TIMES responses for a path."""

    kind: str  # "die" (reset after AFTER bytes), "truncate" (clean close), "stall"
    after: int
    times: int = 1


@dataclass
class Server:
    base: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    faults: dict[str, Fault] = field(default_factory=dict)
    ranges: bool = True
    length: bool = True  # False: no Content-Length, the end of the body is the closed connection
    delay: float = 0.0  # seconds between chunks, to make a download take a while
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def gets(self, path: str) -> list[str | None]:
        """The Range header of each request for PATH."""
        return [rng for p, rng in self.requests if p == path]


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path
            rng = self.headers.get("Range")
            with server.lock:
                server.requests.append((path, rng))
                content = server.files.get(path)
                fault = server.faults.get(path)
                if fault is not None and fault.times > 0:
                    fault.times -= 1
                else:
                    fault = None
            if content is None:
                self.send_error(404)
                return
            etag = '"' + hashlib.sha1(content).hexdigest() + '"'
            if_range = self.headers.get("If-Range")
            start = 0
            if rng and server.ranges and (if_range is None or if_range == etag):
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(content):
                    self.send_error(416)
                    return
            body = content[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/"
                                 f"{len(content)}")
            if server.length:
                self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", etag)
            self.end_headers()
            if fault is not None:
                body = body[: fault.after]
            try:
                for offset in range(0, len(body), 64 << 10):
                    chunk = body[offset : offset + (64 << 10)]
                    self.wfile.write(chunk)
                    with server.lock:
                        server.sent[path] = server.sent.get(path, 0) + len(chunk)
                    if server.delay:
                        time.sleep(server.delay)
                self.wfile.flush()
                if fault is not None and fault.kind == "stall":
                    server.release.wait(30)
                if fault is not None and fault.kind == "die":
                    # Reset instead of a clean close, as a dying server would.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.close_connection = True

    return Handler


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def no_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(store.MIRROR_ENV, raising=False)


def image_bytes(size: int, seed: int = 0) -> bytes:
    chunk = hashlib.sha256(f"image-{seed}".encode()).digest() * 2048  # 64 KiB
    return (chunk * (size // len(chunk) + 1))[:size]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(server: Server, path: str, size: int, seed: int = 0) -> tuple[str, bytes]:
    data = image_bytes(size, seed)
    server.files[path] = data
    return server.url(path), data


def store_files(cache: Path) -> dict[str, list[str]]:
    root = cache / "images"
    return {sub: sorted(p.name for p in (root / sub).iterdir()) if (root / sub).is_dir()
            else [] for sub in ("blobs", "names", "tmp")}


def parts(cache: Path) -> list[str]:
    return [name for name in store_files(cache)["tmp"] if name.endswith(".part")]


# -- pull --


def test_pull_by_url_and_sha256(server: Server, tmp_path: Path) -> None:
    url, data = publish(server, "/images/disk.img", 3 * MiB + 17)
    seen: list[tuple[str, int, int | None]] = []
    image = store.pull(url, sha256=sha256(data), cache=tmp_path,
                       progress=lambda label, done, total: seen.append((label, done, total)))
    assert image.digest == sha256(data)
    assert image.name == "disk.img"
    assert image.size == len(data)
    assert image.source == url
    assert image.path == tmp_path / "images" / "blobs" / image.digest
    assert image.path.read_bytes() == data
    assert image.path.stat().st_mode & 0o777 == 0o444
    assert seen[-1] == ("disk.img", len(data), len(data))
    record = json.loads((tmp_path / "images" / "names" / "disk.img.json").read_text())
    assert record["digest"] == image.digest and record["size"] == len(data)
    assert record["source"] == url and "created" in record
    assert parts(tmp_path) == []

    # Pulling it again is a cache hit: no request, the same image.
    again = store.pull(url, sha256=sha256(data), cache=tmp_path, name="other")
    assert again.digest == image.digest and again.name == "other"
    assert server.gets("/images/disk.img") == [None]


def test_pull_alias_with_sha256sums(server: Server, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(store.MIRROR_ENV, server.url("/ubuntu"))
    noble_url, noble = publish(server, "/ubuntu/noble/current/noble-server-cloudimg-arm64.img",
                               MiB + 5, seed=1)
    jammy_url, jammy = publish(server, "/ubuntu/jammy/current/"
                               "jammy-server-cloudimg-amd64.img", MiB + 9, seed=2)
    # Ubuntu's SHA256SUMS mark files binary ("*name"); accept plain "  name" too.
    server.files["/ubuntu/noble/current/SHA256SUMS"] = (
        f"{'0' * 64} *noble-server-cloudimg-amd64.img\n"
        f"{sha256(noble)} *noble-server-cloudimg-arm64.img\n").encode()
    server.files["/ubuntu/jammy/current/SHA256SUMS"] = (
        f"# checksums\n\n{sha256(jammy)}  jammy-server-cloudimg-amd64.img\n").encode()

    image = store.pull("ubuntu:noble", arch="aarch64", cache=tmp_path)
    assert image.path.read_bytes() == noble and image.source == noble_url
    expected_name = "ubuntu:noble" if aliases.default_arch() == "arm64" else \
        "ubuntu:noble-arm64"
    assert image.name == expected_name
    assert store.resolve(expected_name, tmp_path).digest == sha256(noble)

    jammy_image = store.pull("ubuntu:jammy", arch="amd64", cache=tmp_path, name="jammy")
    assert jammy_image.digest == sha256(jammy) and jammy_image.source == jammy_url


def test_pull_alias_with_sha512sums(server: Server, tmp_path: Path) -> None:
    path = "/debian/bookworm/latest/debian-12-genericcloud-amd64.qcow2"
    url, data = publish(server, path, 2 * MiB, seed=3)
    server.files["/debian/bookworm/latest/SHA512SUMS"] = (
        f"{hashlib.sha512(b'x').hexdigest()}  debian-12-genericcloud-arm64.qcow2\n"
        f"{hashlib.sha512(data).hexdigest()}  debian-12-genericcloud-amd64.qcow2\n").encode()
    image = store.pull("debian:12", arch="amd64", mirror=server.url("/debian/"),
                       cache=tmp_path, name="deb")
    assert image.digest == sha256(data) and image.source == url
    # The sha512 is remembered: another pull under another alias is a cache hit.
    again = store.pull("debian:bookworm", arch="x86_64", mirror=server.url("/debian"),
                       cache=tmp_path, name="deb2")
    assert again.digest == image.digest
    assert server.gets(path) == [None]


def test_wrong_hash_stores_nothing(server: Server, tmp_path: Path) -> None:
    url, data = publish(server, "/bad.img", MiB)
    wrong = sha256(b"something else")
    with pytest.raises(VerificationError) as caught:
        store.pull(url, sha256=wrong, cache=tmp_path)
    message = str(caught.value)
    assert url in message and wrong in message and sha256(data) in message
    assert store_files(tmp_path)["blobs"] == [] and store_files(tmp_path)["names"] == []
    assert parts(tmp_path) == []


def test_wrong_content_against_checksums_file(server: Server, tmp_path: Path) -> None:
    server.files["/ubuntu/noble/current/SHA256SUMS"] = (
        f"{sha256(b'the real one')} *noble-server-cloudimg-amd64.img\n").encode()
    publish(server, "/ubuntu/noble/current/noble-server-cloudimg-amd64.img", MiB)
    with pytest.raises(VerificationError):
        store.pull("ubuntu:noble", arch="amd64", mirror=server.url("/ubuntu"), cache=tmp_path)
    assert store.list_images(tmp_path) == [] and parts(tmp_path) == []


def test_checksums_file_without_the_image(server: Server, tmp_path: Path) -> None:
    url, _ = publish(server, "/a/disk.img", 1000)
    server.files["/a/SHA256SUMS"] = f"{'1' * 64}  other.img\n".encode()
    with pytest.raises(VerificationError, match="disk.img"):
        store.pull(url, checksums_url=server.url("/a/SHA256SUMS"), cache=tmp_path)
    assert server.gets("/a/disk.img") == []


def test_no_checksum_is_refused(server: Server, tmp_path: Path) -> None:
    url, _ = publish(server, "/x.img", 100)
    with pytest.raises(UsageError) as caught:
        store.pull(url, cache=tmp_path)
    assert caught.value.hint is not None and "--sha256" in caught.value.hint
    with pytest.raises(UsageError):
        store.pull("file:///etc/passwd", sha256="0" * 64, cache=tmp_path)
    assert server.requests == []


def test_unknown_alias_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        store.pull("fedora:40", cache=tmp_path)
    assert caught.value.hint is not None and "ubuntu:noble" in caught.value.hint
    with pytest.raises(UsageError):
        aliases.resolve_alias("ubuntu:noble", "riscv64", None)


def test_alias_urls() -> None:
    assert aliases.resolve_alias("ubuntu:noble", "amd64", None) == (
        "https://cloud-images.ubuntu.com/noble/current/noble-server-cloudimg-amd64.img",
        "https://cloud-images.ubuntu.com/noble/current/SHA256SUMS")
    assert aliases.resolve_alias("debian:13", "arm64", None) == (
        "https://cloud.debian.org/images/cloud/trixie/latest/"
        "debian-13-genericcloud-arm64.qcow2",
        "https://cloud.debian.org/images/cloud/trixie/latest/SHA512SUMS")
    assert aliases.resolve_alias("debian:bookworm", "aarch64", "http://m.example/d/")[0] == (
        "http://m.example/d/bookworm/latest/debian-12-genericcloud-arm64.qcow2")


def test_parse_checksums() -> None:
    text = (f"# comment\n\n{'A' * 64} *bin.img\n{'b' * 64}  text.img\n"
            f"{'c' * 128}  ./big.qcow2\nnot a line\n")
    assert store.parse_checksums(text) == {
        "bin.img": "a" * 64, "text.img": "b" * 64, "big.qcow2": "c" * 128}


def test_a_download_of_unknown_length_reports_its_end(server: Server, tmp_path: Path) -> None:
    server.length = False
    url, data = publish(server, "/images/nolength.img", MiB + 5)
    seen: list[tuple[str, int, int | None]] = []
    store.pull(url, sha256=sha256(data), cache=tmp_path,
               progress=lambda label, done, total: seen.append((label, done, total)))
    assert seen[0][2] is None and seen[-2][2] is None  # reported as it came
    assert seen[-1] == ("nolength.img", len(data), len(data))  # and then its end


# -- interrupted downloads --


PULL_SCRIPT = """
import sys
from pathlib import Path
from vmrun.images import store
print("ready", flush=True)
sys.stdin.readline()
image = store.pull(sys.argv[1], sha256=sys.argv[2], cache=Path(sys.argv[3]), name="img")
print(image.digest, flush=True)
"""


def pull_process(url: str, digest: str, cache: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    return subprocess.Popen(
        [sys.executable, "-c", PULL_SCRIPT, url, digest, str(cache)], env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_killed_download_resumes_with_range(server: Server, tmp_path: Path) -> None:
    url, data = publish(server, "/big.img", 4 * MiB)
    server.faults["/big.img"] = Fault("stall", after=MiB)
    proc = pull_process(url, sha256(data), tmp_path)
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline() == "ready\n"
    proc.stdin.write("go\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 20
    while not any((tmp_path / "images/tmp" / p).stat().st_size == MiB
                  for p in parts(tmp_path)):
        assert time.monotonic() < deadline, "the download never got going"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    # Only the part is left; the final name holds nothing.
    assert store_files(tmp_path)["blobs"] == [] and store_files(tmp_path)["names"] == []
    assert len(parts(tmp_path)) == 1
    server.release.set()

    image = store.pull(url, sha256=sha256(data), cache=tmp_path)
    assert image.path.read_bytes() == data
    assert server.gets("/big.img") == [None, f"bytes={MiB}-"]
    assert server.sent["/big.img"] < 2 * len(data)
    assert parts(tmp_path) == []


def test_truncated_body_is_resumed(server: Server, tmp_path: Path) -> None:
    url, data = publish(server, "/t.img", 3 * MiB)
    server.faults["/t.img"] = Fault("truncate", after=MiB + 100)
    image = store.pull(url, sha256=sha256(data), cache=tmp_path)
    assert image.path.read_bytes() == data
    assert server.gets("/t.img") == [None, f"bytes={MiB + 100}-"]
    assert server.sent["/t.img"] == len(data)


def test_connection_reset_without_range_support_restarts(server: Server,
                                                        tmp_path: Path) -> None:
    url, data = publish(server, "/r.img", 2 * MiB)
    server.ranges = False
    server.faults["/r.img"] = Fault("die", after=MiB // 2)
    image = store.pull(url, sha256=sha256(data), cache=tmp_path)
    assert image.path.read_bytes() == data
    assert len(server.gets("/r.img")) == 2


def test_endless_truncation_fails_cleanly(server: Server, tmp_path: Path) -> None:
    url, data = publish(server, "/e.img", 2 * MiB)
    server.ranges = False
    server.faults["/e.img"] = Fault("truncate", after=MiB, times=100)
    with pytest.raises(FetchError, match="1048576 of 2097152"):
        store.pull(url, sha256=sha256(data), cache=tmp_path)
    assert store_files(tmp_path)["blobs"] == [] and store_files(tmp_path)["names"] == []
    # What did arrive stays for the next pull to resume.
    assert len(parts(tmp_path)) == 1
    server.faults.clear()
    server.ranges = True
    assert store.pull(url, sha256=sha256(data), cache=tmp_path).path.read_bytes() == data
    assert server.gets("/e.img")[-1] == f"bytes={MiB}-"


def test_stale_part_of_another_version_is_redownloaded(server: Server,
                                                      tmp_path: Path) -> None:
    url, data = publish(server, "/v.img", MiB)
    tmp = tmp_path / "images" / "tmp"
    tmp.mkdir(parents=True)
    key = key_of("image-url", url)
    (tmp / f"{key}.part").write_bytes(b"old version" * 1000)
    (tmp / f"{key}.json").write_text(json.dumps(
        {"url": url, "algorithm": "sha256", "expected": sha256(data)}))
    image = store.pull(url, sha256=sha256(data), cache=tmp_path)
    assert image.path.read_bytes() == data
    assert server.gets("/v.img") == ["bytes=11000-", None]


def test_stampede_makes_one_download(server: Server, tmp_path: Path) -> None:
    url, data = publish(server, "/ubuntu.img", 2 * MiB)
    server.delay = 0.01  # about 0.3 s of download, so that the others have to wait
    procs = [pull_process(url, sha256(data), tmp_path) for _ in range(20)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0] * 20, [err for _, err in results]
    assert {out.strip() for out, _ in results} == {sha256(data)}
    assert server.gets("/ubuntu.img") == [None]
    assert server.sent["/ubuntu.img"] == len(data)
    assert store_files(tmp_path)["blobs"] == [sha256(data)]


# -- import, list, remove, prune --


def test_import_keeps_sparse_files_sparse(tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    with open(source, "wb") as f:
        f.write(b"boot" * 1024)
        f.seek(32 * MiB)
        f.write(b"data" * 1024)
        f.truncate(64 * MiB)
    image = store.import_image(source, cache=tmp_path / "cache")
    assert image.name == "disk.raw"
    assert image.size == 64 * MiB
    assert image.digest == sha256_file(source) == sha256_file(image.path)
    assert image.path.stat().st_blocks * 512 < 4 * MiB
    assert image.path.stat().st_mode & 0o777 == 0o444
    assert store_files(tmp_path / "cache")["tmp"] == []


def test_import_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError):
        store.import_image(tmp_path / "nope.img", cache=tmp_path)


def make_image(tmp_path: Path, name: str, seed: int) -> store.StoredImage:
    source = tmp_path / f"{name}.src"
    source.write_bytes(image_bytes(1000 + seed, seed))
    return store.import_image(source, name=name, cache=tmp_path / "cache")


def test_list_remove_prune(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    kept = make_image(tmp_path, "kept", 1)
    orphan = make_image(tmp_path, "orphan", 2)
    running = make_image(tmp_path, "running", 3)
    assert [i.name for i in store.list_images(cache)] == ["kept", "orphan", "running"]

    store.remove("orphan", cache)
    store.remove("running", cache)
    with pytest.raises(ImageError):
        store.remove("orphan", cache)
    listed = store.list_images(cache)
    assert [i.name for i in listed] == ["kept", None, None]
    assert {i.digest for i in listed[1:]} == {orphan.digest, running.digest}

    tmp = cache / "images" / "tmp"
    (tmp / "dead.part").write_bytes(b"partial")
    (tmp / "dead.json").write_text("{}")
    (tmp / "live.part").write_bytes(b"partial")
    with locked(tmp / "live.lock"):
        removed = store.prune(cache, in_use=lambda: {running.digest})
    assert removed == [orphan.digest]
    assert sorted(p.name for p in (cache / "images" / "blobs").iterdir()) == sorted(
        [kept.digest, running.digest])
    assert not (tmp / "dead.part").exists() and not (tmp / "dead.json").exists()
    assert (tmp / "live.part").exists()
    # Without the live run holding it, the unnamed blob goes too.
    assert store.prune(cache) == [running.digest]
    assert store.prune(cache) == []
    assert [i.name for i in store.list_images(cache)] == ["kept"]


def test_pull_cleans_only_old_dead_parts(server: Server, tmp_path: Path) -> None:
    url, data = publish(server, "/c.img", 1000)
    tmp = tmp_path / "images" / "tmp"
    tmp.mkdir(parents=True)
    sidecar = json.dumps({"url": "http://example.org/x.img", "algorithm": "sha256",
                          "expected": "0" * 64})
    for key in ("young", "old"):
        (tmp / f"{key}.part").write_bytes(b"x")
        (tmp / f"{key}.json").write_text(sidecar)
    # Parts that cannot be resumed go at once, whatever their age.
    (tmp / "nosidecar.part").write_bytes(b"x")
    (tmp / "import-0123.part").write_bytes(b"x")
    (tmp / "import-0123.lock").write_bytes(b"")
    long_ago = time.time() - 3 * 24 * 3600
    os.utime(tmp / "old.part", (long_ago, long_ago))
    os.utime(tmp / "old.json", (long_ago, long_ago))
    store.pull(url, sha256=sha256(data), cache=tmp_path)
    assert (tmp / "young.part").exists()  # still resumable by its own pull
    assert not (tmp / "old.part").exists() and not (tmp / "old.json").exists()
    assert not (tmp / "nosidecar.part").exists()
    assert not (tmp / "import-0123.part").exists() and not (tmp / "import-0123.lock").exists()


def test_resolve_by_name_and_digest(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    image = make_image(tmp_path, "base", 1)
    assert store.resolve("base", cache) == image
    assert store.resolve(image.digest, cache) == image
    assert store.resolve(image.digest[:12], cache) == image
    assert store.resolve("sha256:" + image.digest[:20].upper(), cache) == image
    with pytest.raises(ImageError) as caught:
        store.resolve(image.digest[:11], cache)
    assert caught.value.hint is not None and "vmrun image ls" in caught.value.hint
    assert image.digest[:11] in str(caught.value)
    with pytest.raises(ImageError, match="nothing"):
        store.resolve("nothing", cache)

    store.remove("base", cache)
    unnamed = store.resolve(image.digest[:12], cache)
    assert unnamed.name is None and unnamed.path == image.path

    blobs = cache / "images" / "blobs"
    for digest in ("ab" * 32, "ab" * 31 + "cd"):
        (blobs / digest).write_bytes(b"")
    with pytest.raises(ImageError, match="ambiguous"):
        store.resolve("ab" * 6, cache)


def test_verify_blob_detects_a_changed_base(tmp_path: Path) -> None:
    image = make_image(tmp_path, "base", 1)
    store.verify_blob(image)
    os.chmod(image.path, 0o644)
    with open(image.path, "r+b") as f:
        f.write(b"X")
    with pytest.raises(ImageError, match="base image changed: refusing"):
        store.verify_blob(image)
    with pytest.raises(ImageError):
        store.check_unchanged(image.digest, image.path)


def test_validate_hook(server: Server, tmp_path: Path) -> None:
    url, data = publish(server, "/h.img", MiB)
    checked: list[bytes] = []

    def refuse(path: Path) -> object:
        checked.append(path.read_bytes())
        raise ImageError("unsafe image")

    with pytest.raises(ImageError, match="unsafe"):
        store.pull(url, sha256=sha256(data), cache=tmp_path, validate=refuse)
    assert checked == [data]
    assert store.list_images(tmp_path) == [] and parts(tmp_path) == []

    source = tmp_path / "local.img"
    source.write_bytes(data)
    with pytest.raises(ImageError, match="unsafe"):
        store.import_image(source, cache=tmp_path, validate=refuse)
    # Only the lock files remain (a download URL's lock is kept, see store's docstring).
    assert store.list_images(tmp_path) == []
    assert [n for n in store_files(tmp_path)["tmp"] if not n.endswith(".lock")] == []
    assert [n for n in store_files(tmp_path)["tmp"] if n.startswith("import-")] == []

    image = store.pull(url, sha256=sha256(data), cache=tmp_path, validate=lambda p: "qcow2")
    assert image.format == "qcow2"
    assert store.resolve("h.img", tmp_path).format == "qcow2"


# -- the command line --


def test_cli_ls_json_and_rm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("VMRUN_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "disk.raw"
    source.write_bytes(b"disk" * 100)
    assert cmd_image(["import", str(source), "--name", "mine", "--format", "raw"]) == 0
    capsys.readouterr()
    assert cmd_image(["ls", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(i["name"], i["digest"], i["size"]) for i in listed] == [
        ("mine", f"sha256:{sha256(b'disk' * 100)}", 400)]
    assert cmd_image(["ls"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:2] == ["mine", f"sha256:{sha256(b'disk' * 100)[:12]}"]

    with pytest.raises(ImageError) as caught:
        cmd_image(["rm", "unknown"])
    assert "unknown" in str(caught.value)
    assert cmd_image(["rm", "mine"]) == 0
    assert cmd_image(["prune"]) == 0
    assert capsys.readouterr().out == f"removed sha256:{sha256(b'disk' * 100)}\n"


def test_cli_pull_reports_once_without_a_terminal(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("VMRUN_CACHE_DIR", str(tmp_path))
    url, data = publish(server, "/cli.img", MiB)
    assert cmd_image(["pull", url, "--sha256", sha256(data), "--name", "cli"]) == 0
    out, err = capsys.readouterr()
    assert out == f"cli  sha256:{sha256(data)}\n"
    assert err.count("cli.img: 1.0 MiB") == 1 and "\r" not in err
    with pytest.raises(UsageError):
        cmd_image(["pull", url, "--sha256", "0" * 64, "--checksums", url])
    with pytest.raises(UsageError):
        cmd_image(["frobnicate"])
