"""Shared pytest setup: ``tests/`` on sys.path (so ``from helpers import ...`` works from any test) and a
session-wide tiny LVIS-format dataset."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


@pytest.fixture(scope="session")
def tiny_lvis(tmp_path_factory) -> dict:
    """``helpers.write_tiny_lvis`` written once per session (read-only for tests: copy before changing it)."""
    from helpers import write_tiny_lvis

    return write_tiny_lvis(tmp_path_factory.mktemp("datasets"))


def pytest_configure(config) -> None:
    # detectron2 decorates functions with torch.jit.script at import; torch >= 2.9 warns about each one.
    config.addinivalue_line("filterwarnings", r"ignore:.*torch\.jit\.script.*:FutureWarning")

