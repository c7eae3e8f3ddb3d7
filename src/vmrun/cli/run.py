"""`vmrun [run]`: parse the options, build a spec, run the command, return its exit code."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmrun import __version__, config
from vmrun.cli.common import EXIT_CODES, Parser, commands_help, count, seconds
from vmrun.cli.docker import add_docker_options, read_env_file
from vmrun.errors import (
    UsageError,
)
from vmrun.machine import Machine, Notice, notice_stderr, silent
from vmrun.oci.reference import insecure_registries, is_image_reference
from vmrun.progress import reporter
from vmrun.qemu.arch import host_arch, lookup_arch
from vmrun.qemu.firmware import Firmware
from vmrun.spec import (
    BOOT_TIMEOUT_HELP,
    MAX_CPUS,
    Accel,
    Boot,
    Command,
    MachineSpec,
    Net,
    Share,
    no_command,
    parse_env,
    parse_memory,
)

if TYPE_CHECKING:
    from vmrun.fullboot import FullMachine, FullOptions
    from vmrun.oci.run import OciRun

MAX_JOBS = config.MAX_JOBS


def run_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vmrun",
        description="Run COMMAND in a fresh, throwaway virtual machine.\n\n" + commands_help()
        + "\nvmrun COMMAND --help tells more about each.",
        usage="vmrun [run] [OPTIONS] -- COMMAND [ARGS...]",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vmrun {__version__}")
    _add_placement_options(parser)
    _add_machine_options(parser)
    _add_image_options(parser)
    _add_full_boot_options(parser)
    _add_kernel_options(parser)
    _add_debug_options(parser)
    add_docker_options(parser)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run")
    return parser


def _add_placement_options(parser: argparse.ArgumentParser) -> None:
    """Where and how many: the architecture(s), a cluster, parallel jobs."""
    parser.add_argument("--arch", help="guest architecture (default: the host's); several, "
                        "comma-separated, run in parallel with prefixed output and a summary")
    parser.add_argument("--cluster", metavar="URL",
                        help="where a matrix runs: local (the default), dask://HOST:PORT (a "
                        "Dask scheduler) or slurm://[PARTITION]")
    parser.add_argument("--jobs", "-j", type=count("--jobs", MAX_JOBS),
                        default=os.cpu_count() or 1,
                        help="with several architectures: how many VMs at once")
    parser.add_argument("--timings-file", type=Path, help=argparse.SUPPRESS)


def _add_machine_options(parser: argparse.ArgumentParser) -> None:
    """The machine: CPUs, memory, time limits, environment, sharing, network, accelerator."""
    parser.add_argument("--cpus", type=count("--cpus", MAX_CPUS), default=1,
                        help=f"virtual CPUs (default 1, at most {MAX_CPUS})")
    parser.add_argument("-m", "--memory", default="1G", help="guest memory, like 512M or 2G "
                        "(at most the host's memory)")
    parser.add_argument("--timeout", type=seconds("--timeout"),
                        help="seconds the command may run")
    parser.add_argument("--boot-timeout", type=seconds("--boot-timeout"),
                        help=BOOT_TIMEOUT_HELP)
    parser.add_argument("--env", "-e", action="append", default=[], metavar="K[=V]",
                        help="set K=V in the guest, or pass the host's K")
    parser.add_argument("--share", choices=[s.value for s in Share], default="rw",
                        help="share the working directory read-write, read-only or not")
    parser.add_argument("--share-via", choices=["auto", "9p", "virtiofs"], default="auto",
                        help="how to share it (auto: virtiofs where virtiofsd runs, else 9p)")
    parser.add_argument("--net", "--network", choices=[n.value for n in Net], default="user",
                        help="user: outbound network through QEMU; none: no network")
    parser.add_argument("--accel", choices=[a.value for a in Accel], default="auto",
                        help="accelerator (auto: KVM or HVF where they work, else TCG)")


def _add_image_options(parser: argparse.ArgumentParser) -> None:
    """What the command runs in: a disk or OCI image, a --packages root, how it boots."""
    parser.add_argument("--image", help="attach a disk: a stored image (name or digest), an "
                        "image file or an alias like debian:12, on a fresh overlay per run; "
                        "or run an OCI image: docker://[REGISTRY/]REPO[:TAG][@DIGEST], "
                        "oci:DIR[:TAG] or oci-archive:FILE[:TAG]")
    parser.add_argument("--packages", metavar="P,...", help="run in a minimal Debian root "
                        "with these packages, built on first use and cached (see 'vmrun "
                        "image build' for bootable disks)")
    parser.add_argument("--suite", help="--packages: the Debian (or Ubuntu) suite (default: "
                        "the one vmrun's guest kernel comes from)")
    parser.add_argument("--entrypoint", help="OCI image: replaces its Entrypoint (a command "
                        "path; '' clears it)")
    parser.add_argument("--insecure-registry", action="append", default=[],
                        metavar="HOST[:PORT]", help="reach this registry over plain HTTP "
                        "(also $VMRUN_INSECURE_REGISTRIES, comma-separated; loopback "
                        "registries always are)")
    parser.add_argument("--image-format", choices=["raw"],
                        help="the --image file is a raw disk, though it has no partition "
                        "table or filesystem vmrun knows")
    parser.add_argument("--boot", choices=[b.value for b in Boot], default="auto",
                        help="with --image: fast (vmrun's kernel, the command runs in the "
                        "image's root partition), full (the image's own firmware, kernel "
                        "and init; the command over SSH), disk (attach it as /dev/vda); "
                        "auto: fast if the image has a root partition, else disk")
    parser.add_argument("--firmware", choices=[f.value for f in Firmware], default="auto",
                        help="--boot full: bios or uefi (auto: what the image can boot, "
                        "BIOS first on x86)")


def _add_full_boot_options(parser: argparse.ArgumentParser) -> None:
    """--boot full: what is copied in and back."""
    parser.add_argument("--include", action=RuleAction, dest="rules", metavar="PATTERN",
                        help="--boot full: copy what matches into the guest (rsync-style "
                        "pattern; with --exclude, the first matching rule wins)")
    parser.add_argument("--exclude", action=RuleAction, dest="rules", metavar="PATTERN",
                        help="--boot full: do not copy what matches")
    parser.add_argument("--sync", action=RuleAction, dest="rules", metavar="'+|- PATTERN'",
                        help="--boot full: a copy rule in rsync's filter spelling, like "
                        "'+ src/***' or '- *'")
    parser.add_argument("--collect", action="append", default=[], metavar="GLOB",
                        help="--boot full: copy what matches GLOB (in the guest's working "
                        "directory) back into the working directory after the command")


def _add_kernel_options(parser: argparse.ArgumentParser) -> None:
    """A kernel of the user's, and the guest vmrun fetches."""
    # A kernel of the user's (vmrun.guest.userkernel; README, "Your own kernel").
    parser.add_argument("--kernel", type=Path, metavar="PATH",
                        help="boot this kernel (bzImage, arm64 Image or ELF vmlinux) with "
                        "vmrun's initramfs and agent instead of the Debian one")
    parser.add_argument("--append", default="", metavar="ARGS",
                        help="add ARGS to the kernel command line, after vmrun's own")
    parser.add_argument("--modules", type=Path, metavar="DIR",
                        help="with --kernel: its modules, a 'make modules_install "
                        "INSTALL_MOD_PATH=DIR' tree or its lib/modules/RELEASE")
    parser.add_argument("--mirror", help="Debian mirror (default $VMRUN_DEBIAN_MIRROR or "
                        "http://deb.debian.org/debian)")
    parser.add_argument("--insecure-unverified-guest", action="store_true",
                        help="boot vmrun's guest without checking the Debian archive's "
                        "signature (when neither gpgv nor sqv is installed): whoever can "
                        "alter the download then runs code with your shared directory")


