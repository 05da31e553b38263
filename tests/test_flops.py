"""FLOP counting: hand counts of the tiny model, growth, tying, freezing, and the trainer's record."""

from __future__ import annotations

import json

import pytest
import torch

from arbor import ArborConfig, ArborForCausalLM
from arbor.training.checkpointing import latest_checkpoint
from arbor.training.flops import FlopCounter, forward_flops_per_token, training_flops, training_flops_per_token
from arbor.training.trainer import TrainConfig, Trainer

SEQ = 16
# The tiny model: vocab V=48, hidden h=32, 2 layers, H=4 heads of d=8, K=2 kv heads, FFN F=64.
# Average causal context over a block of 16 tokens: c = (16 + 1) / 2 = 8.5.
Q = 2 * 32 * (4 * 8)  # q_proj: 2*h*(H*d) = 2048
KV = 2 * (2 * 32 * (2 * 8))  # k_proj + v_proj: 2 * 2*h*(K*d) = 2048
O = 2 * (4 * 8) * 32  # o_proj: 2*(H*d)*h = 2048
MLP = 3 * (2 * 32 * 64)  # gate, up, down: 3 * 2*h*F = 12288
ATTN = 2 * int(2 * 4 * 8 * 8.5)  # scores and values: 2 * 2*H*d*c = 2 * 544 = 1088
LAYER = Q + KV + O + MLP + ATTN  # 19520
HEAD = 2 * 32 * 48  # LM head: 2*h*V = 3072
FORWARD = 2 * LAYER + HEAD  # 42112


def tiny_config(**overrides) -> ArborConfig:
    base = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)
    base.update(overrides)
    return ArborConfig.from_preset("tiny", **base)


def tiny(**overrides) -> ArborForCausalLM:
    torch.manual_seed(0)
    return ArborForCausalLM(tiny_config(**overrides))


def test_hand_count_of_the_tiny_model():
    assert (LAYER, FORWARD) == (19520, 42112)
    model = tiny()
    assert forward_flops_per_token(model.config, SEQ) == FORWARD
    assert forward_flops_per_token(model, SEQ) == FORWARD
    # Everything trainable: backward is twice the forward, for every matmul.
    assert training_flops_per_token(model, SEQ) == training_flops_per_token(model.config, SEQ) == 3 * FORWARD
    assert training_flops(model, 1000, SEQ) == 1000 * 3 * FORWARD
    # The attention term follows seq_len: c = (8 + 1) / 2 = 4.5 at seq_len 8.
    # 2 layers * 2 matmuls * 2*H*d * (8.5 - 4.5) fewer
    assert forward_flops_per_token(model.config, 8) == FORWARD - 2 * 2 * (2 * 4 * 8) * 4
    with pytest.raises(ValueError, match="seq_len"):
        forward_flops_per_token(model.config, 0)


def test_growth_changes_the_count_to_the_grown_sizes():
    model = tiny()
    model.grow_depth(1)
    assert forward_flops_per_token(model.config, SEQ) == 3 * LAYER + HEAD
    model.grow_width(96, layers=[0])  # layer 0 only: 3 * 2*32*(96 - 64) = 6144 more
    assert model.config.layer_intermediate_sizes == [96, 64, 64]
    assert forward_flops_per_token(model.config, SEQ) == 3 * LAYER + HEAD + 3 * 2 * 32 * 32
    model.grow_heads(8, 4, layers=[2])  # layer 2: 8 heads, 4 kv heads
    assert model.config.layer_num_attention_heads == [4, 4, 8]
    # q, k + v, o at 8 and 4 heads: 3 * 4096; the MLP as before; attention 2 * 2*8*8*8.5 = 2176.
    grown = (2 * 32 * 64) + 2 * (2 * 32 * 32) + (2 * 64 * 32) + MLP + 2 * int(2 * 8 * 8 * 8.5)
    assert grown == 26752
    assert forward_flops_per_token(model.config, SEQ) == 2 * LAYER + grown + HEAD + 3 * 2 * 32 * 32
    assert training_flops_per_token(model, SEQ) == 3 * forward_flops_per_token(model.config, SEQ)


def test_tied_and_untied_heads_count_the_same_matmul():
    tied, untied = tiny(tie_word_embeddings=True), tiny(tie_word_embeddings=False)
    assert forward_flops_per_token(tied.config, SEQ) == forward_flops_per_token(untied.config, SEQ) == FORWARD
    assert training_flops_per_token(tied, SEQ) == training_flops_per_token(untied, SEQ) == 3 * FORWARD
    # Freezing the embedding freezes a tied head too: its weight gradient (1x HEAD) goes.
    tied.model.embed_tokens.weight.requires_grad_(False)
    untied.model.embed_tokens.weight.requires_grad_(False)
    assert training_flops_per_token(tied, SEQ) == 3 * FORWARD - HEAD
    assert training_flops_per_token(untied, SEQ) == 3 * FORWARD  # the first norm's gain still needs its input's grad
    assert training_flops_per_token(tied.config, SEQ, frozen=["model.embed_tokens"]) == 3 * FORWARD - HEAD
    for p in tied.parameters():
        p.requires_grad_(True)
    assert training_flops_per_token(tied, SEQ, frozen=["model.embed_tokens"]) == 3 * FORWARD - HEAD
    assert training_flops_per_token(tied, SEQ, frozen=["lm_head"]) == 3 * FORWARD - HEAD  # the same tensor


