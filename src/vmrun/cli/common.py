"""What every subcommand's parser shares: usage errors, typed numbers, the exit codes."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from vmrun.errors import UsageError
from vmrun.spec import parse_count, parse_seconds


def digest_text(digest: str, *, short: bool = False) -> str:
    """DIGEST (bare sha256 hex, or ALGORITHM:HEX) as every command prints it: in full
    (sha256:<64 hex>) in JSON and in lines that scripts read, SHORT (sha256:<12 hex>, which
    vmrun takes back as a reference) in tables."""
    if not digest:
        return digest  # none known
    algorithm, _, hexdigest = digest.rpartition(":")
    return f"{algorithm or 'sha256'}:{hexdigest[:12] if short else hexdigest}"


# The subcommands, with the line `vmrun --help` and the shell completions show for each.
COMMANDS = {
    "run": "run COMMAND in a throwaway VM (the default: vmrun [OPTIONS] -- COMMAND)",
    "info": "what vmrun would use on this machine: QEMU, accelerator, guest kernel",
    "seed": "write a cloud-init NoCloud seed ISO",
    "image": "pull, push, import, list, inspect, bake, remove and prune disk images",
    "disk": "create, inspect and transform disk images (qemu-img)",
    "template": "list and remove the memory templates warm starts restore from",
    "doctor": "check what runs need on this host, each problem with its fix",
    "completion": "print the shell completion script for bash, zsh or fish",
    "test": "run the project's profiles (vmrun.toml) on their architectures and shards",
    "config": "check the project file (vmrun.toml) and print its resolved profiles",
    "cluster": "serve runs on a cluster: vmrun cluster worker dask://HOST:PORT",
}


def commands_help() -> str:
    """The "commands:" block of `vmrun --help`: one line per subcommand."""
    width = max(map(len, COMMANDS))
    return "commands:\n" + "".join(f"  {name:<{width}}  {line}\n"
                                   for name, line in COMMANDS.items())


EXIT_CODES = """\
exit status:
  the command's own exit status, unchanged (death by signal N gives 128+N), or one of
  vmrun's reserved codes:
  117  vmrun image bake failed (cloud-init errors, no power-off in time)
  118  a disk image or --kernel is unusable, missing, broken or refused as unsafe
  119  the guest vanished before reporting an exit status (channel lost)
  120  the guest kernel panicked
  121  the command ran longer than --timeout
  122  the guest did not boot within --boot-timeout
  123  QEMU is missing, failed to start or died
  124  fetching or verifying the guest's kernel or busybox failed
  125  bad usage
  130  interrupted (SIGINT), 143 terminated (SIGTERM)
"""


def seconds(option: str) -> Any:
    """An argparse type for OPTION's number of seconds (finite, above 0)."""
    return lambda text: parse_seconds(text, option)


def count(option: str, most: int) -> Any:
    """An argparse type for OPTION's whole number from 1 to MOST."""
    return lambda text: parse_count(text, option, most)


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are vmrun's usage errors (exit 125, with a hint)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, hint=f"see {self.prog} --help")
