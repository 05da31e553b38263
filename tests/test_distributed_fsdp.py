"""``arbor train --parallel fsdp``: the model sharded by FSDP2 over 2 processes on the CPU (gloo).

The run grows three times: one layer with the exact zero init, one with the masked init (whose
ramp runs across the following steps), then every layer's FFN with the zero init. Its losses must be those of one process at the same
global batch (up to fp32 reduction order), every rank must end with the same parameters, the
checkpoint (gathered whole on rank 0) must be an ordinary Hugging Face directory, and it must
resume in one process and in two sharded ones with the uninterrupted run's losses.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_distributed import CONFIG, losses, one_and_two, resume_after_step_3, weights

# Depth with the zero init, depth with the masked init (its ramp across the next steps), then the
# FFN of every layer with the zero init, gathered, grown and sharded again one layer at a time.
SHARDED = CONFIG.replace("steps = [2, 4]", "steps = [2, 3, 4]").replace(
    '{axis = "ffn", factor = 1.5, init = "masked", init_settings = {ramp_steps = 2}}',
    '{axis = "depth", num_layers = 1, init = "masked", init_settings = {ramp_steps = 2}},\n'
    '          {axis = "ffn", factor = 1.5, init = "zero"}')


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run in one process and sharded over two."""
    assert SHARDED != CONFIG
    work = tmp_path_factory.mktemp("fsdp")
    config = f'sample_tokens = 4\n{SHARDED.replace("sample_tokens = 0", "")}'
    return (work, *one_and_two(work, config, "--parallel", "fsdp"))


def test_a_sharded_run_trains_and_grows_as_one_process(runs):
    work, one, two = runs
    assert "in 2 processes (fsdp)" in two.stdout
    assert two.stdout.count("grew depth") == 2 and two.stdout.count("grew ffn") == 1  # printed by rank 0 only
    assert losses(work / "two") == pytest.approx(losses(work / "one"), rel=1e-5)
    records = [json.loads(line) for line in (work / "two" / "metrics.jsonl").read_text().splitlines()]
    grown = [(r["step"], r["axis"], r["init"], r["exact"]) for r in records if r.get("event") == "growth"]
    assert grown == [(2, "depth", "zero", True), (3, "depth", "masked", True), (4, "ffn", "zero", True)]
    (ranks,) = [r for r in records if r.get("event") == "ranks"]
    assert ranks["world_size"] == 2 and ranks["fingerprints"][0] == ranks["fingerprints"][1]
    # The sample needs every rank in each forward of generate; rank 0 prints what they made.
    assert two.stdout.count("sample: ") == 1 and one.stdout.splitlines()[-1] == two.stdout.splitlines()[-1]


def test_a_sharded_checkpoint_is_the_one_process_checkpoint(runs):
    from transformers import AutoModelForCausalLM

    work, _, _ = runs
    want, got = weights(work / "one", 6), weights(work / "two", 6)
    assert want.keys() == got.keys()  # the tied LM head is not saved twice
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=5e-4, msg=name)
    saved = torch.load(work / "two" / "checkpoints" / "step-00000006" / "optimizer.pt", weights_only=True)
    alone = torch.load(work / "one" / "checkpoints" / "step-00000006" / "optimizer.pt", weights_only=True)
    assert saved["optimizer"]["state"].keys() == alone["optimizer"]["state"].keys()
    for index, state in alone["optimizer"]["state"].items():
        for key, value in state.items():  # whole moments, not one rank's shard
            assert saved["optimizer"]["state"][index][key].shape == value.shape, (index, key)
    model = AutoModelForCausalLM.from_pretrained(work / "two" / "checkpoints" / "step-00000006")
    assert model.config.num_hidden_layers == 4 and model.config.layer_intermediate_sizes == [192] * 4


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_sharded_checkpoint_resumes_in_one_process_and_in_two(runs, nproc):
    work, _, _ = runs
    resumed = weights(resume_after_step_3(work, nproc, "--parallel", "fsdp"), 6)
    for name, tensor in weights(work / "two", 6).items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=5e-4, msg=name)


@pytest.mark.parametrize("setting, message", [
    ("growth.step={\"axis\": \"hidden\", \"add\": 64}", "a step on axis='hidden' cannot run on a model sharded"),
    ("growth.init=stack", "init='stack' copies existing layers"),
])
def test_growth_a_sharded_model_cannot_take_is_refused_at_the_start(tmp_path, capsys, setting, message):
    from arbor.cli import main

    assert main(["train", "--parallel", "fsdp", "--set", setting, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
