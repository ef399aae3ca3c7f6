"""``acp-data``: one command with subcommands; each lives in the module that does the work and is imported only
when run, so ``acp-data --help`` is instant.

A subcommand module exposes ``cli_main(argv: list[str]) -> int`` that parses its own arguments (``prog`` should be
``acp-data <name>``).

One error style for every command: a usage or input error (a path, a key, a value the user fixes) is one line
``acp-data <name>: error: ...`` on stderr with exit status 2, as argparse does for bad options; exit 1 is kept for
a result that is bad (``verify`` found broken samples). A command returns ``fail(prog, error)`` or raises
``UsageError``, which ``main`` prints the same way.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# name -> (module:function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "priors": ("acp_data.priors:cli_main", "build a priors file (box statistics, co-occurrence, box-pair pools)"),
    "prebuild": ("acp_data.prebuild.cli:cli_main", "plan, generate, segment, score and cache synthetic samples"),
    "rescore": ("acp_data.clis.rescore:cli_main", "recompute CLIS-I and `selected` for a cache (new index generation)"),
    "generations": ("acp_data.cache.generations:cli_main",
                    "list a cache's index generations; make an earlier one current again (undo a rescore)"),
    "crops": ("acp_data.cache.crops:cli_main", "build the per-instance crop store of a cache (paste mode)"),
    "verify": ("acp_data.cache.verify:cli_main", "check every sample against index and checksum; quarantine broken"),
    "select": ("acp_data.cache.select_report:cli_main",
               "what a training config would take from caches: kept images/instances per group and category"),
    "export": ("acp_data.cache.export:cli_main", "export a cache as an LVIS v1 json (+ images)"),
    "inspect": ("acp_data.cache.inspect:cli_main", "write a static HTML gallery of a cache"),
    "eval": ("acp_data.d2.evaluation:cli_main", "LVIS evaluation of a saved results file (AP, APr, APc, APf)"),
    "report": ("acp_data.report:cli_main", "compare runs: markdown/CSV tables and PNG plots"),
    "shapes": ("acp_data.shapes.cli:cli_main", "the embedded Shapes world (build, judge, ...)"),
}


class UsageError(Exception):
    """Bad usage or input the user fixes, naming the file, key or value: one line on stderr, exit status 2."""


def fail(prog: str, error: object) -> int:
    """Print ``<prog>: error: <error>`` on stderr and return the usage-error exit status 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def check_output_path(path: str | os.PathLike, kind: str, what: str) -> Path:
    """``path`` as an output of ``kind`` ``"file"`` or ``"dir"``: ``UsageError`` (naming ``what``, e.g. ``--out``)
    when it or a parent exists as the other kind, so a command stops before any work rather than at its last write."""
    p = Path(path)
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    if p.exists():
        if kind == "file" and p.is_dir():
            raise UsageError(f"{what} {str(p)!r} is a directory; give a file path")
        if kind == "dir" and not p.is_dir():
            raise UsageError(f"{what} {str(p)!r} exists and is not a directory; give a directory path")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{what} {str(p)!r}: {str(parent)!r} is a file, not a directory")
            break
    return p


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows every option's default (``(default: X)``) unless the help text already says it; options
    without a value (flags) and ``None`` defaults are left as they are."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        h = action.help or ""
        d = action.default
        if ("%(default)" in h or "default" in h.lower() or d is None or d is False or d == argparse.SUPPRESS
                or d == [] or not action.option_strings):
            return h
        return h + (" " if h else "") + "(default: %(default)s)"


def _usage() -> str:
    lines = ["usage: acp-data <command> [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`acp-data <command> --help` shows a command's options. Usage and input errors: one line on stderr,",
              "exit status 2."]
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
    try:
        return int(fn(rest) or 0)
    except UsageError as e:
        return fail(f"acp-data {name}", e)


if __name__ == "__main__":
    sys.exit(main())