def _add_debug_options(parser: argparse.ArgumentParser) -> None:
    """Debugging and output: keep the run, cold boots, console, terminal, verbose, quiet."""
    parser.add_argument("--keep", action="store_true",
                        help="keep the run directory (serial log, QEMU log, argv)")
    parser.add_argument("--cold", action="store_true",
                        help="boot the kernel; never start from a memory template (warm "
                        "start, see 'vmrun template')")
    parser.add_argument("--console", action="store_true", help="show the guest's console")
    parser.add_argument("-t", "--tty", action="store_true",
                        help="give the command a terminal (interactive use)")
    parser.add_argument("--verbose", action="store_true",
                        help="print the QEMU argv and the time of each phase")
    # -- defaults and output (config file: see vmrun.config)
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print none of vmrun's own notices and progress (errors still "
                        "print)")


class RuleAction(argparse.Action):
    """--include, --exclude and --sync keep their order in one list, as rsync's rules do;
    --sync takes rsync's filter-rule spelling, '+ PATTERN' or '- PATTERN'."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        rules = list(getattr(namespace, self.dest, None) or [])
        kind, value = self.option_strings[0].lstrip("-"), str(values)
        if kind == "sync":
            sign, pattern = value[:1], value[1:].lstrip(" ")
            if sign not in ("+", "-") or not pattern:
                raise UsageError(f"bad --sync rule {value!r}",
                                 hint="write '+ PATTERN' to copy, '- PATTERN' to leave out")
            kind, value = ("include" if sign == "+" else "exclude"), pattern
        rules.append((kind, value))
        setattr(namespace, self.dest, rules)


def full_options(args: argparse.Namespace) -> FullOptions:
    from vmrun import sync
    from vmrun.fullboot import FullOptions

    return FullOptions(firmware=Firmware(args.firmware),
                       rules=sync.parse_rules(args.rules or []), collect=tuple(args.collect))


def machine_spec(args: argparse.Namespace) -> MachineSpec:
    # Imported where used: a plain run's start-up pays for what it needs only.
    from vmrun.build.debootstrap import check_suite, parse_packages

    return MachineSpec(
        arch=args.arch, cpus=args.cpus, memory_mib=parse_memory(args.memory),
        boot_timeout=args.boot_timeout, share=Share(args.share), net=Net(args.net),
        accel=Accel(args.accel), keep=args.keep, console=args.console, verbose=args.verbose,
        mirror=args.mirror, insecure_unverified_guest=args.insecure_unverified_guest,
        tty=args.tty, image=args.image, boot=Boot(args.boot),
        image_format=args.image_format, cold=args.cold,
        kernel=args.kernel, append=args.append, modules=args.modules,
        entrypoint=None if args.entrypoint is None else
        ((args.entrypoint,) if args.entrypoint else ()),
        insecure_registries=insecure_registries(args.insecure_registry, os.environ),
        volumes=tuple(args.volumes), publish=tuple(args.publish), name=args.name,
        packages=parse_packages(args.packages) if args.packages is not None else (),
        suite=check_suite(args.suite) if args.suite is not None else None,
    )


def without_options(argv: Sequence[str], names: set[str]) -> list[str]:
    """ARGV's options before "--", less NAMES (each with its value)."""
    options = list(argv[: argv.index("--")] if "--" in argv else argv)
    kept: list[str] = []
    skip = False
    for word in options:
        if skip:
            skip = False
        elif word in names:
            skip = True
        elif not any(word.startswith(name + "=") for name in names):
            kept.append(word)
    return kept


