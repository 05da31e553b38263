"""docs/reliability.md names a test for every guarantee: each test it names must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_the_reliability_page_names_exists():
    page = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(?:tests/\w+\.py::)?(test_\w+)`", page))
    files = set(re.findall(r"`(tests/\w+\.py)", page))
    assert len(named) > 30 and files
    assert not [f for f in files if not (ROOT / f).is_file()]
    defined = set(re.findall(r"^def (test_\w+)\(", "\n".join(
        p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py")), re.M))
    assert sorted(named - defined) == []
