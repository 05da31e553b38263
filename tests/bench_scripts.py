"""The scripts under ``benches/`` for the tests that run them: where they are, and one loaded as a module."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

BENCHES = Path(__file__).resolve().parents[1] / "benches"


def load_bench(name: str) -> ModuleType:
    """``benches/NAME.py`` imported as the module ``bench_NAME`` (``benches/`` is no package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
