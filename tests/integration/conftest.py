from tests.integration.vmtools import guest, workdir

__all__ = ["guest", "workdir"]
