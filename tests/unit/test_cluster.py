from __future__ import annotations

import hashlib
import http.server
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import vmrun.cli
from tests import ocitools as ot
from vmrun.cluster import ClusterSpec, Kind, RunResult, RunUnit, engine_for, parse_cluster
from vmrun.cluster.blobs import BlobStore, copy_into
from vmrun.cluster.dask import check_placement, needs
from vmrun.cluster.local import LocalEngine
from vmrun.errors import FetchError, UsageError, VerificationError, VmrunError

# --- --cluster URLs ------------------------------------------------------------------------


def test_cluster_urls_parse() -> None:
    assert parse_cluster("local") == ClusterSpec(Kind.LOCAL)
    dask = parse_cluster("dask://10.0.0.5:9000")
    assert (dask.kind, dask.host, dask.port, dask.address) == (
        Kind.DASK, "10.0.0.5", 9000, "tcp://10.0.0.5:9000")
    assert parse_cluster("dask://sched").port == 8786
    assert parse_cluster("slurm://") == ClusterSpec(Kind.SLURM)
    assert parse_cluster("slurm://gpu-a100") == ClusterSpec(Kind.SLURM, partition="gpu-a100")
    assert str(parse_cluster("dask://h:1")) == "dask://h:1"


@pytest.mark.parametrize(("url", "problem"), [
    ("kubernetes://x", "unknown kind of cluster"),
    ("dask:/h:1", "unknown kind of cluster"),
    ("dask://h:port", "Port could not be cast"),
    ("dask://:8786", "no scheduler host"),
    ("dask://h:1/path", "nothing may follow the address"),
    ("slurm://a b", "is not a partition name"),
    ("slurm://p?x=1", "nothing may follow the partition"),
])
def test_bad_cluster_urls_say_what_is_wrong_in_one_line(url: str, problem: str) -> None:
    with pytest.raises(UsageError, match=problem) as caught:
        parse_cluster(url)
    assert "\n" not in str(caught.value)
    assert caught.value.hint is not None and "dask://HOST:PORT" in caught.value.hint


def test_without_dask_the_engine_says_what_to_install(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    with pytest.raises(UsageError, match="needs Dask, which is not installed") as e:
        engine_for(parse_cluster("dask://127.0.0.1:1"))
    assert e.value.hint is not None and "pip install 'vmrun[dask]'" in e.value.hint
    assert vmrun.cli.main(["--cluster", "dask://127.0.0.1:1", "--", "true"]) == 125
    assert "pip install 'vmrun[dask]'" in capsys.readouterr().err


def test_vmrun_test_takes_the_same_urls_with_the_same_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "vmrun.toml").write_text('[profile.p]\ncommand = ["true"]\n')
    monkeypatch.chdir(tmp_path)
    assert vmrun.cli.main(["--cluster", "kubernetes://x", "--", "true"]) == 125
    assert vmrun.cli.main(["test", "--cluster", "kubernetes://x"]) == 125
    run_error, test_error = [line for line in capsys.readouterr().err.splitlines()
                             if "kubernetes" in line]
    assert run_error == test_error and "unknown kind of cluster" in run_error
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    assert vmrun.cli.main(["test", "--cluster", "dask://127.0.0.1:1"]) == 125
    assert "pip install 'vmrun[dask]'" in capsys.readouterr().err
    assert not (tmp_path / ".vmrun" / "results").exists()  # nothing ran


def test_local_is_the_local_engine() -> None:
    assert isinstance(engine_for(parse_cluster("local")), LocalEngine)


# --- units and results travel as JSON ----------------------------------------------------


def test_units_and_results_round_trip_through_json() -> None:
    unit = RunUnit(id="unit/x86_64/0", argv=("--arch", "x86_64", "--", "true"),
                   arch="x86_64", memory_mib=768, kvm=True, blobs=("sha256:" + "a" * 64,))
    assert RunUnit.from_json(unit.to_json()) == unit
    result = RunResult(id="u", exit_code=3, seconds=1.5, stdout_tail="x", node="n2",
                       attempts=2, timings={"boot": 1.25}, collected=("a.xml",))
    assert RunResult.from_json(result.to_json()) == result


# --- placement -----------------------------------------------------------------------------


def test_a_unit_asks_for_its_arch_memory_and_kvm() -> None:
    assert needs(RunUnit(id="a", argv=(), arch="s390x", memory_mib=512)) == {
        "arch-s390x": 1, "memory_mib": 512}
    assert needs(RunUnit(id="a", argv=(), arch="x86_64", kvm=True))["kvm"] == 1


def test_a_unit_no_worker_can_take_is_refused_before_anything_runs() -> None:
    x86 = RunUnit(id="x86_64", argv=(), arch="x86_64", memory_mib=1024)
    big = RunUnit(id="big", argv=(), arch="x86_64", memory_mib=64 * 1024)
    s390x = RunUnit(id="s390x", argv=(), arch="s390x")
    workers = [{"arch-x86_64": 2, "memory_mib": 4096}, {"arch-i386": 1, "memory_mib": 2048}]
    check_placement([x86], workers, "dask://h:1")
    for unit in (big, s390x):
        with pytest.raises(VmrunError, match=f"can run '{unit.id}': it needs arch-") as e:
            check_placement([x86, unit], workers, "dask://h:1")
        assert "arch-x86_64=2 memory_mib=4096" in str(e.value)
    with pytest.raises(VmrunError, match="no Dask worker is connected to dask://h:1"):
        check_placement([x86], [], "dask://h:1")


