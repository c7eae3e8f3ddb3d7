"""Projects: a vmrun.toml's profiles, the runs they make, and their reports."""

from vmrun.project.config import Profile, Project, load, read_project
from vmrun.project.plan import RunUnit, parse_shard, plan
from vmrun.project.runner import Engine, RunResult, run_units

__all__ = ["Engine", "Profile", "Project", "RunResult", "RunUnit", "load", "parse_shard",
           "plan", "read_project", "run_units"]
