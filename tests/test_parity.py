"""Numerical parity with `transformers.LlamaForCausalLM` on copied weights.

Llama is the oracle: the same weights under the same names must give the same
logits, loss and greedy continuation, whatever the shapes and the backend.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from arbor import ArborConfig, ArborForCausalLM
from arbor.growth.export import to_llama_config

ATOL = 1e-5


@st.composite
def small_configs(draw) -> dict:
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8, 16]))
    # Half the time hidden = heads * head_dim (Llama's convention), else a head_dim of its own.
    # LlamaConfig insists that heads divide the hidden size even when head_dim is explicit.
    hidden = heads * (head_dim if draw(st.booleans()) else draw(st.sampled_from([4, 8, 16])))
    rope = draw(
        st.sampled_from(
            [
                {"rope_type": "default", "rope_theta": 10_000.0},
                {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0},
            ]
        )
    )
    return dict(
        vocab_size=draw(st.integers(32, 160)),
        hidden_size=hidden,
        intermediate_size=draw(st.integers(8, 80)),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=128,
        rope_parameters=rope,
        tie_word_embeddings=draw(st.booleans()),
        rms_norm_eps=1e-5,
    )


def pair(kwargs: dict, attn: str, seed: int = 0) -> tuple[ArborForCausalLM, LlamaForCausalLM]:
    """An arbor model and a Llama model holding the very same weights."""
    torch.manual_seed(seed)
    config = ArborConfig(**kwargs)
    arbor = ArborForCausalLM._from_config(config, attn_implementation=attn).eval()
    with torch.no_grad():  # larger weights than the default init, so differences would show
        for p in arbor.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    llama = LlamaForCausalLM._from_config(to_llama_config(config), attn_implementation=attn).eval()
    missing, unexpected = llama.load_state_dict(arbor.state_dict(), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    assert sorted(n for n, _ in arbor.named_parameters()) == sorted(n for n, _ in llama.named_parameters())
    return arbor, llama


def random_ids(vocab: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@given(kwargs=small_configs(), seq=st.integers(1, 24))
def test_logits_and_loss_match_llama(kwargs, seq, attn):
    arbor, llama = pair(kwargs, attn)
    ids = random_ids(kwargs["vocab_size"], seq=seq)
    with torch.no_grad():
        a = arbor(ids, labels=ids)
        b = llama(ids, labels=ids)
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=1e-5)
    if seq > 1:
        torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@given(kwargs=small_configs())
def test_greedy_generation_matches_llama(kwargs, attn):
    arbor, llama = pair(kwargs, attn)
    ids = random_ids(kwargs["vocab_size"], batch=1, seq=5)
    args = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out_a = arbor.generate(ids, **args)
    out_b = llama.generate(ids, **args)
    assert torch.equal(out_a, out_b)


def test_gradients_match_llama():
    kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    arbor, llama = pair(kwargs, "sdpa")
    ids = random_ids(64)
    arbor(ids, labels=ids).loss.backward()
    llama(ids, labels=ids).loss.backward()
    grads_b = dict(llama.named_parameters())
    for name, p in arbor.named_parameters():
        torch.testing.assert_close(p.grad, grads_b[name].grad, atol=1e-5, rtol=1e-4, msg=name)
