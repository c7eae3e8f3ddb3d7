"""`python -m vmrun`: the command line."""

from vmrun.cli import entry

entry()
