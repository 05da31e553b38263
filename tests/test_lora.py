"""LoRA on older layers (`arbor.growth.lora`, the ``lora-below`` freeze policy): trains, saves merged, grows on."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from arbor import ArborConfig, ArborForCausalLM
from arbor.growth.export import to_llama
from arbor.growth.lora import add_lora, has_lora, merge_lora
from arbor.plugins import get_registry

pytest.importorskip("peft")

IDS = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(0))


def model_of(**overrides) -> ArborForCausalLM:
    kwargs = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)
    return ArborForCausalLM._from_config(ArborConfig(**{**kwargs, **overrides}), attn_implementation="sdpa")


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def train(model, optimizer, steps=4):
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_adapters_train_bases_stay_and_the_checkpoint_is_merged(tmp_path):
    model = model_of()
    before = logits(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    base = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    names = add_lora(model, [0, 1], r=4, optimizer=opt)
    assert names and all("lora_" in n for n in names)
    torch.testing.assert_close(logits(model), before)  # B starts at zero: nothing changes yet
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" not in trainable
    assert "model.layers.2.self_attn.q_proj.weight" in trainable and "lm_head.weight" in trainable
    losses = train(model, opt, 6)
    assert losses[-1] < losses[0]
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, base)  # only adapters moved
    trained = logits(model)
    assert (trained - before).abs().max() > 1e-4
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    reloaded = ArborForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    torch.testing.assert_close(logits(reloaded), trained, atol=1e-5, rtol=0)
    report = to_llama(model, tmp_path / "llama")  # the export folds the adapters in too
    assert report.max_abs_diff <= 1e-5 * report.logit_scale


def test_width_growth_merges_adapters_first_and_stays_exact():
    model = model_of()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    add_lora(model, [0, 1], r=2, optimizer=opt)
    train(model, opt, 3)
    before = logits(model)
    model.grow_width(48, optimizer=opt)
    assert not has_lora(model)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held <= {id(p) for p in model.parameters()}  # the adapters left the optimizer
    train(model, opt, 2)


def test_lora_below_policy_stages():
    model = model_of()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    policy = get_registry().get("freeze_policy", "lora-below")
    settings = policy.validate_settings({"r": 2, "targets": ["q_proj", "v_proj", "down_proj"]})
    event = model.grow_depth(1, policy="top", optimizer=opt)
    frozen = policy.apply(model, event, settings, optimizer=opt)
    assert "model.embed_tokens.weight" in frozen and "model.layers.0.mlp.down_proj.weight" in frozen
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {f"model.layers.{i}.{p}" for i in range(3)
                       for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert all(p.requires_grad for p in model.model.layers[3].parameters())
    train(model, opt, 3)
    before = logits(model)
    event = model.grow_depth(1, policy="top", optimizer=opt)  # next stage: merge, wrap all four older layers
    policy.apply(model, event, settings, optimizer=opt)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    assert "model.layers.3.self_attn.q_proj" in {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    losses = train(model, opt, 4)
    assert losses[-1] < losses[0]
    assert merge_lora(model, opt) and not has_lora(model)


def test_bad_lora_requests():
    model = model_of()
    with pytest.raises(ValueError, match="targets"):
        add_lora(model, [0], targets=("qkv",))
    with pytest.raises(ValueError, match="layers"):
        add_lora(model, [7])
