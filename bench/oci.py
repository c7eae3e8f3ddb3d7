"""OCI images: pull against skopeo, conversion speed, and a cached run against a plain one.

    python bench/oci.py [--runs N] [--mb SIZE]

(a) vmrun's pull of a multi-layer image of about SIZE MB from a local docker-registry
    against `skopeo copy` of the same image to an OCI layout (target: at most 1.2x);
(b) conversion of the pulled layers to the squashfs root, in MB/s of uncompressed layer
    data (no baseline: the issue's figures for mksquashfs-style tools are 190 MB/s);
(c) a cached `vmrun --image docker://... -- true` against `vmrun -- true` (target: at most
    1.2x), alternated so that drift on the host hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]  # this checkout, and its tests' image tools

from tests import ocitools as ot  # noqa: E402
from vmrun.oci import pull  # noqa: E402
from vmrun.oci.layers import Layer  # noqa: E402
from vmrun.oci.reference import parse_reference  # noqa: E402
from vmrun.oci.rootfs import build_rootfs  # noqa: E402
from vmrun.oci.sources import open_source  # noqa: E402

TARGET = 1.2
LAYERS = 4


def big_image(megabytes: int) -> tuple[ot.Image, int]:
    """Busybox, then LAYERS layers of 1 MB files (half random, half text): and the bytes
    of uncompressed layer data."""
    layers = [(ot.busybox_layer(), "gzip")]
    per_layer = max(1, megabytes // LAYERS)
    for number in range(LAYERS):
        entries = [ot.directory(f"data{number}")]
        for index in range(per_layer):
            body = os.urandom(1 << 19) + (f"line {index}\n" * 60000)[: 1 << 19].encode()
            entries.append(ot.file(f"data{number}/f{index}", body))
        layers.append((entries, "gzip"))
    uncompressed = sum(len(ot.tar_of(entries)) for entries, _ in layers)
    return ot.make_image(layers, config={"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}), uncompressed


def vmrun_pull(reference: str, cache: Path) -> list[Layer]:
    """What ensure_root_image fetches, without the conversion."""
    root = cache / "oci"
    with open_source(parse_reference(reference)) as source:
        data, declared, digest = source.resolve()
        _, manifest = pull._platform_manifest(source, reference, data, declared, digest,
                                              "x86_64")
        config = pull._fetch_config(root, source, manifest, reference, "x86_64")
        return pull._fetch_layers(root, source, manifest, config, None)


def timed(action: Callable[[], object]) -> float:
    start = time.monotonic()
    action()
    return time.monotonic() - start


def line(label: str, ours: float, base: float, unit: str = "s",
         target: float | None = None) -> None:
    ratio = ours / base
    verdict = "" if target is None else ("  ok" if ratio <= target else f"  over {target}x")
    print(f"{label:<44} vmrun {ours:8.3f} {unit}  baseline {base:8.3f} {unit}  "
          f"ratio {ratio:5.2f}x{verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mb", type=int, default=100)
    args = parser.parse_args()
    if ot.REGISTRY is None or ot.SKOPEO is None:
        sys.exit("needs docker-registry and skopeo")
    with tempfile.TemporaryDirectory(prefix="vmrun-bench-oci-") as tmp:
        work = Path(tmp)
        image, uncompressed = big_image(args.mb)
        compressed = sum(len(blob) for blob in image.blobs.values())
        print(f"image: {LAYERS + 1} layers, {compressed / 1e6:.1f} MB compressed, "
              f"{uncompressed / 1e6:.1f} MB uncompressed")
        with ot.registry(work / "registry") as running:
            ot.push(running.base, "bench/big", "v1", image)
            reference = f"docker://{running.host}/bench/big:v1"
            ours, theirs = [], []
            for run in range(args.runs):
                cache, layout = work / f"c{run}", work / f"skopeo{run}"
                ours.append(timed(partial(vmrun_pull, reference, cache)))
                theirs.append(timed(partial(subprocess.run, [
                    str(ot.SKOPEO), "copy", "--quiet", "--src-tls-verify=false", reference,
                    f"oci:{layout}:v1"], check=True)))
            line("(a) pull (median)", statistics.median(ours), statistics.median(theirs),
                 target=TARGET)
            layers = vmrun_pull(reference, work / "c0")
            seconds = timed(lambda: build_rootfs(layers, work / "root.sqfs",
                                                 log=work / "tar2sqfs.log"))
            print(f"{'(b) conversion':<44} {uncompressed / 1e6 / seconds:8.1f} MB/s "
                  f"({uncompressed / 1e6:.1f} MB in {seconds:.2f} s; issue's mksquashfs-style "
                  "figure: 190 MB/s)")
            run_cached(reference, work, args.runs)


def run_cached(reference: str, work: Path, runs: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    vmrun = [sys.executable, "-m", "vmrun", "--share", "none", "--net", "none"]
    subprocess.run([*vmrun, "--image", reference, "--", "true"], env=env, check=True,
                   cwd=work)  # pulls and converts: not timed
    image_runs, plain_runs = [], []
    for _ in range(runs):
        image_runs.append(timed(lambda: subprocess.run(
            [*vmrun, "--image", reference, "--", "true"], env=env, check=True, cwd=work)))
        plain_runs.append(timed(lambda: subprocess.run(
            [*vmrun, "--", "true"], env=env, check=True, cwd=work)))
    line("(c) cached --image docker://... -- true", statistics.median(image_runs),
         statistics.median(plain_runs), target=TARGET)


if __name__ == "__main__":
    main()
