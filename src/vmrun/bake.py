"""Provisioning ("bake"): boot an image once with user-data, keep what it wrote as a layer.

The image boots in full on an overlay with a seed holding the user's user-data. cloud-init
does the work and powers the guest off (vmrun adds `power_state` when the user-data has
none, and asks the shutdown to report cloud-init's result on vmrun's port first). The
overlay then becomes a stored qcow2 layer whose backing file is the base, named by the
hash of every input, so baking again with the same inputs is instant.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

from vmrun import runhook
from vmrun import seed as seedlib
from vmrun.cache import key_of
from vmrun.errors import BakeFailed, CommandTimeout
from vmrun.fullboot import FullMachine, FullOptions
from vmrun.images import formats, qemu_img, store
from vmrun.images.attach import base_image
from vmrun.progress import reporter, waiting
from vmrun.qemu.argv import READY_PORT
from vmrun.spec import MachineSpec, Share

Notice = Callable[[str], None]
BAKE_FORMAT = "2"  # bump when what a bake does changes, so old layers are rebuilt
RESULT_FILE = "/run/cloud-init/result.json"
# Run by cloud-init's power_state after cloud-init has finished and written its result.
REPORT_RESULT = (f'printf "result %s\\n" "$(base64 -w0 {RESULT_FILE})" '
                 f'> /dev/virtio-ports/{READY_PORT}; true')


def bake_key(base_digest: str, user_data: bytes, meta_data: bytes | None, arch: str) -> str:
    # The run hook is part of what a bake writes: a new hook bakes again.
    return key_of("vmrun-bake", BAKE_FORMAT, runhook.GENERATOR, runhook.hook_script(),
                  base_digest, user_data, meta_data or b"", arch)


def bake_user_data(user_data: bytes) -> bytes:
    """USER_DATA with the power-off (when it has none), the result report and vmrun's run
    hook (see runhook) merged in."""
    power_state: dict[str, Any] = {"mode": "poweroff", "delay": "now",
                                   "message": "vmrun: provisioning done",
                                   "condition": ["/bin/sh", "-c", REPORT_RESULT]}
    theirs = (seedlib.cloud_config_of(user_data) or {}).get("power_state")
    if isinstance(theirs, dict) and "condition" in theirs:
        del power_state["condition"]  # the user's condition decides; no result then
    return seedlib.merge_cloud_config(
        user_data, {**runhook.bake_cloud_config(), "power_state": power_state})


def parse_result(line: bytes) -> dict[str, Any] | None:
    """cloud-init's result.json from a `result BASE64` line (None if unreadable)."""
    try:
        data = json.loads(base64.b64decode(line.removeprefix(b"result ").strip(),
                                           validate=True))
    except (ValueError, binascii.Error):
        return None
    result = data.get("v1") if isinstance(data, dict) else None
    return result if isinstance(result, dict) else None


def result_errors(result: dict[str, Any]) -> list[str]:
    errors = result.get("errors")
    return [str(e) for e in errors] if isinstance(errors, list) else []


def _store_name(file_name: str) -> str:
    """The store name for a base given as a file: its file name, marked as a bake's base
    so that it never replaces a name the user gave."""
    return "bake-base-" + re.sub(r"[^A-Za-z0-9._:+@-]", "-", file_name)[:100]


def bake(base_ref: str, *, name: str, user_data: bytes, meta_data: bytes | None = None,
         spec: MachineSpec, options: FullOptions | None = None, timeout: float = 1800.0,
         notice: Notice) -> tuple[store.StoredImage, bool]:
    """Bake BASE_REF with USER_DATA into the stored layer NAME; returns it and whether
    it was built now (False: the same inputs were baked before)."""
    seedlib.validate_user_data(user_data)
    if meta_data is not None:
        seedlib.meta_data(user_meta=meta_data)  # refuses bad meta-data before any boot
    store.check_name(name)
    from vmrun.qemu.arch import host_arch, lookup_arch

    arch = lookup_arch(spec.arch or host_arch())
    with reporter() as progress:
        path, digest = base_image(base_ref, arch=arch.debian_arch, notice=notice,
                                  progress=progress)
    if digest is None:
        # A file given by path joins the store, so the layer can stand on it by content.
        digest = store.import_image(path, name=_store_name(path.name),
                                    validate=formats.check_foreign_image).digest
    key = bake_key(digest, user_data, meta_data, arch.name)
    found = store.find_baked(key)
    if found is not None:
        if found.name != name:
            store.alias_name(name, found)
        return store.resolve(name), False
    under = store.resolve(digest)
    machine_spec = replace(spec, image=digest, share=Share.NONE)
    started = time.monotonic()
    with FullMachine(machine_spec, options or FullOptions(), notice=notice,
                     user_data=bake_user_data(user_data), meta_data=meta_data) as machine:
        assert machine.qemu is not None and machine.serial is not None
        # The console, when shown, is its own progress; else the time spent so far.
        shown = nullcontext() if spec.console else waiting(f"baking {name}")
        try:
            with shown:
                machine.pump(lambda: False, timeout, CommandTimeout("bake timed out"),
                             on_exit=lambda: True)
        except CommandTimeout:
            raise BakeFailed(f"the guest did not power off within {timeout:.0f}s (--timeout)",
                             serial_tail=machine.serial.tail_text(),
                             hint="the user-data may lack a step that ends, or needs more "
                             "time: raise --timeout") from None
        result_line = next((line for line in machine.ready_lines
                            if line.startswith(b"result ")), None)
        result = parse_result(result_line) if result_line is not None else None
        if result is not None and result_errors(result):
            raise BakeFailed("cloud-init reported errors: "
                             + "; ".join(result_errors(result))[:800],
                             serial_tail=machine.serial.tail_text())
        if machine.shutdown_reason == "guest-reset":
            raise BakeFailed("the guest rebooted instead of powering off",
                             serial_tail=machine.serial.tail_text(),
                             hint="remove the reboot from the user-data; vmrun bakes "
                             "until the guest powers off")
        assert machine.overlay is not None
        layer = machine.overlay
        # The layer names its base by digest alone: blobs sit side by side in the store.
        qemu_img.run_qemu_img(["rebase", "-u", "-f", "qcow2", "-b", digest, "-F",
                               under.format or "qcow2", qemu_img.filename(layer)],
                              untrusted=False)
        stored = store.add_layer(layer, name=name, under=under, bake_key=key,
                                 source=f"bake of {base_ref}")
    if result is None:
        notice("cloud-init's result could not be read (the user-data has its own "
               "power_state condition); the layer is kept")
    notice(f"baked {name} in {time.monotonic() - started:.0f}s")
    return stored, True

