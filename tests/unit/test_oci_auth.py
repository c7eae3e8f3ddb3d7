"""Registry credentials, challenges, loopback detection and redirects that drop Authorization."""

from __future__ import annotations

import base64
import http.server
import json
from pathlib import Path

import pytest

from tests import ocitools as ot
from vmrun.errors import FetchError
from vmrun.oci.auth import Credentials, auth_files, find_credentials
from vmrun.oci.reference import RegistryRef
from vmrun.oci.registry import Registry, is_loopback, parse_challenge


def auth_json(path: Path, auths: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths}))
    return path


def encoded(user: str, password: str) -> dict[str, str]:
    return {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_auth_files_in_order(tmp_path: Path) -> None:
    env = {"REGISTRY_AUTH_FILE": "/r/auth.json", "XDG_RUNTIME_DIR": "/run/user/1",
           "HOME": str(tmp_path)}
    assert auth_files(env) == [
        Path("/r/auth.json"), Path("/run/user/1/containers/auth.json"),
        tmp_path / ".config/containers/auth.json", tmp_path / ".docker/config.json"]
    assert auth_files({"HOME": "/h", "DOCKER_CONFIG": "/d"})[-1] == Path("/d/config.json")


def test_docker_hub_and_other_keys(tmp_path: Path) -> None:
    docker = auth_json(tmp_path / "config.json", {
        "https://index.docker.io/v1/": encoded("hub", "pw1"),
        "127.0.0.1:5000": encoded("local", "pw:with:colons"),
        "quay.io": encoded("quay", "pw2"),
        "quay.io/org": encoded("org", "pw3"),
        "broken.io": {"auth": "%%%"},
    })
    files = [docker]
    assert find_credentials("docker.io", "library/debian", files) == Credentials("hub", "pw1")
    assert find_credentials("127.0.0.1:5000", "x", files) == Credentials("local",
                                                                         "pw:with:colons")
    assert find_credentials("quay.io", "org/app", files) == Credentials("org", "pw3")
    assert find_credentials("quay.io", "other/app", files) == Credentials("quay", "pw2")
    assert find_credentials("quay.io", "organisation/app", files) == Credentials("quay", "pw2")
    assert find_credentials("broken.io", "x", files) is None
    assert find_credentials("127.0.0.1:5001", "x", files) is None
    assert "pw1" not in repr(Credentials("hub", "pw1"))


def test_first_file_with_an_entry_wins(tmp_path: Path) -> None:
    first = auth_json(tmp_path / "a.json", {"r.io": encoded("first", "1")})
    second = auth_json(tmp_path / "b.json", {"r.io": encoded("second", "2"),
                                             "s.io": encoded("s", "3")})
    missing, garbage = tmp_path / "missing.json", tmp_path / "garbage.json"
    garbage.write_text("not json")
    files = [missing, garbage, first, second]
    assert find_credentials("r.io", "x", files) == Credentials("first", "1")
    assert find_credentials("s.io", "x", files) == Credentials("s", "3")


def test_parse_challenge() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                      "scope": "repository:library/busybox:pull"}
    assert parse_challenge('Basic realm="x \\"y\\""') == ("basic", {"realm": 'x "y"'})
    assert parse_challenge("Bearer realm=bare, error=insufficient_scope")[1] == {
        "realm": "bare", "error": "insufficient_scope"}


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1:5000", True), ("127.1.2.3", True), ("localhost:80", True), ("[::1]:5000", True),
    ("LOCALHOST", True), ("10.0.0.1:5000", False), ("registry.io", False),
    ("localhost.evil.io", False), ("[2001:db8::1]:443", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_registries_off_loopback_use_https() -> None:
    assert Registry(RegistryRef("quay.io", "a")).base == "https://quay.io/v2/a"
    assert Registry(RegistryRef("docker.io", "library/a")).base.startswith(
        "https://registry-1.docker.io/")
    assert Registry(RegistryRef("10.1.1.1:5000", "a"), insecure=True).base.startswith("http://")
    assert Registry(RegistryRef("127.0.0.1:5000", "a")).base.startswith("http://")


def test_authorization_never_follows_a_redirect_to_another_port() -> None:
    def blob_host(handler: http.server.BaseHTTPRequestHandler, seen: ot.Seen) -> None:
        ot.reply(handler, 200, b"blob bytes")

    with ot.serve(blob_host) as (other, other_seen):
        def registry(handler: http.server.BaseHTTPRequestHandler, seen: ot.Seen) -> None:
            if handler.path.startswith("/v2/a/same"):
                ot.reply(handler, 307, headers={"Location": "/v2/a/final"})
            elif handler.path.startswith("/v2/a/final"):
                ot.reply(handler, 200, b"same host")
            else:
                ot.reply(handler, 307, headers={"Location": f"{other}/blob?sig=1"})

        with ot.serve(registry) as (base, seen):
            host = base.removeprefix("http://")
            client = Registry(RegistryRef(host, "a"))
            client.authorization = "Bearer secret-token"
            with client.open(f"{base}/v2/a/blobs/x", {"Range": "bytes=0-"}) as response:
                assert response.read() == b"blob bytes"
            with client.open(f"{base}/v2/a/same", {}) as response:
                assert response.read() == b"same host"
    (_, _, to_other), = other_seen.requests
    assert "Authorization" not in to_other and to_other.get("Range") == "bytes=0-"
    assert [h.get("Authorization") for _, _, h in seen.requests] == ["Bearer secret-token"] * 3


def test_redirect_to_a_non_http_scheme_is_refused() -> None:
    def registry(handler: http.server.BaseHTTPRequestHandler, seen: ot.Seen) -> None:
        ot.reply(handler, 302, headers={"Location": "ftp://example.org/blob"})

    with ot.serve(registry) as (base, _):
        client = Registry(RegistryRef(base.removeprefix("http://"), "a"))
        with pytest.raises(FetchError, match="not http"):
            client.open(f"{base}/v2/a/blobs/x", {})
