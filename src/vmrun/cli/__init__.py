"""The command line: dispatch to a subcommand, map vmrun's errors and signals to exit codes."""

from __future__ import annotations

import difflib
import signal
import sys
from collections.abc import Sequence
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

SUBCOMMANDS = ("run", "info", "seed", "image", "disk", "template", "doctor", "completion",
               "cluster")


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
        if args[:1] == ["info"]:
            from vmrun.cli.info import cmd_info

            return cmd_info(args[1:])
        if args[:1] == ["seed"]:
            from vmrun.cli.seed import cmd_seed

            return cmd_seed(args[1:])
        if args[:1] == ["disk"]:
            from vmrun.cli.disk import cmd_disk

            return cmd_disk(args[1:])
        if args[:1] == ["image"]:
            from vmrun.cli.image import cmd_image_checked

            return cmd_image_checked(args[1:])
        if args[:1] == ["template"]:
            from vmrun.cli.template import cmd_template

            return cmd_template(args[1:])
        if args[:1] == ["doctor"]:
            from vmrun.cli.doctor import cmd_doctor

            return cmd_doctor(args[1:])
        if args[:1] == ["cluster"]:
            from vmrun.cli.cluster import cmd_cluster

            return cmd_cluster(args[1:])
        if args[:1] == ["completion"]:
            from vmrun.cli.completion import cmd_completion

            return cmd_completion(args[1:])
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
