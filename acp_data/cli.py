"""``acp-data``: one command with subcommands; each lives in the module that does the work and is imported only
when run, so ``acp-data --help`` is instant.

A subcommand module exposes ``cli_main(argv: list[str]) -> int`` that parses its own arguments (``prog`` should be
``acp-data <name>``).
"""

from __future__ import annotations

import importlib
import sys

# name -> (module:function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "priors": ("acp_data.priors:cli_main", "build a priors file (box statistics, co-occurrence, box-pair pools)"),
    "prebuild": ("acp_data.prebuild.cli:cli_main", "plan, generate, segment, score and cache synthetic samples"),
    "rescore": ("acp_data.clis.rescore:cli_main", "recompute CLIS-I and `selected` for a cache (new index generation)"),
    "crops": ("acp_data.cache.crops:cli_main", "build the per-instance crop store of a cache (paste mode)"),
    "verify": ("acp_data.cache.verify:cli_main", "check every sample against index and checksum; quarantine broken"),
    "export": ("acp_data.cache.export:cli_main", "export a cache as an LVIS v1 json (+ images)"),
    "inspect": ("acp_data.cache.inspect:cli_main", "write a static HTML gallery of a cache"),
    "eval": ("acp_data.d2.evaluation:cli_main", "LVIS evaluation of a saved results file (AP, APr, APc, APf)"),
    "report": ("acp_data.report:cli_main", "compare runs: markdown/CSV tables and PNG plots"),
    "shapes": ("acp_data.shapes.cli:cli_main", "the embedded Shapes world (build, judge, ...)"),
}


def _usage() -> str:
    lines = ["usage: acp-data <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`acp-data <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"acp-data: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    mod, func = COMMANDS[name][0].split(":")
    fn = getattr(importlib.import_module(mod), func)
    return int(fn(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
