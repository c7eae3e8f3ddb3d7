"""The run hook that `vmrun image bake` installs: SSH over virtio-serial, before cloud-init.

A full boot of a stock cloud image can log in only once cloud-init's local stage has made
the user and keys and the network is up: under TCG, a minute of Python start-ups and waits.
A baked image is vmrun's own, so the bake adds two small files to it (through cloud-init's
`write_files`, merged like every vmrun addition):

- a systemd generator that adds `vmrun-run.service` to every boot, ordered after the local
  file systems and the boot's clean-up of /tmp (systemd-tmpfiles-setup), nothing else;
- the hook that service runs (guest/run_hook.sh). On a vmrun run it reads the run's user,
  client key and host key from the virtio-serial port org.vmrun.ssh, says `ssh serial` on
  the ready port, and serves the one SSH connection the run makes with the image's own sshd
  in inetd mode on that port. Elsewhere (no such port, or no header on it) it does nothing.

The host side: QEMU's end of the port is a socketpair vmrun holds from the start, so neither
side's first bytes are lost; the header goes first, and ssh gets the socket itself through a
ProxyCommand that passes file descriptors (ssh.proxy_options). cloud-init still boots the
instance as before, in the background; a run of an image without the hook takes the usual
path (the early sshd on a forwarded port).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from vmrun import ssh as sshlib

HOOK_PATH = "/usr/local/sbin/vmrun-run-hook"
GENERATOR_PATH = "/etc/systemd/system-generators/vmrun-run"
UNIT_NAME = "vmrun-run.service"
HEADER_MAGIC = "vmrun-run 1"

# Writes the unit on each boot, so the bake needs no `systemctl enable` (whose failure a
# runcmd would report as the user's, or hide theirs).
GENERATOR = f"""#!/bin/sh
# vmrun: run {HOOK_PATH} on every boot; it does nothing unless this is a vmrun run.
dir=${{1:-/run/systemd/generator}}
cat > "$dir/{UNIT_NAME}" <<'EOF'
[Unit]
Description=vmrun: this run's SSH login on a virtio-serial port
DefaultDependencies=no
# Once the local file systems are mounted and the boot's own clean-up is done (Debian
# empties /tmp then, where a run's copy-in may go), before the rest of sysinit.
After=local-fs.target systemd-tmpfiles-setup.service systemd-journald.socket
Conflicts=shutdown.target
Before=shutdown.target

[Service]
ExecStart={HOOK_PATH}
# The run's command shares the CPU with the rest of the boot; under TCG it comes first.
CPUWeight=1000
EOF
mkdir -p "$dir/sysinit.target.wants"
ln -sf "../{UNIT_NAME}" "$dir/sysinit.target.wants/{UNIT_NAME}"
"""


def hook_script() -> str:
    return Path(__file__).with_name("guest").joinpath("run_hook.sh").read_text()


def bake_cloud_config() -> dict[str, Any]:
    """What a bake merges into the user's cloud-config to install the hook."""
    return {"write_files": [
        {"path": GENERATOR_PATH, "permissions": "0755", "owner": "root:root",
         "content": GENERATOR},
        {"path": HOOK_PATH, "permissions": "0755", "owner": "root:root",
         "content": hook_script()},
    ]}


def run_header(keys: sshlib.Keys, user: str = sshlib.LOGIN_USER) -> bytes:
    """What vmrun sends first on org.vmrun.ssh (see guest/run_hook.sh)."""
    host_key = base64.b64encode(keys.host_private.encode()).decode()
    lines = [HEADER_MAGIC, f"user {user}", f"key {keys.client_public}",
             f"hostkey {host_key}", "end"]
    return "".join(line + "\n" for line in lines).encode()
