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


def test_the_distributed_row_compares_two_ranks_ddp_and_fsdp_with_one(tmp_path):
    out = tmp_path / "distributed.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--metrics", "distributed", "--preset", "tiny", "--seq", "16", "--batch", "2",
         "--dist-rounds", "1", "--new-tokens", "4", "--prompt-len", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    assert any(line.startswith("distributed 2 ranks") for line in result.stdout.splitlines()), result.stdout
    row = json.loads(out.read_text())["results"]["distributed"]
    assert any(line.startswith("distributed 2 ranks") and "(fsdp)" in line for line in result.stdout.splitlines())
    assert row["nproc"] == 2 and row["ratio"] > 0 and row["ratio_fsdp"] > 0
    for side in ("ranks_1", "ranks_2", "ranks_2_fsdp"):
        assert row[side]["tokens_per_second"] > 0 and row[side]["growth_in_steps"] > 0
    assert [r["world_size"] for r in row["runs"]["2"]] == [r["world_size"] for r in row["runs"]["2-fsdp"]] == [2]
