"""Time to a running command on a cloud image: vmrun --boot full and --boot fast against
the hand-written recipe, on the same image, in one run; on the stock image and on a runner
image baked from it (the per-run boot of the bake-once, run-often workflow).

    python bench/fullboot.py [--runs N] [--image FILE] [--cpus N] [--no-baked]

The recipe is what people script today: a seed made with genisoimage (user-data with an
SSH key, meta-data with an instance id), plain QEMU booting a fresh overlay of the image
with the seed as a second virtio disk and a forwarded port, then `ssh ... true` tried once a second
until it answers; then `cloud-init status --wait`. vmrun runs `vmrun --image IMG --boot
full --share none -- true` and `--boot fast`. Both use the same machine (q35), firmware
(what vmrun picks for the image), accelerator, CPU count and memory; the runs alternate.
The image defaults to the tests' Debian cloud-style image (built from Debian packages).

The runner image is `vmrun image bake IMAGE` with an empty cloud-config (kept in the store
as bench-runner; instant after the first time). The recipe and vmrun boot it the same way
as the stock image; what differs is that vmrun's bake installed its run hook, so vmrun logs
in over a virtio-serial port before cloud-init runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from tests.cloudimage import ensure_cloud_image  # noqa: E402
from vmrun.images.partitions import read_head  # noqa: E402
from vmrun.qemu import firmware as fwlib  # noqa: E402

TARGET = 0.6
RUNNER = "bench-runner"
SSH_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "BatchMode=yes", "-o", "ConnectTimeout=2", "-o", "LogLevel=ERROR"]


def free_port() -> int:
    # What hand-written scripts do: ask for a free port, close it, hope nobody takes it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def recipe(image: Path, work: Path, cpus: int) -> dict[str, float]:
    key = work / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (work / "user-data").write_text(
        "#cloud-config\nusers:\n  - name: tester\n    sudo: ALL=(ALL) NOPASSWD:ALL\n"
        f"    ssh_authorized_keys: [\"{(work / 'key.pub').read_text().strip()}\"]\n")
    (work / "meta-data").write_text(f"instance-id: iid-{time.time_ns()}\nlocal-hostname: r\n")
    started = time.monotonic()
    seed = work / "seed.iso"
    subprocess.run(["genisoimage", "-quiet", "-output", str(seed), "-volid", "cidata",
                    "-joliet", "-rock", str(work / "user-data"), str(work / "meta-data")],
                   check=True)
    overlay = work / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2",
                    str(overlay)], check=True)
    port = free_port()
    argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max",
            "-smp", str(cpus), "-m", "1024M", "-display", "none",
            "-serial", f"file:{work / 'serial.log'}",
            "-drive", f"file={overlay},format=qcow2,if=virtio",
            # The seed as a virtio disk: Debian's cloud kernel has no AHCI for a CD-ROM.
            "-drive", f"file={seed},format=raw,if=virtio,readonly=on",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", "virtio-net-pci,netdev=n0"]
    argv += firmware_args(image, work)
    qemu = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ssh = ["ssh", *SSH_OPTIONS, "-i", str(key), "-p", str(port), "tester@127.0.0.1"]
    try:
        while subprocess.run([*ssh, "true"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL).returncode != 0:
            if qemu.poll() is not None:
                raise SystemExit("fullboot.py: the recipe's QEMU exited")
            if time.monotonic() - started > 600:
                raise SystemExit("fullboot.py: the recipe's guest never answered SSH")
            time.sleep(1)
        ssh_answered = time.monotonic() - started
        subprocess.run([*ssh, "cloud-init", "status", "--wait"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        cloud_init_done = time.monotonic() - started
    finally:
        qemu.kill()
        qemu.wait()
    return {"ssh": ssh_answered, "cloud-init": cloud_init_done}


def firmware_args(image: Path, work: Path) -> list[str]:
    kind = fwlib.choose_firmware("x86_64", fwlib.Firmware.AUTO,
                                 fwlib.bootable_by(read_head(image, "qcow2")), str(image))
    files = fwlib.firmware_files("x86_64", kind)
    if files.code is None or files.vars_template is None:
        return []
    variables = work / "vars.fd"
    variables.write_bytes(files.vars_template.read_bytes())
    return ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={files.code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={variables}"]


def bake_runner(image: Path) -> tuple[str, Path]:
    """The runner image baked from IMAGE: its store name and its layer's path."""
    from vmrun.images import store

    with tempfile.TemporaryDirectory(prefix="vmrun-bench-") as tmp:
        user_data = Path(tmp) / "user-data"
        user_data.write_text("#cloud-config\n{}\n")
        subprocess.run([sys.executable, "-m", "vmrun", "image", "bake", str(image),
                        "--user-data", str(user_data), "--name", RUNNER, "--quiet"],
                       check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    return RUNNER, store.resolve(RUNNER).path


def vmrun(image: Path | str, work: Path, boot: str, cpus: int) -> dict[str, float]:
    timings = work / f"timings-{boot}.json"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "vmrun", "--image", str(image), "--boot", boot, "--cpus",
         str(cpus), "--share", "none", "--accel", "tcg", "--timings-file", str(timings),
         "--verbose", "--", "true"],
        cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    total = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"fullboot.py: vmrun --boot {boot} failed: {done.stderr.decode()}")
    for line in done.stderr.decode(errors="replace").splitlines():
        if "SSH server on" in line:
            print(f"  {line.removeprefix('vmrun: ')}", file=sys.stderr)
    phases = json.loads(timings.read_text())
    before_command = sum(v for k, v in phases.items() if k not in ("command", "power-off",
                                                                   "shutdown", "collect"))
    return {"total": total, "ready": before_command, **phases}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--image", type=Path)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--no-baked", dest="baked", action="store_false",
                        help="only the stock image, not the runner baked from it")
    args = parser.parse_args()
    image = args.image or ensure_cloud_image()
    runner = bake_runner(image) if args.baked else None
    results: dict[str, list[dict[str, float]]] = {
        "recipe": [], "full": [], "fast": [], "recipe-baked": [], "full-baked": []}
    for run in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="vmrun-bench-") as tmp:
            work = Path(tmp)
            (work / "stock").mkdir()
            (work / "baked").mkdir()
            results["recipe"].append(recipe(image, work / "stock", args.cpus))
            results["full"].append(vmrun(image, work, "full", args.cpus))
            results["fast"].append(vmrun(image, work, "fast", args.cpus))
            line = (f"run {run + 1}: recipe ssh {results['recipe'][-1]['ssh']:.1f}s, "
                    f"full {results['full'][-1]['ready']:.1f}s, "
                    f"fast {results['fast'][-1]['total']:.1f}s")
            if runner is not None:
                name, layer = runner
                results["recipe-baked"].append(recipe(layer, work / "baked", args.cpus))
                results["full-baked"].append(vmrun(name, work, "full", args.cpus))
                line += (f"; baked: recipe ssh {results['recipe-baked'][-1]['ssh']:.1f}s, "
                         f"full {results['full-baked'][-1]['ready']:.1f}s")
        print(line, file=sys.stderr)

    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in results[kind])

    print(f"{'what':<48} {'median s':>9} {'vs recipe':>10}")
    groups = [("stock image", "", True)]
    if runner is not None:
        groups.append(("runner image baked by vmrun", "-baked", False))
    for title, suffix, with_fast in groups:
        recipe_ssh = median("recipe" + suffix, "ssh")
        rows = [
            ("recipe: SSH answered (polled)", recipe_ssh),
            ("recipe: cloud-init done", median("recipe" + suffix, "cloud-init")),
            ("vmrun --boot full: command starts", median("full" + suffix, "ready")),
            ("vmrun --boot full: whole run (true)", median("full" + suffix, "total")),
        ]
        if with_fast:
            rows.append(("vmrun --boot fast: whole run (true)", median("fast", "total")))
        print(f"{title}:")
        for label, value in rows:
            print(f"  {label:<46} {value:>9.1f} {value / recipe_ssh:>9.2f}x")
        full = results["full" + suffix][-1]
        print("  phases of the last full run: " + ", ".join(
            f"{k} {v:.1f}s" for k, v in full.items() if k not in ("total", "ready")))
        met = median("full" + suffix, "ready") <= TARGET * recipe_ssh
        print(f"  target: --boot full command start <= {TARGET}x the recipe's SSH answer: "
              + ("met" if met else "not met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
