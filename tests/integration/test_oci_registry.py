"""Pulls from real registries: Debian's docker-registry (anonymous, htpasswd), pushed to by
skopeo and by hand, behind a Bearer-token server and a redirect to a separate blob host."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import ocitools as ot
from vmrun.errors import FetchError, UsageError
from vmrun.oci import pull as oci_pull

pytestmark = pytest.mark.skipif(
    ot.REGISTRY is None or ot.TAR2SQFS is None or ot.SQFS2TAR is None,
    reason="needs docker-registry and squashfs-tools-ng")
TOKEN = "tok-0123456789"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ot.RunningRegistry]:
    with ot.registry(tmp_path / "registry") as running:
        yield running


@pytest.mark.skipif(ot.SKOPEO is None, reason="needs skopeo")
def test_skopeo_pushed_index_pulls_per_architecture(tmp_path: Path,
                                                    registry: ot.RunningRegistry) -> None:
    layout = ot.multiarch_layout(tmp_path / "layout")
    subprocess.run([str(ot.SKOPEO), "copy", "--all", "--dest-tls-verify=false",
                    f"oci:{layout}:multi", f"docker://{registry.host}/test/multi:v1"],
                   check=True, capture_output=True, timeout=300)
    cache = tmp_path / "cache"
    seen: list[tuple[str, int, int | None]] = []
    s390x = oci_pull.ensure_root_image(f"docker://{registry.host}/test/multi:v1", arch="s390x",
                                       cache=cache, progress=lambda *a: seen.append(a))
    assert ot.files_of(s390x.path)["etc/arch"][1] == b"s390x"
    finished = {label for label, done, total in seen if done == total}
    # Every layer reported, to its end, and then the conversion to a root image.
    assert len(finished) == 4 and seen[-1][1] == seen[-1][2]
    assert seen[-1][0].startswith("converting 3 layers of docker://")
    amd64 = oci_pull.ensure_root_image(f"docker://{registry.host}/test/multi:v1",
                                       arch="x86_64", cache=cache)
    assert ot.files_of(amd64.path)["etc/arch"][1] == b"amd64"
    assert amd64.digest == s390x.digest != amd64.manifest_digest
    with pytest.raises(UsageError, match="has no image for ppc64le"):
        oci_pull.ensure_root_image(f"docker://{registry.host}/test/multi:v1", arch="ppc64le",
                                   cache=cache)
    pinned = f"docker://{registry.host}/test/multi@{s390x.digest}"
    registry_pinned = oci_pull.ensure_root_image(pinned, arch="s390x", cache=cache)
    assert registry_pinned.path == s390x.path


def test_digest_reference_is_served_from_cache_without_the_registry(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with ot.registry(tmp_path / "registry") as running:
        image = ot.marker_image("amd64")
        ot.push(running.base, "test/app", "v1", image)
        pinned = f"docker://{running.host}/test/app@{image.digest}"
        first = oci_pull.ensure_root_image(pinned, arch="x86_64", cache=cache)
    # The registry is gone: a second run converts nothing and asks nobody.
    assert oci_pull.ensure_root_image(pinned, arch="x86_64", cache=cache) == first
    with pytest.raises(FetchError):
        oci_pull.ensure_root_image(f"docker://{running.host}/test/app:v1", arch="x86_64",
                                   cache=cache)


def test_docker_schema2_pushed_by_hand(tmp_path: Path, registry: ot.RunningRegistry) -> None:
    image = ot.make_image([(ot.busybox_layer(), "gzip"),
                           ([ot.file("hello", "docker")], "gzip")], docker=True)
    ot.push(registry.base, "library/hello", "latest", image)
    root = oci_pull.ensure_root_image(f"docker://{registry.host}/library/hello",
                                      arch="x86_64", cache=tmp_path / "cache")
    assert ot.files_of(root.path)["hello"][1] == b"docker"
    with pytest.raises(FetchError, match="HTTP 404"):
        oci_pull.ensure_root_image(f"docker://{registry.host}/library/nothing:here",
                                   arch="x86_64", cache=tmp_path / "cache")


@pytest.mark.skipif(ot.HTPASSWD is None, reason="needs htpasswd (apache2-utils)")
def test_htpasswd_registry_with_credentials_from_auth_json(tmp_path: Path) -> None:
    htpasswd = ot.write_htpasswd(tmp_path / "htpasswd", "tester", "s3cret")
    with ot.registry(tmp_path / "registry", htpasswd=htpasswd) as running:
        image = ot.marker_image("amd64")
        ot.push(running.base, "private/app", "v1", image, ot.basic("tester", "s3cret"))
        reference = f"docker://{running.host}/private/app:v1"
        with pytest.raises(FetchError, match="wants a user name and password"):
            oci_pull.ensure_root_image(reference, arch="x86_64", cache=tmp_path / "c",
                                       auth_files=[])
        wrong = tmp_path / "wrong.json"
        wrong.write_text(json.dumps({"auths": {running.host: {"auth": "dGVzdGVyOm5v"}}}))
        with pytest.raises(FetchError, match="401"):
            oci_pull.ensure_root_image(reference, arch="x86_64", cache=tmp_path / "c",
                                       auth_files=[wrong])
        docker_config = tmp_path / "home" / ".docker" / "config.json"
        docker_config.parent.mkdir(parents=True)
        docker_config.write_text(json.dumps({"auths": {f"http://{running.host}": {
            "auth": "dGVzdGVyOnMzY3JldA=="}}}))  # tester:s3cret
        root = oci_pull.ensure_root_image(reference, arch="x86_64", cache=tmp_path / "c",
                                          auth_files=[tmp_path / "none.json", docker_config])
    assert ot.files_of(root.path)["etc/arch"][1] == b"amd64"


class TokenFront:
    """A Bearer-token registry front: 401 + WWW-Authenticate, /token, blobs redirected
    to a separate blob host (another port) that forwards to the registry."""

    def __init__(self, registry: str, cut_first_blob: bool = False) -> None:
        self.registry = registry
        self.cut_first_blob = cut_first_blob
        self.cut_done = False
        self.lock = threading.Lock()
        self.base = ""
        self.blob_base = ""

    def blob_host(self, handler: http.server.BaseHTTPRequestHandler, seen: ot.Seen) -> None:
        big = handler.headers.get("Range") is None and self.cut_first_blob
        with self.lock:
            cut = big and not self.cut_done and "sig=ok" in handler.path
            self.cut_done = self.cut_done or cut
        path = urllib.parse.urlsplit(handler.path).path
        if not cut:
            ot.forward(handler, self.registry + path)
            return
        with urllib.request.urlopen(self.registry + path, timeout=30) as response:
            body = response.read()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[: len(body) // 2])
        handler.wfile.flush()
        handler.close_connection = True

    def front(self, handler: http.server.BaseHTTPRequestHandler, seen: ot.Seen) -> None:
        if handler.path.startswith("/token"):
            ot.reply(handler, 200, json.dumps({"token": TOKEN}).encode(),
                     {"Content-Type": "application/json"})
            return
        if handler.headers.get("Authorization") != f"Bearer {TOKEN}":
            ot.reply(handler, 401, b"{}", {
                "WWW-Authenticate": f'Bearer realm="{self.base}/token",service="test",'
                                    'scope="repository:test/app:pull"'})
            return
        if "/blobs/" in handler.path:
            ot.reply(handler, 307, headers={"Location": f"{self.blob_base}{handler.path}"
                                                        "?sig=ok"})
            return
        ot.forward(handler, self.registry + handler.path)


def test_bearer_token_flow_and_redirected_blobs_without_authorization(
        tmp_path: Path, registry: ot.RunningRegistry) -> None:
    image = ot.make_image([(ot.busybox_layer(), "gzip"),
                           ([ot.file("big", os.urandom(3 << 20))], "gzip"),
                           ([ot.file("small", "z")], "zstd")])
    ot.push(registry.base, "test/app", "v1", image)
    front = TokenFront(registry.base, cut_first_blob=True)
    with ot.serve(front.blob_host) as (blob_base, blob_seen), \
            ot.serve(front.front) as (base, front_seen):
        front.base, front.blob_base = base, blob_base
        host = base.removeprefix("http://")
        results: list[oci_pull.RootImage] = []
        errors: list[BaseException] = []

        def pull() -> None:
            try:
                results.append(oci_pull.ensure_root_image(
                    f"docker://{host}/test/app:v1", arch="x86_64", cache=tmp_path / "cache"))
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=pull) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    assert not errors and len(results) == 4 and len({r.path for r in results}) == 1
    tree = ot.files_of(results[0].path)
    assert tree["small"][1] == b"z" and len(tree["big"][1]) == 3 << 20
    token_requests = [p for _, p, _ in front_seen.requests if p.startswith("/token")]
    assert token_requests and all("scope=repository%3Atest%2Fapp%3Apull" in p and
                                  "service=test" in p for p in token_requests)
    assert all("Authorization" not in h for _, _, h in blob_seen.requests)
    blob_paths = [p for _, p, h in blob_seen.requests]
    # Four concurrent pulls fetched each of the 4 blobs once, plus one resumed range request.
    assert len(blob_paths) == 5 and len(set(blob_paths)) == 4
    (resumed,) = [h["Range"] for _, _, h in blob_seen.requests if h.get("Range")]
    assert resumed in {f"bytes={len(blob) // 2}-" for blob in image.blobs.values()}