def split_command(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """ARGV's options and the command after its first "--" (empty without one)."""
    if "--" not in argv:
        return list(argv), []
    at = list(argv).index("--")
    return list(argv[:at]), list(argv[at + 1:])


def cmd_run(argv: Sequence[str]) -> int:
    options, command_argv = split_command(argv)
    defaults = config.run_defaults()  # option > environment > config file > built-in
    parser = run_parser()
    parser.set_defaults(**defaults)
    args = parser.parse_args(options)
    if args.quiet and args.verbose:
        raise UsageError("--quiet and --verbose contradict each other")
    notice: Notice = silent if args.quiet else notice_stderr
    if args.command:
        # A word before "--" is never taken for the command: a typo like `vmrun --cpus 2
        # nrpoc` or `vmrun run images` must not boot a VM.
        raise UsageError(f"unexpected {args.command[0]!r}: the command goes after '--'",
                         hint=f"vmrun [OPTIONS] -- {' '.join(args.command)}")
    on_cluster = args.cluster is not None and args.cluster != "local"
    if (args.arch and "," in args.arch) or on_cluster:
        if args.tty or args.publish:
            raise UsageError(f"{'-t' if args.tty else '-p'} cannot be used with several "
                             "architectures")
        if not command_argv:
            raise UsageError("no command given", hint="usage: vmrun [OPTIONS] -- COMMAND")
        arches = [a for a in (args.arch or host_arch()).split(",") if a]
        # Every architecture gets the defaults this run resolved, before its own options.
        passthrough = [*config.as_options(defaults, leave_out=frozenset({"arch", "jobs"})),
                       *without_options(argv, {"--arch", "--jobs", "-j", "--timings-file",
                                               "--cluster"})]
        from vmrun.matrix import run_matrix

        if not on_cluster:
            return run_matrix(arches, passthrough, command_argv, args.jobs, quiet=args.quiet)
        return run_matrix(arches, passthrough, command_argv, args.jobs, quiet=args.quiet,
                          cluster=args.cluster, memory_mib=parse_memory(args.memory),
                          kvm=args.accel == "kvm", cpus=args.cpus)
    if args.tty and not os.isatty(0):
        raise UsageError("-t needs a terminal on stdin")
    oci_image = args.image is not None and is_image_reference(args.image)
    if not command_argv and not oci_image:
        raise no_command()
    env = command_env(args)
    command = Command(argv=tuple(command_argv), env=env, timeout=args.timeout, tty=args.tty,
                      stdin_stream=args.interactive or not os.isatty(0), cwd=args.workdir,
                      user=args.user)
    spec = machine_spec(args)
    oci = prepare_oci(spec, command, notice) if oci_image else None
    if oci_image and oci is None and not command_argv:
        raise no_command()  # a VM disk from a registry has no default command
    full_only = [name for name, given in (("--include/--exclude/--sync", args.rules),
                                          ("--collect", args.collect),
                                          ("--firmware", args.firmware != "auto")) if given]
    if args.suite is not None and not spec.packages:
        raise UsageError("--suite works with --packages only")
    if spec.boot == Boot.FULL:
        from vmrun.fullboot import FullMachine

        if spec.image is None:
            raise UsageError("--boot full needs --image")
        if command.user is not None:
            raise UsageError("--user does not work with --boot full",
                             hint="switch users in the command (su, setpriv)")
        machine: Machine | FullMachine = FullMachine(spec, full_options(args), stdout_fd=1,
                                                     stderr_fd=2, notice=notice)
    elif full_only:
        raise UsageError(f"{full_only[0]} works with --boot full only")
    else:
        machine = Machine(spec, stdout_fd=1, stderr_fd=2, share_via=share_via(args),
                          oci=oci, notice=notice)
    with machine:
        result = machine.run(command)
    if spec.verbose:
        phases = ", ".join(f"{k} {v:.3f}s" for k, v in machine.timings.items())
        notice_stderr(f"phases: {phases}")
    from vmrun.cluster.units import TIMINGS_ENV

    timings_file = args.timings_file or os.environ.get(TIMINGS_ENV)
    if timings_file:
        Path(timings_file).write_text(json.dumps(machine.timings))
    return result.exit_code


def share_via(args: argparse.Namespace) -> str:
    """--share-via, where auto means 9p with -u: virtiofsd creates files as the guest's
    user, which vmrun's confinement refuses (see vmrun.share), while 9p creates them as
    vmrun's own user."""
    return "9p" if args.user is not None and args.share_via == "auto" else args.share_via


def command_env(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """--env-file's variables, then -e's (the later wins in the guest)."""
    host = dict(os.environ)
    env = tuple(pair for path in args.env_file for pair in read_env_file(path, host))
    env += parse_env(args.env, host)
    if args.tty and "TERM" in os.environ:
        env = (("TERM", os.environ["TERM"]), *env)  # the guest's terminal is the host's
    return env


def prepare_oci(spec: MachineSpec, command: Command, notice: Notice = notice_stderr
                ) -> OciRun | None:
    """SPEC's OCI image pulled and read before anything boots: a run with no command
    and an image without a default fails here, not after the boot. None: the reference
    is a VM disk (pulled, and attached later like any disk image)."""
    from vmrun.oci import run as oci_run

    arch = lookup_arch(spec.arch or host_arch()).name
    with reporter(quiet=notice is silent) as progress:
        prepared = oci_run.prepare(spec, arch=arch, notice=notice, progress=progress)
    if prepared is not None:
        oci_run.apply(prepared, command, shared=spec.share != Share.NONE)
    return prepared


