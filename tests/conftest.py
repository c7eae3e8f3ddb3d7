"""The whole suite's settings: the test cache directory, no user config."""

from __future__ import annotations

import os
from pathlib import Path

# VM tests share one cache (kernel, busybox, initramfs, test images) across the session
# and across runs of the suite, outside the checkout (the user's cache directory), so a
# fresh clone on the same machine rebuilds nothing whose inputs are unchanged. It is not
# vmrun's own cache: tests prune and corrupt entries on purpose.
_user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
os.environ.setdefault("VMRUN_CACHE_DIR", str(_user_cache / "vmrun-test"))
# A developer's own defaults (~/.config/vmrun/config.toml) must not change what tests run;
# tests of the config file point VMRUN_CONFIG at their own.
os.environ["VMRUN_CONFIG"] = ""
