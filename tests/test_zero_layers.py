"""A model with ``num_hidden_layers = 0`` (embeddings, final norm, LM head) is an arbor model:
it runs, trains, saves and loads (with arbor and as remote code), exports to Llama, and grows
exactly from nothing; init schemes that copy layers are refused when there is none to copy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from arbor import ArborConfig, ArborForCausalLM
from arbor.growth.export import to_llama
from arbor.training.config import TrainConfig
from arbor.training.flops import forward_flops_per_token
from arbor.training.trainer import Trainer
from arbor_plugins.growth import GrowthError
from arbor.plugins.selection import Selection
from test_remote_code import WITHOUT_ARBOR

VOCAB, HIDDEN = 64, 32


def config(layers: int = 0, **overrides) -> ArborConfig:
    return ArborConfig.from_preset("tiny", num_hidden_layers=layers, vocab_size=VOCAB, hidden_size=HIDDEN,
                                   intermediate_size=48, **overrides)


def randomised(model: ArborForCausalLM, seed: int = 0) -> ArborForCausalLM:
    # Weights far from the init, so a missing norm or a wrong matrix shows in the logits.
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    return model.eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the second left-padded by two tokens."""
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def greedy(model, ids, mask, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0, **kwargs)


# ------------------------------------------------------------------ (a) config, forward, generate
def test_zero_layers_is_a_valid_config_and_negative_is_refused():
    c = config()
    assert c.num_hidden_layers == 0
    assert c.layer_intermediate_sizes == c.layer_num_attention_heads == c.layer_num_key_value_heads == []
    assert c.layer_generations == []
    with pytest.raises(Exception, match=r"num_hidden_layers=-1 is invalid: must be an integer >= 0"):
        config(-1)
    with pytest.raises(Exception, match=r"num_hidden_layers=1.5 is invalid"):
        config(1.5)
    assert config(min_layers=0).min_layers == 0  # a run may start from, and stay at, no layers
    with pytest.raises(Exception, match=r"min_layers=-1 is invalid: must be an integer >= 0"):
        config(min_layers=-1)


def test_forward_is_head_of_normed_embedding_and_generate_agrees_with_and_without_cache():
    model = randomised(ArborForCausalLM(config()))
    assert len(model.model.layers) == 0
    ids, mask = batch()
    out = logits(model, ids, mask)
    with torch.no_grad():
        expected = model.lm_head(model.model.norm(model.model.embed_tokens(ids)))
    assert out.shape == (2, 7, VOCAB)
    assert (out - expected).abs().max().item() <= 1e-6
    cached, uncached = greedy(model, ids, mask), greedy(model, ids, mask, use_cache=False)
    assert cached.shape == (2, 12) and torch.equal(cached, uncached)
    assert torch.equal(greedy(model, ids, mask, cache_implementation="static"), cached)
    # No layer mixes positions, so each next token depends on the last token only.
    last = logits(model, cached[:, -2:-1], torch.ones(2, 1, dtype=torch.long))[:, -1].argmax(-1)
    assert torch.equal(last, cached[:, -1])


def test_flop_count_of_zero_layers_is_the_head():
    assert forward_flops_per_token(config(), 16) == 2 * HIDDEN * VOCAB
    assert forward_flops_per_token(config(1), 16) > forward_flops_per_token(config(), 16)


# ------------------------------------------------------------------------------------ (b) train
def test_trainer_trains_a_zero_layer_model_and_grows_it_from_nothing(tmp_path):
    torch.manual_seed(0)
    row = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(2))
    data = row.repeat(8, 1)  # one sequence, repeated: the loss must fall on it
    train_config = TrainConfig.model_validate(dict(
        max_steps=20, batch_size=4, seq_len=16, warmup_steps=0, lr=3e-2, eval_interval=100, save_interval=100,
        log_interval=1, keep_checkpoints=1, device="cpu",
        growth={"trigger": "schedule", "trigger_settings": {"steps": [10]},
                "step": {"axis": "depth", "num_layers": 1, "init": "zero"}}))
    model = ArborForCausalLM(config())
    trainer = Trainer(model, train_config, data, data[:2], tmp_path, plugins=Selection(), progress=False,
                      echo=lambda s: None)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and "event" not in r]
    growth = [r for r in records if r.get("event") == "growth"]
    assert len(losses) == 20 and losses[-1] < 0.7 * losses[0]
    assert len(growth) == 1 and growth[0]["layers_before"] == 0 and growth[0]["layers"] == 1
    assert trainer.model.config.num_hidden_layers == 1


def test_utilization_trigger_refuses_a_model_without_layers():
    from arbor_strategies.triggers import UtilizationSettings, UtilizationTrigger

    with pytest.raises(ValueError, match="'utilization' measures layers, but the model has num_hidden_layers=0"):
        UtilizationTrigger().start(ArborForCausalLM(config()), UtilizationSettings())


# ----------------------------------------------------------------------------- (c) save / load
LOADER = WITHOUT_ARBOR + textwrap.dedent(r"""
    import torch
    from transformers import AutoModelForCausalLM

    directory = sys.argv[1]
    inputs = torch.load(f"{directory}/inputs.pt")
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(inputs["ids"], attention_mask=inputs["mask"]).logits
        gen = model.generate(inputs["ids"], attention_mask=inputs["mask"], max_new_tokens=5, do_sample=False,
                             pad_token_id=0)
    torch.save({"module": type(model).__module__, "layers": len(model.model.layers), "logits": out,
                "greedy": gen}, f"{directory}/remote.pt")
    assert not [m for m in sys.modules if m.split(".")[0] in HIDDEN]
""")


