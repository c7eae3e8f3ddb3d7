"""Foreign architectures under TCG, through the matrix mode: one VM per architecture."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.integration.vmtools import run_cli
from vmrun.matrix import first_failure

pytestmark = pytest.mark.vm

# uname -m in the guest, and the 32-bit word 0x01020304 as the guest stores it.
EXPECTED = {
    "aarch64": ("aarch64", "04030201"),
    "armv7": ("armv7l", "04030201"),
    "i386": ("i686", "04030201"),
    "s390x": ("s390x", "01020304"),  # big-endian
    "ppc64le": ("ppc64le", "04030201"),
    "riscv64": ("riscv64", "04030201"),  # Debian trixie's kernel and busybox
}
PROBE = (
    "uname -m; printf '\\001\\002\\003\\004' > /tmp/word; od -An -tx4 /tmp/word | tr -d ' '; "
    "uname -m > \"from-$(uname -m)\"; "
    "[ \"$(uname -m)\" != armv7l ] || exit 3"
)


def test_matrix_of_foreign_arches(tmp_path: Path) -> None:
    # The working directory is shared (virtiofs or 9p, as each arch allows): every guest
    # leaves a file behind.
    done = run_cli("--arch", ",".join(EXPECTED), "--jobs", "2", "--net", "none",
                   "--", "sh", "-c", PROBE, cwd=tmp_path, timeout=900)
    out = done.stdout.decode()
    err = done.stderr.decode()
    # armv7 fails on purpose: the matrix exits with the first failing code.
    assert done.returncode == 3, err
    width = max(map(len, EXPECTED))
    for arch, (machine, word) in EXPECTED.items():
        prefix = f"[{arch:<{width}}] "
        lines = [line[len(prefix):] for line in out.splitlines() if line.startswith(prefix)]
        # Bytes 01 02 03 04 read back as one 32-bit word show the guest's byte order.
        assert lines[:2] == [machine, word], (arch, lines, err)
        row = re.search(rf"^{arch}\s+(\d+)\s+(\S+)\s+(\S+)$", err, re.MULTILINE)
        assert row, err
        assert int(row.group(1)) == (3 if arch == "armv7" else 0)
        assert row.group(2).endswith("s") and row.group(3).endswith("s")
        assert (tmp_path / f"from-{machine}").read_text() == f"{machine}\n"


def test_first_failure_is_in_arch_order() -> None:
    assert first_failure([0, 0]) == 0
    assert first_failure([0, 3, 1]) == 3
    assert first_failure([120, 3]) == 120


def test_an_image_for_a_foreign_arch_runs_on_that_arch(tmp_path: Path) -> None:
    from tests.unit.test_partitions import by_arch, gpt_disk

    image = tmp_path / "s390x.raw"
    gpt_disk(image, [by_arch("s390x")])
    done = run_cli("--arch", "s390x", "--image", str(image), "--share", "none", "--net",
                   "none", "--", "sh", "-c", "head -c 520 /dev/vda | tail -c 8", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"EFI PART"
    wrong = run_cli("--arch", "aarch64", "--image", str(image), "--", "true", cwd=tmp_path)
    assert wrong.returncode == 125
    assert b"is for s390x" in wrong.stderr
