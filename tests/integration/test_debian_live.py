from __future__ import annotations

import socket
from pathlib import Path

import pytest

from vmrun.debian import DEFAULT_MIRROR
from vmrun.debian.archive import fetch_deb, find_verifier, load_index
from vmrun.debian.deb import extract_deb, read_control

pytestmark = pytest.mark.network


def test_bookworm_amd64_has_busybox_static(tmp_path: Path) -> None:
    try:
        socket.create_connection(("deb.debian.org", 80), timeout=5).close()
    except OSError:
        pytest.skip("deb.debian.org is unreachable")
    if find_verifier() is None:
        pytest.skip("neither gpgv nor sqv is installed")
    notices: list[str] = []
    index = load_index(
        mirror=DEFAULT_MIRROR, suite="bookworm", arch="amd64", cache=tmp_path, notice=notices.append
    )
    # Verified with the keys shipped with vmrun, or refused: never unsigned.
    assert index.signed
    record = index.lookup("busybox-static")
    assert record.filename.startswith("pool/main/b/busybox/")
    deb = fetch_deb(index, record, cache=tmp_path)
    assert read_control(deb)["Package"] == "busybox-static"
    assert "bin/busybox" in extract_deb(deb, tmp_path / "root", select=lambda p: p == "bin/busybox")
