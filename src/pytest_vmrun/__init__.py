"""vmrun's pytest plugin, as pytest loads it: options, the marker and fixtures, nothing else.

It lives outside the vmrun package so that loading it imports no part of vmrun (a
project that never asks for a VM pays nothing, and vmrun's own suite keeps importing
vmrun from where its pythonpath says); vmrun.testing does the work once a test asks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from vmrun.testing.pytest_plugin import VM

MARKER = ("vmrun(arch=None, image=None, scope='function', cpus=1, memory=1024, packages=(), "
          "net='user', share='rw', ...): the machine the vm fixture boots "
          "(see vmrun's README, 'pytest plugin')")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vmrun", "vmrun: tests in virtual machines")
    group.addoption("--vmrun-profile", metavar="NAME", default=None,
                    help="run the selected tests inside a VM of the project's profile NAME "
                         "(vmrun.toml or [tool.vmrun]) and report them here")
    group.addoption("--vmrun-arch", metavar="ARCH", default=None,
                    help="with --vmrun-profile: the architecture to run on (default: the "
                         "profile's first)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)
    if config.getoption("vmrun_profile", None):
        from vmrun.testing.remote import RemoteRun

        config.pluginmanager.register(RemoteRun(config), "vmrun-remote")


@pytest.fixture
def vm(request: pytest.FixtureRequest) -> VM:
    """A booted vmrun Machine of the spec in @pytest.mark.vmrun(...), shared by the tests
    of its scope that ask for the same spec; `vm.sh("cmd")` runs a shell command."""
    from vmrun.testing.pytest_plugin import machine_for

    return machine_for(request)


@pytest.fixture
def vm_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., VM]]:
    """Boots machines on demand, `vm_factory(arch="aarch64", ...)` (the marker's keys,
    over the marker's values); each is powered off when the test ends."""
    from vmrun.testing.pytest_plugin import Factory

    factory = Factory(request)
    yield factory
    factory.close()

