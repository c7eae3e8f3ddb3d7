from vmrun.cli import entry

entry()
