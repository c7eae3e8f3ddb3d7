"""The package as a user gets it: a wheel built from the checkout, installed into a fresh
virtual environment, runs `vmrun --version` and boots a VM with the files it ships."""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from vmrun.cache import cache_dir
from vmrun.guest.build import Guest

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]
# Everything a wheel is built from; copied out so that the build writes nothing
# (build/, *.egg-info) into the checkout.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "src")
# Files that are not Python and must be in the wheel for vmrun to work.
PACKAGE_DATA = ("vmrun/py.typed", "vmrun/guest/agent.sh", "vmrun/guest/run_hook.sh",
                "vmrun/debian/keys/debian-archive-keyring.gpg")
PIP_TIMEOUT = 900  # a ceiling for a build or install on a busy host, not a measurement


def run(argv: Sequence[str | Path], *, timeout: float, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False,
                          timeout=timeout, env=env, cwd=cwd)


def deps_dir() -> Path:
    """Wheels of the build backend and of vmrun's dependencies, kept in the test cache so
    that a later run builds and installs without the package index."""
    deps = cache_dir() / "wheel-deps"
    deps.mkdir(parents=True, exist_ok=True)
    return deps


def pip_from_cache(pip: list[str | Path], argv: list[str | Path], needs: list[str]) -> None:
    """Run PIP ARGV with wheels from the cache only; where some are missing, fetch NEEDS
    from the package index into the cache first and run it again."""
    offline = [*pip, *argv, "--no-index", "--find-links", deps_dir()]
    done = run(offline, timeout=PIP_TIMEOUT)
    if done.returncode != 0:
        fetched = run([*pip, "download", "-q", "-d", deps_dir(), *needs], timeout=PIP_TIMEOUT)
        assert fetched.returncode == 0, fetched.stderr
        done = run(offline, timeout=PIP_TIMEOUT)
    assert done.returncode == 0, done.stderr


def build_wheel(into: Path) -> Path:
    source = into / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    backend = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    pip_from_cache([sys.executable, "-m", "pip", "--disable-pip-version-check"],
                   ["wheel", "--no-deps", "-q", "-w", into / "dist", source], backend)
    (wheel,) = (into / "dist").glob("vmrun-*.whl")
    return wheel


def requirements(wheel: Path) -> list[str]:
    """The wheel's own dependencies (Requires-Dist without an extra)."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.parser.BytesParser().parsebytes(archive.read(name))
    return [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]


def install(wheel: Path, venv: Path) -> None:
    pip_from_cache([venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check"],
                   ["install", "-q", wheel], requirements(wheel))


def test_wheel_installs_and_runs(guest: Guest, tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert set(PACKAGE_DATA) <= names
    # The pytest plugin: its module, and the entry point that has pytest load it.
    assert "pytest_vmrun/__init__.py" in names
    with zipfile.ZipFile(wheel) as archive:
        points = next(archive.read(n).decode() for n in names
                      if n.endswith(".dist-info/entry_points.txt"))
    assert "[pytest11]\nvmrun = pytest_vmrun" in points
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", venv], timeout=PIP_TIMEOUT)
    assert made.returncode == 0, made.stderr
    install(wheel, venv)

    # The installed package alone: no PYTHONPATH pointing back at the checkout, and a
    # working directory outside it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["VMRUN_CACHE_DIR"] = str(cache_dir())  # the guest is already there
    work = tmp_path / "work"
    work.mkdir()
    vmrun = venv / "bin" / "vmrun"
    where = run([venv / "bin" / "python", "-c", "import vmrun; print(vmrun.__file__)"],
                env=env, cwd=work, timeout=60)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    shown = run([vmrun, "--version"], env=env, cwd=work, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == f"vmrun {version}"

    booted = run([vmrun, "--", "true"], env=env, cwd=work, timeout=600)
    assert booted.returncode == 0, booted.stderr
    assert booted.stdout == ""
    failed = run([vmrun, "--", "sh", "-c", "echo from-the-wheel; exit 3"], env=env, cwd=work,
                 timeout=600)
    assert (failed.returncode, failed.stdout) == (3, "from-the-wheel\n"), failed.stderr