# --- the local engine ----------------------------------------------------------------------


def test_the_local_engine_runs_each_unit_once_and_passes_its_output() -> None:
    """Real vmrun processes that stop at their usage errors: no VM boots."""
    units = [RunUnit(id=f"bad{i}", argv=("--arch", f"nosuch{i}", "--", "true"),
                     arch="x86_64") for i in range(3)]
    seen: list[tuple[str, int, bytes]] = []
    results = LocalEngine().run(units, 2, lambda *line: seen.append(line))
    assert [r.id for r in results] == ["bad0", "bad1", "bad2"]
    assert {r.exit_code for r in results} == {125}
    assert all(r.attempts == 1 and r.node for r in results)
    for i in range(3):
        assert any(unit == f"bad{i}" and fd == 2 and f"nosuch{i}".encode() in line
                   for unit, fd, line in seen), seen
    assert "unknown architecture 'nosuch1'" in results[1].stderr_tail


# --- blobs by digest -----------------------------------------------------------------------


class BlobServer(http.server.ThreadingHTTPServer):
    """Serves BLOBS at /sha256:HEX, slowly enough that concurrent fetches would overlap,
    and counts the requests."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                data = server.blobs.get(self.path.lstrip("/"))
                if data is None:
                    self.send_error(404)
                    return
                time.sleep(0.3)
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def blob_server() -> Iterator[BlobServer]:
    good = b"the artefact\n" * 1000
    server = BlobServer({digest_of(good): good,
                         digest_of(b"what was pushed"): b"what arrived instead"})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_twenty_runs_on_a_node_fetch_a_blob_once(tmp_path: Path,
                                                 blob_server: BlobServer) -> None:
    good = b"the artefact\n" * 1000
    store = BlobStore(cache=tmp_path / "cache", sources=(blob_server.url,))
    with ThreadPoolExecutor(max_workers=20) as pool:
        paths = list(pool.map(lambda _: store.resolve(digest_of(good)), range(20)))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == good
    assert blob_server.requests == [f"/{digest_of(good)}"]
    # Another store on this node (another worker process) finds it in the cache.
    assert BlobStore(cache=tmp_path / "cache").resolve(digest_of(good)) == paths[0]
    unit = RunUnit(id="u", arch="x86_64", blobs=(digest_of(good),),
                   argv=("--image", "{" + digest_of(good) + "}", "--", "echo", "{x}"))
    assert store.substitute(unit) == ("--image", str(paths[0]), "--", "echo", "{x}")


def test_a_blob_whose_digest_does_not_match_is_refused(tmp_path: Path,
                                                       blob_server: BlobServer) -> None:
    store = BlobStore(cache=tmp_path / "cache", sources=(blob_server.url,))
    with pytest.raises(VerificationError, match="does not match its digest"):
        store.resolve(digest_of(b"what was pushed"))
    assert not list((tmp_path / "cache" / "sha256").iterdir())  # nothing kept
    with pytest.raises(FetchError, match="is in no cache or source .*Not Found"):
        store.resolve(digest_of(b"never served"))
    with pytest.raises(UsageError, match="is not a blob digest"):
        store.resolve("sha256:../../etc/passwd")


def test_a_shared_directory_comes_before_the_network(tmp_path: Path) -> None:
    blob = tmp_path / "artefact"
    blob.write_bytes(b"shared\n")
    copy_into(tmp_path / "shared", blob)
    store = BlobStore(cache=tmp_path / "cache", shared=tmp_path / "shared",
                      sources=("http://127.0.0.1:9",))  # nothing listens: never asked
    assert store.resolve(digest_of(b"shared\n")).read_bytes() == b"shared\n"
    corrupt = tmp_path / "shared" / "sha256" / digest_of(b"other").removeprefix("sha256:")
    corrupt.write_bytes(b"not other")
    with pytest.raises(VerificationError):
        store.resolve(digest_of(b"other"))


@pytest.mark.skipif(ot.REGISTRY is None, reason="needs docker-registry")
def test_a_blob_comes_from_an_oci_registry(tmp_path: Path) -> None:
    data = b"pushed to the registry\n" * 100
    with ot.registry(tmp_path / "registry") as registry:
        start = urllib.request.Request(f"{registry.base}/v2/test/blobs/blobs/uploads/",
                                       method="POST")
        with urllib.request.urlopen(start) as response:
            location = urllib.parse.urljoin(registry.base, response.headers["Location"])
        glue = "&" if "?" in location else "?"
        put = urllib.request.Request(f"{location}{glue}digest={digest_of(data)}", data=data,
                                     method="PUT",
                                     headers={"Content-Type": "application/octet-stream"})
        urllib.request.urlopen(put).close()
        store = BlobStore(cache=tmp_path / "cache",
                          sources=(f"oci://{registry.host}/test/blobs",))
        assert store.resolve(digest_of(data)).read_bytes() == data
