"""vmrun's errors, and the exit codes the command line maps them to.

    VmrunError                  root; every error vmrun raises on purpose
    ├── UsageError              bad option, bad value, bad project file      (exit 125)
    ├── ImageError              a disk image is unusable, missing or broken  (exit 118)
    │   ├── UnsafeImage         a foreign image fails the header check       (exit 118)
    │   └── KernelUnfit         --kernel: no kernel, wrong arch, options off (exit 118)
    ├── FetchError              download or archive problem                  (exit 124)
    │   └── VerificationError   a hash or signature does not match           (exit 124)
    ├── QemuError               QEMU missing, failed to start or died        (exit 123)
    │   └── QmpError            QEMU's monitor answered with an error        (exit 123)
    ├── BootTimeout             the agent was not ready in time              (exit 122)
    ├── CommandTimeout          the command ran longer than --timeout        (exit 121)
    ├── GuestPanic              the guest kernel panicked                    (exit 120)
    ├── ChannelLost             the guest vanished before reporting a status (exit 119)
    │   └── HostKeyMismatch     the SSH server did not show the pinned host key (exit 119)
    └── BakeFailed              cloud-init failed, or no power-off in time   (exit 117)

The guest command's own exit status passes through unchanged; vmrun's failures use
the reserved codes above (117-125), and an interrupt gives 130 (SIGINT) or 143 (SIGTERM).
"""

from __future__ import annotations


class VmrunError(Exception):
    """Root of every error vmrun raises on purpose."""

    exit_code = 125
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class UsageError(VmrunError):
    exit_code = 125


class ImageError(VmrunError):
    exit_code = 118


class UnsafeImage(ImageError):
    """A foreign image that vmrun refuses to hand to QEMU or qemu-img; says which and why."""


class KernelUnfit(ImageError):
    """The --kernel cannot boot vmrun's guest: no kernel, another architecture, or options
    missing (``missing`` names them, as the agent reported them)."""

    def __init__(self, message: str, *, missing: tuple[str, ...] = (),
                 hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.missing = missing


class FetchError(VmrunError):
    exit_code = 124


class VerificationError(FetchError):
    pass


class QemuError(VmrunError):
    """QEMU could not be started or died; carries its argv and the tail of its log."""

    exit_code = 123

    def __init__(
        self, message: str, *, argv: list[str] | None = None, log_tail: str = "",
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.argv = argv or []
        self.log_tail = log_tail


class QmpError(QemuError):
    pass


class BootTimeout(VmrunError):
    exit_code = 122


class CommandTimeout(VmrunError):
    exit_code = 121


class GuestPanic(VmrunError):
    exit_code = 120

    def __init__(self, message: str, *, serial_tail: str = "") -> None:
        super().__init__(message)
        self.serial_tail = serial_tail


class ChannelLost(VmrunError):
    exit_code = 119


class HostKeyMismatch(ChannelLost):
    """The server on the forwarded SSH port is not the guest vmrun booted (its key differs)."""


class BakeFailed(VmrunError):
    """`vmrun image bake` did not produce a layer; carries the console's tail."""

    exit_code = 117

    def __init__(self, message: str, *, serial_tail: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.serial_tail = serial_tail


EXIT_SIGINT = 130
EXIT_SIGTERM = 143
