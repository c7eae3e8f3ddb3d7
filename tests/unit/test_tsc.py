from __future__ import annotations

from vmrun.qemu.arch import ARCHES, host_tsc_khz
from vmrun.qemu.argv import kernel_cmdline

INTEL = """processor\t: 0
model name\t: Intel(R) Xeon(R) Gold 6230 CPU @ 2.10GHz
cpu MHz\t\t: 800.000
flags\t\t: fpu tsc constant_tsc nonstop_tsc

processor\t: 1
model name\t: other
"""
AMD = "model name\t: AMD EPYC\ncpu MHz\t\t: 2596.130\nflags\t\t: tsc constant_tsc\n"
NO_CONSTANT = "model name\t: Old @ 3.00GHz\ncpu MHz\t\t: 3000.000\nflags\t\t: tsc\n"


def test_intel_brand_string_gives_the_nominal_rate_not_the_current_clock() -> None:
    assert host_tsc_khz(INTEL) == 2_100_000


def test_cpu_mhz_is_the_fallback() -> None:
    assert host_tsc_khz(AMD) == 2_596_130


def test_a_tsc_that_is_not_constant_is_not_trusted() -> None:
    assert host_tsc_khz(NO_CONSTANT) is None


def test_cmdline_carries_the_rate_only_when_given() -> None:
    x86 = ARCHES["x86_64"]
    assert "tsc_early_khz=2100000" in kernel_cmdline(x86, console=False, tsc_khz=2_100_000)
    assert "tsc_early_khz" not in kernel_cmdline(x86, console=False)
