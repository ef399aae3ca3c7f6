"""``acp-data prebuild``: work units through planner -> generator -> segmenter -> CLIS-L -> CLIS-I -> selection ->
cache, one rank at a time; resumable by generation key, shardable over any number of processes and hosts.

Each rank rebuilds the global unit list from the config (``make_units``), keeps the units with ``index % W == r``
(``shard_units``), skips those whose generation key is already in the cache, and writes its own shards (the cache's
manifest is the only shared state and refuses a writer with other generation settings). Everything in the config is
checked before any model is loaded; ``docs/prebuild.md`` documents every key. ``run_prebuild`` is the plain function
behind the command, for in-process callers such as the Shapes demo.

Modules: ``config`` (keys, defaults, YAML, overrides, checks), ``prepare`` (inputs and stages built, no model
loaded: ``Prepared``), ``units`` (work units and their partition over ranks), ``runner`` (the unit loop, counters,
timers: ``run_prebuild``), ``summary`` (per-rank summary, totals, human lines), ``cli`` (the command line).
"""

from .cli import cli_main
from .config import DEFAULTS, PrebuildError, apply_overrides, check_config, load_config
from .prepare import Prepared, prepare
from .runner import run_prebuild
from .summary import format_summary, merge_summaries

__all__ = [
    "PrebuildError", "DEFAULTS", "load_config", "apply_overrides", "check_config", "prepare", "Prepared",
    "run_prebuild", "format_summary", "merge_summaries", "cli_main",
]