def test_save_and_load_with_arbor_and_as_remote_code(tmp_path):
    model = randomised(ArborForCausalLM(config(tie_word_embeddings=False)))
    ids, mask = batch()
    expected, expected_greedy = logits(model, ids, mask), greedy(model, ids, mask)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 0
    loaded = ArborForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 0 and loaded.config.layer_intermediate_sizes == []
    assert torch.equal(logits(loaded, ids, mask), expected)

    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = torch.load(tmp_path / "remote.pt")
    assert "arbor" in remote["module"] and remote["layers"] == 0
    assert (remote["logits"] - expected).abs().max().item() <= 1e-5
    assert torch.equal(remote["greedy"], expected_greedy)


# ------------------------------------------------------------------------------------ (d) export
def test_exports_to_a_llama_with_no_layers_and_the_same_logits(tmp_path):
    assert LlamaConfig(num_hidden_layers=0).num_hidden_layers == 0  # the target accepts it
    model = randomised(ArborForCausalLM(config()))
    report = to_llama(model, tmp_path / "out")
    assert report.max_abs_diff <= 1e-5 and report.padded == {}
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert llama.config.num_hidden_layers == 0 and len(llama.model.layers) == 0
    ids, mask = batch()
    assert (logits(llama, ids, mask) - logits(model, ids, mask)).abs().max().item() <= 1e-5
    assert torch.equal(greedy(llama, ids, mask), greedy(model, ids, mask))


# ------------------------------------------------------------------------------------- (e) grow
@pytest.mark.parametrize("positions", [None, [0, 0, 0]])
def test_grows_depth_exactly_from_zero_layers(positions):
    model = randomised(ArborForCausalLM(config()))
    ids, mask = batch()
    before, before_greedy = logits(model, ids, mask), greedy(model, ids, mask)
    event = model.grow_depth(3, positions=positions, init="zero")
    assert event.layers == [0, 1, 2] and model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert model.config.layer_intermediate_sizes == [48] * 3 and model.config.layer_generations == [1] * 3
    assert not any(layer.training for layer in model.model.layers)  # an eval model gets eval layers
    assert (logits(model, ids, mask) - before).abs().max().item() <= 1e-5
    assert torch.equal(greedy(model, ids, mask), before_greedy)
    assert torch.equal(greedy(model, ids, mask, use_cache=False), before_greedy)
    # The grown model is an ordinary one: width growth works on its new layers, still exactly.
    model.grow_width(64)
    assert (logits(model, ids, mask) - before).abs().max().item() <= 1e-5


@pytest.mark.parametrize("init", ["stack", "copy-neighbor"])
def test_init_schemes_that_copy_layers_are_refused_without_a_layer(init):
    model = randomised(ArborForCausalLM(config()))
    ids, mask = batch()
    before = logits(model, ids, mask)
    with pytest.raises(GrowthError, match=f"init='{init}' builds new layers from existing ones, but the model has "
                                          "num_hidden_layers=0"):
        model.grow_depth(2, init=init)
    assert model.config.num_hidden_layers == 0 and len(model.model.layers) == 0  # refused before any change
    assert torch.equal(logits(model, ids, mask), before)


@pytest.mark.parametrize("grow", [lambda m: m.grow_width(64), lambda m: m.grow_heads(8),
                                  lambda m: m.grow({"axis": "ffn", "factor": 2.0}, plugins=Selection())])
def test_width_steps_are_refused_without_a_layer(grow):
    with pytest.raises(GrowthError, match="widens existing layers, but the model has num_hidden_layers=0"):
        grow(ArborForCausalLM(config()))


def test_hidden_growth_of_a_zero_layer_model_is_exact():
    model = randomised(ArborForCausalLM(config()))
    ids, mask = batch()
    before = logits(model, ids, mask)
    model.grow_hidden(48)
    assert model.config.hidden_size == 48
    assert (logits(model, ids, mask) - before).abs().max().item() <= 1e-5


def test_one_layer_grows_to_four_in_one_exact_step():
    model = randomised(ArborForCausalLM(config(1)))
    ids, mask = batch()
    before, before_greedy = logits(model, ids, mask), greedy(model, ids, mask)
    event = model.grow_depth(3)
    assert model.config.num_hidden_layers == 4 and len(event.layers) == 3
    assert (logits(model, ids, mask) - before).abs().max().item() <= 1e-5
    assert torch.equal(greedy(model, ids, mask), before_greedy)


@pytest.mark.parametrize(("settings", "fragment"), [
    (["--set", "growth.init=stack"], "growth.init='stack': builds new layers from existing ones"),
    (["--set", 'growth.step={"axis": "ffn", "factor": 2}'], "growth.step.axis='ffn': the model starts with no layers"),
])
def test_a_start_from_no_layers_that_cannot_grow_is_refused_by_the_check(tmp_path, capsys, settings, fragment):
    from arbor.cli import main

    argv = ["train", "--check", "--out", str(tmp_path / "run"), "--set", "model.preset=tiny",
            "--set", "model.num_hidden_layers=0", *settings]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert main(argv[:-2]) == 0  # the zero init from no layers is fine
