"""Smoke test of benches/growth.py: it runs, reports every operator, and its memory tracker counts right."""

from __future__ import annotations

import pytest
import torch
from bench_scripts import load_bench

MB = 2**20


@pytest.fixture(scope="module")
def bench():
    return load_bench("growth")


def test_tracker_counts_a_known_allocation(bench):
    with bench.LiveStorageTracker() as tracker:
        kept = torch.empty(MB // 4)  # 1 MiB of float32
        view, param = kept.view(2, -1), torch.nn.Parameter(kept)  # same storage: no new bytes
    assert tracker.peak == tracker.current == MB
    del kept, view, param


def test_tracker_peak_is_live_delta(bench):
    old = torch.empty(MB)  # 4 MiB that exist before tracking
    with bench.LiveStorageTracker() as tracker:
        tracker.watch({"old": old})
        temp = torch.zeros(MB // 2)  # +2 MiB
        del temp  # back to 0
        new = torch.ones(3 * MB // 4)  # +3 MiB: the peak
        del old  # -4 MiB
    assert tracker.peak == 3 * MB
    assert tracker.current == -MB
    assert tracker.born_peak == 3 * MB
    assert tracker.held_past_peak() == {"old": 4 * MB}
    del new


def test_benchmark_runs_on_tiny(bench, tmp_path):
    out = tmp_path / "growth.json"
    payload = bench.main(["--preset", "tiny", "--seq", "8", "--steps", "1", "--warmup", "0", "--quiet",
                          "--json", str(out)])
    assert out.exists()
    assert payload["train_step"]["median_seconds"] > 0
    assert set(payload["results"]) == set(bench.OPERATORS)
    for op, result in payload["results"].items():
        assert set(result["runs"]) == {"none", "adamw"}, op
        for run in result["runs"].values():
            assert run["median_seconds"] > 0 and run["ratio_to_train_step"] > 0
            assert run["new_parameters"] > 0 and run["peak_extra_bytes"] > 0
            # after the call, what stays is exactly what was added
            assert run["tracker_end_extra_bytes"] == run["new_bytes"], op
            assert isinstance(run["time_pass"], bool) and isinstance(run["memory_pass"], bool)
    heads = payload["results"]["heads"]["runs"]["none"]["config_after"]
    assert heads["head_dim"] == 16 and heads["num_attention_heads"] == 8
