"""benches/throughput.py runs end to end: a smoke run of every metric at the smallest sizes.

The figures themselves are measured on purpose-run machines (docs/benchmarks.md); this only makes
sure the script still runs, compares like with like and writes its JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benches" / "throughput.py"


def test_every_metric_runs_at_the_smallest_size(tmp_path):
    out = tmp_path / "throughput.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--preset", "tiny", "--seq", "16", "--batch", "2", "--rounds", "1",
         "--stats-rounds", "1", "--warmup", "1", "--new-tokens", "4", "--prompt-len", "4", "--gen-batch", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for metric in ("training", "generation", "stats"):
        assert any(line.startswith(metric) for line in result.stdout.splitlines()), result.stdout
    data = json.loads(out.read_text())
    assert {"training", "generation", "stats"} <= set(data["results"])
