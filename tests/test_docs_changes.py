"""docs/changes.md points contributors at files: every path it names must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_path_docs_changes_names_exists():
    text = (ROOT / "docs" / "changes.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"`((?:core|strategies|substrates|arbor_plugins|tests|benches|examples)/[^`]*)`", text))
    assert len(paths) > 15
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing
    # The files it names inside a layer ("`init_schemes.py`" under strategies/) exist there too.
    for name in ("init_schemes.py", "triggers.py", "policies.py", "hookspecs.py", "components.py", "registry.py",
                 "settings.py"):
        assert name in text and list(ROOT.glob(f"*/{name}")), name
