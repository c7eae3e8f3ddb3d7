"""vmrun's cloud-config for a full-boot run: its login user, the pinned host key, readiness."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vmrun import ssh as sshlib
from vmrun.qemu.argv import EARLY_SSH_PORT, READY_PORT, SSH_PORT

SSH_PROPS = ("After=ssh.service", "After=sshd.service", "After=ssh.socket")
# What cloud-init's network stage waits for before it starts, but cloud-init itself: the
# user, the keys (cloud-init's local stage writes them when the seed is a local disk) and
# a configured network, whichever of the usual network managers brings it up.
EARLY_PROPS = ("DefaultDependencies=no", "After=cloud-init-local.service",
               "After=systemd-networkd-wait-online.service", "After=networking.service",
               "After=NetworkManager-wait-online.service", "Conflicts=shutdown.target",
               "Before=shutdown.target")
EARLY_SSHD = (
    'mkdir -p -m 0755 /run/sshd && exec /usr/sbin/sshd -D -e -p {port} -o PidFile=none '
    '-o PasswordAuthentication=no -o KbdInteractiveAuthentication=no '
    '-o PermitRootLogin=no -o AllowUsers={user} -o UsePAM=no'
)


def transient_unit(name: str, props: Sequence[str], script: str) -> list[str]:
    """A bootcmd entry that queues the transient unit NAME running SCRIPT, with PROPS.
    bootcmd runs in cloud-init's first stage, before the SSH server starts."""
    return ["systemd-run", "--no-block", f"--unit={name}", "--quiet",
            *(f"--property={prop}" for prop in props), "/bin/sh", "-c", script]


def ready_unit_command(message: str, props: Sequence[str] = SSH_PROPS,
                       name: str = "vmrun-ready") -> list[str]:
    """A transient unit, ordered after PROPS, that writes MESSAGE to the ready port."""
    return transient_unit(name, props, f"echo {message} > /dev/virtio-ports/{READY_PORT}")


def early_ssh_commands() -> list[list[str]]:
    """An SSH server of the image's own, on another port, started as soon as the user,
    the keys and the network are there, without waiting for cloud-init's network stage
    (a Python start-up that does nothing more for a local seed; 15 s and more under TCG)
    and all that is ordered after it. Its readiness (sshd's own sd_notify) is announced
    as `ssh PORT`; should it fail, the image's SSH server still announces `ssh 22`.

    It runs without PAM: PAM's nologin check keeps users out until the boot is over, which
    is the wait this server exists to skip. Without PAM sshd refuses a locked account, so
    the login user's password is "*" (matches no password) rather than locked."""
    sshd = transient_unit("vmrun-sshd", (*EARLY_PROPS, "Type=notify"),
                          EARLY_SSHD.format(port=EARLY_SSH_PORT, user=sshlib.LOGIN_USER))
    ready = ready_unit_command(f"ssh {EARLY_SSH_PORT}", (
        "DefaultDependencies=no", "After=vmrun-sshd.service", "Requisite=vmrun-sshd.service"),
        name="vmrun-ready-early")
    return [sshd, ready]


def run_cloud_config(keys: sshlib.Keys) -> dict[str, Any]:
    """vmrun's cloud-config for a run: its login user, the pinned host key, readiness."""
    return {
        "users": [{
            "name": sshlib.LOGIN_USER, "shell": "/bin/sh", "lock_passwd": False,
            "hashed_passwd": "*",
            "sudo": "ALL=(ALL) NOPASSWD:ALL", "ssh_authorized_keys": [keys.client_public],
        }],
        "ssh_pwauth": False,
        "disable_root": True,
        "ssh_deletekeys": True,
        # Only the type the seed brings: cloud-init generates none (the schema wants one).
        "ssh_genkeytypes": ["ed25519"],
        "ssh_keys": {"ed25519_private": keys.host_private,
                     "ed25519_public": keys.host_public},
        # The run's overlay has the base's size: there is nothing to grow.
        "growpart": {"mode": "off"},
        "resize_rootfs": False,
        "bootcmd": [
            # cloud-init's later stages (a Python start-up each, seconds under TCG) still
            # run, but yield the CPU to the login and the command.
            *(["systemctl", "set-property", "--runtime", unit, "CPUWeight=1"]
              for unit in ("cloud-init.service", "cloud-config.service",
                           "cloud-final.service")),
            *early_ssh_commands(),
            ready_unit_command(f"ssh {SSH_PORT}"),
        ],
    }
