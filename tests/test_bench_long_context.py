"""benches/long_context.py: ``--quick`` runs end to end, one row per length, with the KV cache the
formula gives, and its decode steps (after a prefill or against a random cache) sit at the positions
that follow the cache, as ``generate`` puts them.

The figures themselves are measured by hand (docs/long-context.md); this only makes sure the script
still runs and measures what it says.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from bench_scripts import BENCHES, load_bench

PATH = BENCHES / "long_context.py"


@pytest.fixture(scope="module")
def bench():
    return load_bench("long_context")


def test_quick_writes_a_row_per_length_with_the_kv_cache_the_formula_gives(tmp_path):
    out = tmp_path / "long-context.json"
    result = subprocess.run([sys.executable, str(PATH), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    config, rows, n = data["config"], data["rows"], data["args"]["new_tokens"]
    assert [(r["length"], r["mode"]) for r in rows] == [
        (64, "prefill+decode"), (128, "prefill+decode"), (96, "decode-only")]
    per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * 4  # fp32
    for row in rows:
        L = row["length"]
        assert row["status"] == "ok", row
        assert str(L) in result.stdout.replace(",", "")
        assert row["decode_ms_per_token"] > 0 and all(t > 0 for t in row["decode_step_seconds"])
        assert len(row["decode_step_seconds"]) == n
        # The cache holds the prompt after the prefill and one more position per decode step.
        assert row["cache_length_after_prefill"] == L and row["cache_length_after_decode"] == L + n
        assert row["kv_cache_bytes"] == row["kv_cache_bytes_expected"] == per_token * L
        assert row["kv_cache_bytes_after_decode"] == per_token * (L + n)
        assert row["positions"] == list(range(L, L + n))
        assert row["weights_bytes"] > 0 and row["peak_bytes"] >= 0
    for row in rows[:2]:
        assert row["prefill_seconds"] > 0
        assert row["prefill_tokens_per_second"] == pytest.approx(row["length"] / row["prefill_seconds"])
    assert rows[2]["prefill_seconds"] is None
    assert "prefill not run" in result.stdout


def tiny(bench):
    args = bench.parse_args(["--quick"])
    torch.manual_seed(0)
    model = bench.ArborForCausalLM._from_config(args.config, attn_implementation="sdpa").eval()
    return args.config, model


def test_prefill_then_decode_gives_the_tokens_generate_gives(bench):
    config, model = tiny(bench)
    prompt = torch.randint(0, config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    cache = bench.DynamicCache(config=config)
    first = bench.prefill(model, prompt, cache)
    times, positions, tokens = bench.decode(model, cache, first, 4, "cpu")
    assert positions == [20, 21, 22, 23] and cache.get_seq_length() == 24
    with torch.inference_mode():
        expected = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert [int(first)] + tokens == expected[0, 20:].tolist()


def test_decode_only_decodes_after_the_random_cache(bench):
    config, model = tiny(bench)
    cache = bench.random_cache(config, 50, torch.float32, "cpu", seed=3)
    assert cache.get_seq_length() == 50
    assert bench.cache_bytes(cache) == bench.kv_cache_bytes_expected(config, 50, torch.float32)
    twin = copy.deepcopy(cache)
    token = torch.tensor([[7]])
    _, positions, tokens = bench.decode(model, cache, token, 3, "cpu")
    assert positions == [50, 51, 52] and cache.get_seq_length() == 53
    # The same steps with the positions left to the model, which reads them off the cache's length.
    reference = []
    with torch.inference_mode():
        for _ in range(3):
            out = model(input_ids=token, use_cache=True, **{bench.compat.CACHE_KWARG: twin})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            reference.append(int(token))
    assert tokens == reference
    # ...and a step at a wrong position would not have given the same logits.
    with torch.inference_mode():
        at = {p: model(input_ids=torch.tensor([[7]]), position_ids=torch.tensor([[p]]), use_cache=True,
                       **{bench.compat.CACHE_KWARG: copy.deepcopy(cache)}).logits for p in (53, 0)}
    assert not torch.allclose(at[53], at[0])


def test_a_length_over_the_memory_limit_is_not_started(bench):
    args = bench.parse_args(["--quick", "--memory-limit", "1"])
    row = bench.run_length(args, 2**30, True, args.config)
    assert row["status"] == "too large" and "over --memory-limit 1 GiB" in row["message"]
    assert "too large: not run" in bench.format_row(row)


def test_a_cpu_prefills_only_4k_by_default_and_cuda_every_length(bench, monkeypatch):
    cpu = bench.parse_args([])
    assert (cpu.length_list, cpu.decode_only_list, cpu.new_tokens) == ([4096], [16384, 32768, 65536, 131072], 4)
    assert bench.parse_args(["--new-tokens", "8"]).new_tokens == 8
    # A length given by hand is the whole plan.
    given = bench.parse_args(["--lengths", "1024"])
    assert (given.length_list, given.decode_only_list, given.new_tokens) == ([1024], [], 16)
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    cuda = bench.parse_args(["--device", "cuda"])
    assert (cuda.length_list, cuda.decode_only_list, cuda.new_tokens) == ([4096, 16384, 32768, 65536, 131072], [], 16)
    assert cuda.fit_limit is None


def test_on_a_cpu_a_length_over_most_of_the_memory_is_not_started_without_a_cap(bench, monkeypatch):
    monkeypatch.setattr(bench, "machine_memory", lambda: 8 * 2**30)
    args = bench.parse_args(["--quick"])
    assert args.memory_limit is None and args.fit_limit == 6.0
    row = bench.run_length(args, 2**30, True, args.config)
    assert row["status"] == "too large" and "over 6 GiB, 75% of this machine's memory" in row["message"]


def test_help_prints(bench):
    result = subprocess.run([sys.executable, str(PATH), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--memory-limit" in result.stdout, result.stderr
    assert subprocess.run([sys.executable, str(PATH), "--memory-limit", "0"], capture_output=True,
                          timeout=120).returncode == 2
