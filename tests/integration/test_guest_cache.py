"""Twenty processes ask for the guest at once on an empty cache (RELIABILITY case 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.debian_fixtures import (
    Behaviour,
    Signer,
    build_archive,
    have_gpg,
    recording_handler,
    serve,
    signing_key,
)
from tests.unit.test_guest_fetch import GUEST_PACKAGES, RELEASE

PROCESSES = 20
REPO = Path(__file__).resolve().parents[2]
ASK = """
import json, sys
from pathlib import Path
from vmrun.guest.build import ensure_guest
from vmrun.cache import sha256_file
from vmrun.qemu.arch import lookup_arch
guest = ensure_guest(lookup_arch("x86_64"), mirror=sys.argv[1], cache=Path(sys.argv[2]))
print(json.dumps({"kernel": str(guest.kernel), "initrd": str(guest.initrd),
                  "release": guest.release, "kernel_sha256": sha256_file(guest.kernel),
                  "initrd_sha256": sha256_file(guest.initrd)}))
"""


@pytest.fixture(scope="module")
def signer() -> Iterator[Signer]:
    if not have_gpg():
        pytest.skip("gpg is not installed")
    with signing_key() as key:
        yield key


def test_stampede_on_an_empty_cache_fetches_each_file_once(
    tmp_path: Path, signer: Signer
) -> None:
    behaviour = Behaviour()
    env = {
        **os.environ,
        "VMRUN_DEBIAN_KEYRING": str(signer.keyring),
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),
    }
    for name in ("VMRUN_DEBIAN_SUITE", "VMRUN_INSECURE_UNVERIFIED_GUEST"):
        env.pop(name, None)
    cache = tmp_path / "cache"
    with serve(tmp_path / "mirror", recording_handler(behaviour)) as mirror:
        build_archive(mirror, signer=signer, packages=GUEST_PACKAGES)
        started = time.monotonic()
        children = [
            subprocess.Popen([sys.executable, "-c", ASK, mirror.url, str(cache)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(PROCESSES)
        ]
        outcomes = [child.communicate(timeout=600) for child in children]
        elapsed = time.monotonic() - started
    codes = [child.returncode for child in children]
    assert codes == [0] * PROCESSES, [err for _, err in outcomes if err][:1]
    results = {out for out, _ in outcomes}
    assert len(results) == 1, results
    result = json.loads(results.pop())
    assert result["release"] == RELEASE
    counts = Counter(path for path, _ in behaviour.requests)
    assert counts and set(counts.values()) == {1}, counts
    print(f"{PROCESSES} processes in {elapsed:.1f} s; requests: {dict(counts)}")
