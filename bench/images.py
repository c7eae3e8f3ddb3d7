"""Image store figures, each next to its baseline in the same run.

    python bench/images.py [--size-mib N] [--runs N]

- pull: `vmrun image pull URL --sha256 H` (download, hash while streaming, verify, store
  read-only) against `curl -o` of the same file from the same local HTTP server;
- overlay: `vmrun disk overlay BASE NEW` against `qemu-img create -b BASE -F raw` directly
  (both whole processes, as a user runs them).
Header inspection has its own benchmark: bench/image_inspect.py.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def compare(runs: int, ours: Callable[[int], float],
            baseline: Callable[[int], float]) -> tuple[float, float]:
    """Alternate the two RUNS times; their medians."""
    a: list[float] = []
    b: list[float] = []
    for run in range(runs):
        a.append(ours(run))
        b.append(baseline(run))
    return statistics.median(a), statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("images.py: curl is needed for the baseline")
    with tempfile.TemporaryDirectory(prefix="vmrun-bench-images-") as tmp:
        root = Path(tmp)
        site = root / "site"
        site.mkdir()
        image = site / "image.raw"
        image.write_bytes(os.urandom(args.size_mib << 20))
        digest = hashlib.sha256(image.read_bytes()).hexdigest()
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "0"],
            cwd=site, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline().split("port ")[1].split()[0])
            url = f"http://127.0.0.1:{port}/image.raw"
            env = {**os.environ, "PYTHONPATH": str(SRC)}

            def pull(run: int) -> float:
                env["VMRUN_CACHE_DIR"] = str(root / f"cache-{run}")
                took = timed([sys.executable, "-m", "vmrun", "image", "pull", url,
                              "--sha256", digest], env)
                shutil.rmtree(root / f"cache-{run}")
                return took

            def curl(run: int) -> float:
                took = timed(["curl", "-s", "-o", str(root / "curl.raw"), url])
                (root / "curl.raw").unlink()
                return took

            pulled, curled = compare(args.runs, pull, curl)
        finally:
            server.terminate()
            server.wait()

        base = root / "base.raw"
        image.rename(base)

        def overlay(run: int) -> float:
            return timed([sys.executable, "-m", "vmrun", "disk", "overlay", str(base),
                          str(root / f"ours-{run}.qcow2")], {**os.environ,
                                                              "PYTHONPATH": str(SRC)})

        def qemu_img(run: int) -> float:
            return timed(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base),
                          "-F", "raw", str(root / f"theirs-{run}.qcow2")])

        ours, theirs = compare(max(args.runs, 5), overlay, qemu_img)

        sys.path.insert(0, str(SRC))
        from vmrun.images import disk

        def in_process(run: int) -> float:
            start = time.monotonic()
            disk.overlay(base, root / f"lib-{run}.qcow2", base_format="raw")
            return time.monotonic() - start

        library, _ = compare(max(args.runs, 5), in_process, qemu_img)

    mib = args.size_mib
    print(f"images: medians of {args.runs} runs ({mib} MiB image, local HTTP server)")
    print(f"{'':<22}{'vmrun':>12}{'baseline':>12}{'ratio':>9}")
    print(f"{'pull vs curl':<22}{pulled:>11.2f}s{curled:>11.2f}s{pulled / curled:>8.2f}x"
          f"   ({mib / pulled:.0f} vs {mib / curled:.0f} MiB/s)")
    print(f"{'overlay vs qemu-img':<22}{ours * 1000:>10.0f}ms{theirs * 1000:>10.0f}ms"
          f"{ours / theirs:>8.2f}x   (the vmrun command, Python start-up included)")
    print(f"{'disk.overlay() call':<22}{library * 1000:>10.0f}ms{theirs * 1000:>10.0f}ms"
          f"{library / theirs:>8.2f}x   (the library call, in process)")


if __name__ == "__main__":
    main()
