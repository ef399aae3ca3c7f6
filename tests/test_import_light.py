"""``import acp_data`` and the CLI stay light: no generation libraries (and no torch) at import; ``--help`` works."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

GEN_LIBS = ("diffusers", "transformers", "open_clip")
CORE_HEAVY = ("torch", "detectron2")


def _imported_after(statements: str) -> set[str]:
    code = textwrap.dedent(f"""
        import sys
        {statements}
        print("\\n".join(sorted({{m.split(".")[0] for m in sys.modules}})))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


@pytest.mark.parametrize("statements", [
    "import acp_data",
    "import acp_data.cli",
    "import acp_data.categories, acp_data.scene, acp_data.registry, acp_data.stages",
])
def test_package_import_pulls_in_no_heavy_library(statements):
    mods = _imported_after(statements)
    assert not mods & set(GEN_LIBS), f"{statements!r} imported {sorted(mods & set(GEN_LIBS))}"
    assert not mods & set(CORE_HEAVY), f"{statements!r} imported {sorted(mods & set(CORE_HEAVY))}"


def test_cli_help_works_and_lists_commands():
    out = subprocess.run([sys.executable, "-m", "acp_data.cli", "--help"], capture_output=True, text=True,
                         check=True, timeout=60)
    for cmd in ("prebuild", "eval", "verify", "export"):
        assert cmd in out.stdout
    script = Path(sys.executable).with_name("acp-data")
    if os.access(script, os.X_OK):  # the installed console script
        out2 = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True, timeout=60)
        assert out2.stdout == out.stdout


def test_cli_help_imports_no_subcommand():
    mods = _imported_after("from acp_data.cli import main; main(['--help'])")
    assert not mods & set(GEN_LIBS + CORE_HEAVY)


def test_unknown_command_exits_2():
    out = subprocess.run([sys.executable, "-m", "acp_data.cli", "bogus"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "unknown command 'bogus'" in out.stderr
