"""The command line: dispatch to a subcommand, map vmrun's errors and signals to exit codes."""

from __future__ import annotations

import difflib
import importlib
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType
from typing import NoReturn

from vmrun.errors import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    BakeFailed,
    GuestPanic,
    QemuError,
    UsageError,
    VmrunError,
)


class Terminated(Exception):
    pass


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def report(error: VmrunError) -> None:
    print(f"vmrun: error: {error}", file=sys.stderr)
    if isinstance(error, GuestPanic) and error.serial_tail:
        print("--- guest console (tail) ---", file=sys.stderr)
        print(error.serial_tail, file=sys.stderr)
    if isinstance(error, BakeFailed) and error.serial_tail:
        print("--- guest console (tail) ---", file=sys.stderr)
        print(error.serial_tail, file=sys.stderr)
    if isinstance(error, QemuError) and error.log_tail:
        print("--- QEMU log (tail) ---", file=sys.stderr)
        print(error.log_tail, file=sys.stderr)
    if error.hint:
        print(f"hint: {error.hint}", file=sys.stderr)


def unknown_command(word: str) -> UsageError:
    """A first word that is neither a subcommand nor an option: a typo, or a command
    that lacks its "--"; either way nothing boots."""
    near = difflib.get_close_matches(word, SUBCOMMANDS, n=1)
    guess = f"; did you mean 'vmrun {near[0]}'?" if near else ""
    return UsageError(f"unknown command {word!r}{guess}",
                      hint=f"commands: {', '.join(SUBCOMMANDS)}; to run {word!r} in a VM: "
                      f"vmrun [OPTIONS] -- {word} ...")


# Each subcommand's module and function, imported when used (a run imports none of them).
HANDLERS = {
    "info": ("vmrun.cli.info", "cmd_info"),
    "seed": ("vmrun.cli.seed", "cmd_seed"),
    "image": ("vmrun.cli.image", "cmd_image_checked"),
    "disk": ("vmrun.cli.disk", "cmd_disk"),
    "template": ("vmrun.cli.template", "cmd_template"),
    "doctor": ("vmrun.cli.doctor", "cmd_doctor"),
    "completion": ("vmrun.cli.completion", "cmd_completion"),
    "test": ("vmrun.cli.test", "cmd_test"),
    "config": ("vmrun.cli.config", "cmd_config"),
    "cluster": ("vmrun.cli.cluster", "cmd_cluster"),
}

SUBCOMMANDS = ("run", *HANDLERS)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _terminate)
    # Also when started with SIGINT ignored (a background job of a script inherits that):
    # Python installs its handler only where SIGINT was not ignored, and a vmrun that
    # ignores an explicit SIGINT keeps its VM running until the command ends.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args and not args[0].startswith("-") and args[0] not in SUBCOMMANDS:
            raise unknown_command(args[0])
        if args and args[0] in HANDLERS:
            module, function = HANDLERS[args[0]]
            handler: Callable[[list[str]], int] = getattr(
                importlib.import_module(module), function)
            return handler(args[1:])
        if args[:1] == ["run"]:
            args = args[1:]
        from vmrun.cli.run import cmd_run

        return cmd_run(args)
    except KeyboardInterrupt:
        print("vmrun: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except Terminated:
        print("vmrun: terminated", file=sys.stderr)
        return EXIT_SIGTERM
    except VmrunError as error:
        report(error)
        return error.exit_code


def entry() -> NoReturn:
    sys.exit(main())
