"""Behaviour of `ArborForCausalLM` itself: caching, padding, saving, errors, hooks."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import arbor_plugins
from arbor import ArborConfig, ArborConfigError, ArborForCausalLM, compat, count_parameters
from arbor.plugins import get_plugin_manager

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
UNEVEN = dict(TINY, num_hidden_layers=3, layer_intermediate_sizes=[48, 80, 16],
              layer_num_attention_heads=[4, 6, 2], layer_num_key_value_heads=[2, 3, 1])


def build(attn: str = "sdpa", **overrides) -> ArborForCausalLM:
    model = ArborForCausalLM._from_config(ArborConfig(**{**TINY, **overrides}), attn_implementation=attn)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cached_decoding_equals_full_forward(attn):
    model = build(attn, **{k: v for k, v in UNEVEN.items() if k not in TINY or k == "num_hidden_layers"})
    ids = torch.randint(0, 96, (2, 14))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        steps = [out.logits]
        cache = compat.output_cache(out)
        for t in range(6, 14):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = compat.output_cache(out)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        a = model.generate(ids[:1, :4], max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=0)
        b = model.generate(ids[:1, :4], max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padded_batch_equals_unpadded_rows(side, attn):
    model = build(attn)
    rows = [torch.randint(1, 96, (n,)) for n in (9, 5, 7)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=positions).logits
        for i, r in enumerate(rows):
            alone = model(r[None]).logits[0]
            got = batched[i][mask[i].bool()]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)


def test_left_padded_generation_equals_unpadded():
    model = build("sdpa")
    rows = [torch.randint(1, 96, (n,)) for n in (8, 4)]
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, 8 - len(r):], mask[i, 8 - len(r):] = r, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[i, 8:], alone[0, len(r):])


def test_sampling_is_seeded_and_in_vocab():
    model = build()
    ids = torch.randint(0, 96, (2, 3))
    args = dict(max_new_tokens=12, do_sample=True, top_k=20, temperature=0.9, pad_token_id=0)
    torch.manual_seed(7)
    a = model.generate(ids, **args)
    torch.manual_seed(7)
    b = model.generate(ids, **args)
    assert torch.equal(a, b) and a.shape == (2, 15) and int(a.max()) < 96


def test_uneven_model_saves_and_reloads_through_auto_classes(tmp_path):
    model = build(**UNEVEN)
    ids = torch.randint(0, 96, (2, 10))
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ArborConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ArborForCausalLM)
    assert loaded.config.layer_intermediate_sizes == [48, 80, 16]
    assert [layer.self_attn.num_heads for layer in loaded.model.layers] == [4, 6, 2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_checkpoint_not_matching_its_config_names_tensor_and_shapes(tmp_path):
    build(**UNEVEN).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["layer_intermediate_sizes"] = [48, 64, 16]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as info:
        ArborForCausalLM.from_pretrained(tmp_path)
    message = str(info.value)
    assert "model.layers.1.mlp" in message and "80" in message and "64" in message


def test_tied_embeddings_share_storage_and_survive_reload(tmp_path):
    model = build(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = ArborForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_gradient_checkpointing_gives_same_loss_and_gradients():
    ids = torch.randint(0, 96, (2, 12))
    plain = build().train()
    ckpt = build().train()
    ckpt.load_state_dict(plain.state_dict())
    compat.enable_gradient_checkpointing(ckpt)
    assert all(layer.gradient_checkpointing for layer in ckpt.model.layers)
    la = plain(ids, labels=ids).loss
    lb = ckpt(ids, labels=ids).loss
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_on_cpu_trains():
    model = build().train()
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        reference = model(ids, labels=ids).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    assert abs(out.loss.item() - reference.item()) < 0.05 * reference.item()
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_loss_goes_down_when_training():
    model = build().train()
    ids = torch.randint(0, 96, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_count_parameters_matches_the_built_model():
    for overrides in ({}, {"tie_word_embeddings": True}, {k: v for k, v in UNEVEN.items()}):
        config = ArborConfig(**{**TINY, **overrides})
        model = ArborForCausalLM(config)
        assert count_parameters(config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_size": 30}, "hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"intermediate_size": 0}, "intermediate_size"),
        ({"max_layers": 1}, "max_layers"),
        ({"rope_parameters": {"rope_type": "spiral", "rope_theta": 1e4}}, "rope_parameters.rope_type"),
        ({"layer_intermediate_sizes": [48]}, "layer_intermediate_sizes"),
        ({"layer_num_key_value_heads": [2, 3]}, "layer_num_key_value_heads[1]"),
        ({"hidden_act": "wiggle"}, "hidden_act"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ArborConfigError, match="ArborConfig." + re.escape(field)):
        ArborConfig(**{**TINY, **overrides})


def test_presets_build_valid_configs():
    from arbor import PRESETS

    for name in PRESETS:
        config = ArborConfig.from_preset(name)
        assert config.num_hidden_layers >= 1
    big = ArborConfig.from_preset("arbor-500m-1b")
    assert (big.num_hidden_layers, big.hidden_size, big.num_attention_heads, big.vocab_size) == (24, 1024, 16, 128_000)
    assert big.rope_parameters["rope_type"] == "linear" and big.rope_parameters["factor"] == 32.0
    assert 400e6 < count_parameters(big) < 700e6
    with pytest.raises(ArborConfigError, match="preset"):
        ArborConfig.from_preset("huge")


class StatsRecorder:
    def __init__(self):
        self.calls = []

    @arbor_plugins.hookimpl
    def arbor_pre_forward_stats(self, model, layer_idx, hidden_states, step):
        assert not hidden_states.requires_grad
        self.calls.append((step, layer_idx, tuple(hidden_states.shape)))


class RopeStretcher:
    @arbor_plugins.hookimpl
    def arbor_rope_config(self, config, rope_parameters):
        return {**rope_parameters, "rope_type": "linear", "factor": 8.0}


@pytest.fixture
def register():
    pm = get_plugin_manager()
    added = []

    def add(obj):
        pm.register(obj, name=f"test-{type(obj).__name__}")
        added.append(obj)
        return obj

    yield add
    for obj in added:
        pm.unregister(obj)


def test_stats_hook_runs_on_interval_steps_in_training_only(register):
    recorder = register(StatsRecorder())
    model = build().train()
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        model(ids)  # stats off by default
    assert recorder.calls == []
    model.stats_interval = 3
    with torch.no_grad():
        for _ in range(7):
            model(ids)
        model.eval()
        model(ids)
    assert [c[:2] for c in recorder.calls] == [(0, 0), (0, 1), (3, 0), (3, 1), (6, 0), (6, 1)]
    assert recorder.calls[0][2] == (2, 5, 32)
    with pytest.raises(ValueError, match="stats_interval"):
        model.stats_interval = -1


def test_rope_config_hook_changes_the_tables(register):
    plain = build()
    register(RopeStretcher())
    stretched = build()
    reference = build(rope_parameters={"rope_type": "linear", "rope_theta": 10_000.0, "factor": 8.0})
    stretched.load_state_dict(plain.state_dict())
    reference.load_state_dict(plain.state_dict())
    assert stretched.config.rope_parameters["rope_type"] == "default"  # the saved config is untouched
    ids = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(stretched(ids).logits, reference(ids).logits)
        assert not torch.allclose(stretched(ids).logits, plain(ids).logits)


def test_attention_backends_are_chosen_by_registered_name(monkeypatch):
    # flex is refused without CUDA (test_attention_backends checks the refusal); the name maps all the same.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = ArborForCausalLM._from_config(ArborConfig(**TINY), attn_implementation="flex")
    monkeypatch.undo()
    assert model.config._attn_implementation == "flex_attention"
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="valid names: .*sdpa"):
        ArborForCausalLM._from_config(ArborConfig(**TINY), attn_implementation="warp-drive")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="flash-attn.*not available"):
            ArborForCausalLM._from_config(ArborConfig(**TINY), attn_implementation="flash-attn")


def test_return_dict_false_gives_a_tuple_with_the_loss():
    model = build()
    ids = torch.randint(0, 96, (1, 6))
    out = model(ids, labels=ids, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], model(ids, labels=ids).loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn needs a CUDA GPU; none here")
def test_flash_attn_matches_sdpa_on_gpu():
    pytest.importorskip("flash_attn", reason="the flash-attn package is not installed (it publishes no wheels)")
    torch.manual_seed(0)
    reference = build("sdpa", **UNEVEN).cuda().to(torch.bfloat16)
    flash = ArborForCausalLM._from_config(ArborConfig(**UNEVEN), attn_implementation="flash-attn")
    flash.load_state_dict(reference.state_dict())
    flash = flash.cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, 96, (2, 64), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :10] = 0  # left padding
    with torch.no_grad():
        a = reference(ids, attention_mask=mask).logits[mask.bool()]
        b = flash(ids, attention_mask=mask).logits[mask.bool()]
    assert (a.float() - b.float()).abs().max() < 5e-2  # bf16 kernels differ in rounding only
