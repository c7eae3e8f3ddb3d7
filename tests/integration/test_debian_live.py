from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from vmrun.debian import DEFAULT_MIRROR
from vmrun.debian.archive import DEFAULT_KEYRING, fetch_deb, load_index
from vmrun.debian.deb import extract_deb, read_control

pytestmark = pytest.mark.network


def test_bookworm_amd64_has_busybox_static(tmp_path: Path) -> None:
    try:
        socket.create_connection(("deb.debian.org", 80), timeout=5).close()
    except OSError:
        pytest.skip("deb.debian.org is unreachable")
    notices: list[str] = []
    index = load_index(
        mirror=DEFAULT_MIRROR, suite="bookworm", arch="amd64", cache=tmp_path, notice=notices.append
    )
    can_verify = DEFAULT_KEYRING.is_file() and shutil.which("gpgv") is not None
    assert index.signed == can_verify
    record = index.lookup("busybox-static")
    assert record.filename.startswith("pool/main/b/busybox/")
    deb = fetch_deb(index, record, cache=tmp_path)
    assert read_control(deb)["Package"] == "busybox-static"
    assert "bin/busybox" in extract_deb(deb, tmp_path / "root", select=lambda p: p == "bin/busybox")
