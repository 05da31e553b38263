"""A saved model says how long a context it takes: the tokenizer's ``model_max_length`` and the
generation config's ``max_length`` are its ``max_position_embeddings`` (131,072 for arbor-500m-1b),
not transformers' "no limit" defaults."""

from __future__ import annotations

import json
import logging

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from arbor import ArborConfig, ArborForCausalLM
from arbor.growth.export import to_llama
from arbor.model.config import generation_config_to_save
from arbor.training.checkpointing import save_checkpoint
from arbor.training.tokenizer import save_tokenizer, train_bpe

TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=96, bos_token_id=None, eos_token_id=1, pad_token_id=2)


def tiny_model() -> ArborForCausalLM:
    torch.manual_seed(0)
    return ArborForCausalLM(ArborConfig(**TINY)).eval()


def tokenizer():
    return train_bpe(["the quick brown fox jumps over the lazy dog. " * 20, "pack my box with five dozen jugs"],
                     vocab_size=300)


def test_the_arbor_500m_1b_preset_saves_131072():
    config = ArborConfig.from_preset("arbor-500m-1b")
    assert config.max_position_embeddings == 131_072
    assert generation_config_to_save(GenerationConfig.from_model_config(config), config).max_length == 131_072


def test_generation_config_carries_the_context_length(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert saved["max_length"] == 96
    assert model.generation_config.max_length == GenerationConfig().max_length  # the model's own is unchanged
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert reloaded.generation_config.max_length == 96
    prompt = torch.tensor([[5, 6, 7]])
    out = reloaded.generate(prompt, max_new_tokens=4, do_sample=False)  # max_new_tokens still decides
    assert out.shape == (1, 7) and torch.equal(out, model.generate(prompt, max_new_tokens=4, do_sample=False))
    # A length set on purpose is kept.
    model.generation_config.max_length = 50
    model.save_pretrained(tmp_path / "set")
    assert json.loads((tmp_path / "set" / "generation_config.json").read_text())["max_length"] == 50


def test_a_training_checkpoint_saves_the_tokenizer_with_the_models_context(tmp_path):
    model, tok = tiny_model(), tokenizer()
    assert tok.model_max_length > 1e29  # transformers' "no limit"
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint = save_checkpoint(tmp_path, 1, model, optimizer, {}, tokenizer=tok)
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 96
    assert AutoTokenizer.from_pretrained(checkpoint).model_max_length == 96
    assert json.loads((checkpoint / "generation_config.json").read_text())["max_length"] == 96
    assert tok.model_max_length > 1e29  # the tokenizer in use keeps its own: packing encodes long documents


def test_save_tokenizer_writes_the_given_length_and_restores_the_tokenizer(tmp_path, caplog):
    tok = tokenizer()
    save_tokenizer(tok, tmp_path, 131_072)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.model_max_length == 131_072 and tok.model_max_length > 1e29
    with caplog.at_level(logging.WARNING):
        tok("word " * 200)  # longer than no limit: no "longer than the specified maximum" warning
    assert "maximum sequence length" not in caplog.text


def test_the_llama_export_carries_the_context_length(tmp_path):
    report = to_llama(tiny_model(), tmp_path / "llama")
    assert json.loads((report.out_dir / "generation_config.json").read_text())["max_length"] == 96


def test_arbor_generate_on_a_checkpoint_does_not_warn_about_max_length(tmp_path, capsys, monkeypatch):
    from transformers.generation import utils as generation_utils

    from arbor.cli import main

    model, tok = tiny_model(), tokenizer()
    checkpoint = save_checkpoint(tmp_path, 1, model, torch.optim.AdamW(model.parameters()), {}, tokenizer=tok)
    warned = []  # transformers' own logger writes past pytest's capture
    monkeypatch.setattr(generation_utils.logger, "warning", lambda message, *a, **k: warned.append(message))
    assert main(["generate", str(checkpoint), "the quick", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() and not [m for m in warned if "max_length" in m]
