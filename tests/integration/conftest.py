"""Fixtures the VM tests share: the guest, a working directory, private runs."""

from tests.integration.vmtools import guest, private_runs, workdir

__all__ = ["guest", "private_runs", "workdir"]