def test_frozen_parameters_cost_less_backward():
    model = tiny(tie_word_embeddings=False)
    full = training_flops_per_token(model, SEQ)
    # Frozen below: the embedding and all of layer 0. Nothing there needs a backward (1x forward instead of 3x).
    for name, p in model.named_parameters():
        if name.startswith(("model.embed_tokens.", "model.layers.0.")):
            p.requires_grad_(False)
    assert training_flops_per_token(model, SEQ) == full - 2 * LAYER
    assert training_flops_per_token(model.config, SEQ, frozen=["model.embed_tokens", "model.layers.0"]) \
        == full - 2 * LAYER
    # A frozen layer above trainable ones still passes gradients down: its weights lose their
    # weight gradient (1x each), the weightless attention matmuls keep their full backward.
    for p in model.parameters():
        p.requires_grad_(True)
    for p in model.model.layers[1].parameters():
        p.requires_grad_(False)
    assert training_flops_per_token(model, SEQ) == full - (LAYER - ATTN)
    # An explicit frozen list replaces the model's flags.
    assert training_flops_per_token(model, SEQ, frozen=[]) == full
    # Only the head frozen: no weight gradient for it.
    assert training_flops_per_token(model, SEQ, frozen=["lm_head.weight"]) == full - HEAD


def test_a_frozen_substrate_keeps_the_three_x_rule():
    config = tiny_config(substrate="binary", tie_word_embeddings=False)
    assert training_flops_per_token(config, SEQ) == 3 * FORWARD
    # With layer 0's input norm frozen too, layer 0's q/k/v inputs need no gradient any more (their
    # weights still do, and so do q, k and v themselves, so the attention matmuls keep their backward).
    frozen = ["model.layers.0.input_layernorm"]
    assert training_flops_per_token(config, SEQ, frozen=frozen) == 3 * FORWARD - (Q + KV)


def test_lora_adapters_add_their_matmuls():
    pytest.importorskip("peft")
    from arbor.growth.lora import add_lora

    model = tiny(tie_word_embeddings=False)
    add_lora(model, [1], r=2, targets=("q_proj",))
    # q_proj base frozen: loses its weight gradient (1x Q); the adapter x(32) -> 2 -> 32 adds
    # 2*32*2 + 2*2*32 = 256 forward, 3x with both adapter matrices trainable.
    assert forward_flops_per_token(model.config, SEQ) == FORWARD
    assert training_flops_per_token(model, SEQ) == 3 * FORWARD - Q + 3 * 256


def test_counter_accumulates_per_step_costs():
    model = tiny()
    counter = FlopCounter()
    counter.step(model, 64, SEQ)
    model.grow_depth(1)
    counter.step(model, 64, SEQ)
    assert counter.total == 64 * 3 * FORWARD + 64 * 3 * (FORWARD + LAYER)
    assert counter.last == 64 * 3 * (FORWARD + LAYER)


def test_trainer_logs_cumulative_flops_that_switch_at_the_growth_step(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 48, (40, 24), generator=g)
    train, val = data[:32], data[32:]
    config = TrainConfig.model_validate(dict(
        max_steps=10, batch_size=4, seq_len=24, warmup_steps=2, lr=1e-2, eval_interval=100, save_interval=5,
        log_interval=1, keep_checkpoints=1,
        growth={"trigger": "schedule", "trigger_settings": {"steps": [4]}, "step": {"axis": "depth", "num_layers": 1}}))
    model = tiny()
    before = training_flops_per_token(model, 24)
    trainer = Trainer(model, config, train, val, tmp_path, progress=False, echo=lambda s: None)
    trainer.fit()
    assert trainer.model.config.num_hidden_layers == 3
    after = training_flops_per_token(trainer.model, 24)
    # At seq_len 24 (c = 12.5) a layer is Q + KV + O + MLP + 2 * 2*4*8*12.5 = 6144 + 12288 + 1600 = 20032.
    assert before == 3 * (2 * 20032 + HEAD) and after == before + 3 * 20032
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    flops = {r["step"]: r["flops"] for r in lines if "loss" in r and "event" not in r}
    assert sorted(flops) == list(range(1, 11))
    steps = [flops[s] - flops.get(s - 1, 0) for s in range(1, 11)]
    tokens = 4 * 24
    assert steps == [tokens * before] * 4 + [tokens * after] * 6  # grew after step 4
    assert trainer.flops.total == flops[10]
    resumed = Trainer.resume(latest_checkpoint(tmp_path), train, val, tmp_path, progress=False, echo=lambda s: None)
    assert resumed.flops.total == flops[10]
