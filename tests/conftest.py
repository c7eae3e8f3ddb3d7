from __future__ import annotations

import os
from pathlib import Path

# VM tests share one cache (kernel, busybox, initramfs) across the session and across
# runs of the suite; a per-checkout default keeps CI's cache between its steps.
os.environ.setdefault("VMRUN_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache/vmrun"))
