"""Warm starts: a booted, idle guest kept as a memory template and restored per run."""

from vmrun.warm.ramfile import memory_file
from vmrun.warm.start import (
    Mode,
    RestoreFailed,
    StartPlan,
    TemplateFailed,
    choose,
    fresh_identity,
    open_state,
    remake,
    restored,
    save,
    shape_of,
    why_cold,
)
from vmrun.warm.store import maker_lock

__all__ = ["Mode", "RestoreFailed", "StartPlan", "TemplateFailed", "choose", "fresh_identity",
           "maker_lock", "memory_file", "open_state", "remake", "restored", "save", "shape_of",
           "why_cold"]
