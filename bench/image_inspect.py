"""`inspect_image` (pure Python, in process) against `qemu-img info --output=json`.

    python bench/image_inspect.py [--runs N] [--snapshots N]

Two images: a 100 GiB qcow2 with 8 MiB written, and a small qcow2 with N internal
snapshots (default 200: one `qemu-img snapshot -c` each, and 1000 take about 2 minutes).
qemu-img's time includes its process start, which is what vmrun would pay to call it.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))  # benchmark this checkout, installed or not

from vmrun.images.formats import inspect_image  # noqa: E402

QEMU_IMG = "qemu-img"


def qemu_img(*args: str | Path) -> None:
    subprocess.run([QEMU_IMG, *map(str, args)], check=True, capture_output=True)


def make_sparse(workdir: Path) -> Path:
    raw = workdir / "data.raw"
    raw.write_bytes(os.urandom(8 << 20))
    image = workdir / "sparse.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, image)
    qemu_img("resize", "-f", "qcow2", image, "100G")
    return image


def make_snapshots(workdir: Path, count: int) -> Path:
    image = workdir / "snapshots.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1G")
    for i in range(count):
        qemu_img("snapshot", "-c", f"snapshot-{i}", image)
    return image


def median_time(action: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--snapshots", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmrun-bench-") as tmp:
        workdir = Path(tmp)
        images = [("100 GiB sparse", make_sparse(workdir))]
        if args.snapshots:
            start = time.perf_counter()
            image = make_snapshots(workdir, args.snapshots)
            print(f"made {args.snapshots} snapshots in {time.perf_counter() - start:.1f} s")
            images.append((f"{args.snapshots} snapshots", image))
        print(f"{'image':<20} {'inspect_image':>14} {'qemu-img info':>14} {'ratio':>8}")
        for label, image in images:
            ours = median_time(functools.partial(inspect_image, image), args.runs)
            argv = [QEMU_IMG, "info", "--output=json", "-U", "-f", "qcow2", str(image)]
            theirs = median_time(
                functools.partial(subprocess.run, argv, check=True, capture_output=True),
                args.runs,
            )
            print(f"{label:<20} {ours * 1e3:>11.2f} ms {theirs * 1e3:>11.2f} ms "
                  f"{ours / theirs:>7.3f}x")


if __name__ == "__main__":
    main()
