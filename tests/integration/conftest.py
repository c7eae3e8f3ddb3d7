from tests.integration.vmtools import guest, private_runs, workdir

__all__ = ["guest", "private_runs", "workdir"]
