"""`generate()` the way users call it, on a fresh model and on a grown, uneven one.

Every decoding mode must give the same tokens whether the KV cache is used or
not (and whichever cache), and what ``generate`` reports as logits must be what
a plain forward pass over the generated text gives. A model whose layers differ
in FFN width and head counts is where a cache that assumes one shape for all
layers would go wrong, so each check runs on one.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaForCausalLM, StaticCache

from arbor import ArborConfig, ArborForCausalLM, compat
from arbor.model.attention import resolve_attn_implementation
from arbor.growth.export import to_llama_config

VOCAB = 64
PROMPT = 5
NEW = 8
ATOL = 1e-5


def _backends() -> list:
    params = [pytest.param("eager"), pytest.param("sdpa")]
    try:
        resolve_attn_implementation("flex")
    except ValueError as exc:
        params.append(pytest.param("flex", marks=pytest.mark.skip(reason=str(exc))))
    else:
        params.append(pytest.param("flex"))
    return params


def _randomise(model: ArborForCausalLM) -> None:
    # Weights far from the default init, so that a wrong key or value changes the chosen token.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)


def fresh(attn: str) -> ArborForCausalLM:
    torch.manual_seed(0)
    config = ArborConfig.from_preset("tiny", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = ArborForCausalLM._from_config(config, attn_implementation=attn)
    _randomise(model)
    return model.eval()


def grown(attn: str) -> ArborForCausalLM:
    model = fresh(attn)
    model.grow_depth(1, positions=[1])
    model.grow_width(96, layers=[0, 2])
    model.grow_heads(6, 3, layers=[1])
    model.grow_heads(8, layers=[2])
    model.grow_hidden(48)
    config = model.config
    assert config.layer_intermediate_sizes == [96, 48, 96]
    assert config.layer_num_attention_heads == [4, 6, 8]
    assert config.layer_num_key_value_heads == [2, 3, 2]
    # Exact growth leaves the new parts silent (zero outgoing weights); without new weights a
    # cache that mishandled the new heads would still give the fresh model's tokens.
    torch.manual_seed(1)
    _randomise(model)
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These matrices are too small to share between threads; on busy shared cores the idle
    # thread's spin-waiting made each generate() call several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=_backends())
def attn(request) -> str:
    return request.param


@pytest.fixture(scope="module", params=["fresh", "grown"])
def model(request, attn) -> ArborForCausalLM:
    return {"fresh": fresh, "grown": grown}[request.param](attn)


def prompts(batch: int = 2, length: int = PROMPT) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))


def generate(model, ids, **kwargs) -> torch.Tensor:
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, **kwargs}
    with torch.no_grad():
        return model.generate(ids, **kwargs)


# What each decoding mode asks of generate(), besides the cache; sampling reseeds before each run.
MODES = {
    "greedy": {},
    "sample": dict(do_sample=True, top_k=12, temperature=0.8),
    "beam": dict(num_beams=3, num_return_sequences=2),
}


def run(model, mode: str, **kwargs) -> torch.Tensor:
    torch.manual_seed(11)
    return generate(model, prompts(), **MODES[mode], **kwargs)


@pytest.fixture(scope="module")
def reference(model):
    """The tokens each mode gives with the default (dynamic) cache, computed once per model."""
    done: dict[str, torch.Tensor] = {}

    def get(mode: str) -> torch.Tensor:
        if mode not in done:
            with warnings.catch_warnings():
                # A cache passed under a deprecated name would warn: generate must speak the installed one.
                warnings.simplefilter("error", FutureWarning)
                done[mode] = run(model, mode)
        return done[mode]

    return get


# ---------------------------------------------------------------- decoding modes
@pytest.mark.parametrize("mode", list(MODES))
def test_cache_on_and_off_give_the_same_tokens(model, reference, mode):
    cached = reference(mode)
    rows = 2 * MODES[mode].get("num_return_sequences", 1)
    assert cached.shape == (rows, PROMPT + NEW) and int(cached.max()) < VOCAB
    assert torch.equal(cached, run(model, mode, use_cache=False))


def test_left_padded_rows_equal_each_row_alone(model):
    rows = [prompts(1, n)[0] for n in (7, 3, 5)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    batched = generate(model, ids, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = generate(model, r[None])
        assert torch.equal(batched[i, width:], alone[0, len(r):]), f"row {i}"
    for other in (dict(cache_implementation="static"), dict(use_cache=False)):
        assert torch.equal(generate(model, ids, attention_mask=mask, **other), batched), other


# ---------------------------------------------------------------- static cache
def test_static_cache_gives_the_dynamic_cache_tokens(model, reference):
    out = run(model, "greedy", cache_implementation="static", return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference("greedy"))
    # StaticCache allocates each layer when that layer first writes to it, so each layer's
    # tensors have its own kv-head count, not the config's single num_key_value_heads.
    cache = compat.output_cache(out)
    assert isinstance(cache, StaticCache)
    assert [layer.keys.shape[1] for layer in cache.layers] == model.config.layer_num_key_value_heads
    for mode in ("sample", "beam"):
        assert torch.equal(run(model, mode, cache_implementation="static"), reference(mode)), mode


def test_static_cache_with_chunked_prefill(model, reference):
    # Chunked prefill allocates the static cache before the first forward, from the shapes the
    # model reports, rather than from the first keys each layer writes.
    chunked = run(model, "greedy", cache_implementation="static", prefill_chunk_size=2)
    assert torch.equal(chunked, reference("greedy"))


# ---------------------------------------------------------------- scores and logits
def _full_logits(model, sequences: torch.Tensor) -> torch.Tensor:
    """The logits a plain forward pass gives at the positions that predicted each new token."""
    with torch.no_grad():
        return model(sequences).logits[:, PROMPT - 1 : -1]


def test_greedy_scores_and_logits_equal_the_full_forward(model):
    out = generate(model, prompts(), return_dict_in_generate=True, output_scores=True, output_logits=True)
    assert len(out.scores) == len(out.logits) == NEW
    full = _full_logits(model, out.sequences)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(torch.stack(out.scores, dim=1), full, atol=ATOL, rtol=ATOL)


def test_sampled_scores_are_the_processed_full_forward_logits(model):
    top_k, temperature = 12, 0.8
    torch.manual_seed(3)
    out = generate(model, prompts(), do_sample=True, top_k=top_k, temperature=temperature,
                   return_dict_in_generate=True, output_scores=True, output_logits=True)
    full = _full_logits(model, out.sequences)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, atol=ATOL, rtol=ATOL)
    # generate's processors: divide by the temperature, then keep the top_k (others -inf).
    expected = full / temperature
    kth = expected.topk(top_k, dim=-1).values[..., -1:]
    expected = expected.masked_fill(expected < kth, float("-inf"))
    torch.testing.assert_close(torch.stack(out.scores, dim=1), expected, atol=ATOL, rtol=ATOL)


# ---------------------------------------------------------------- against Llama
def test_beam_search_matches_llama_on_copied_weights(attn):
    arbor = fresh(attn)
    llama = LlamaForCausalLM._from_config(to_llama_config(arbor.config),
                                          attn_implementation=resolve_attn_implementation(attn)).eval()
    missing, unexpected = llama.load_state_dict(arbor.state_dict(), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    ids = prompts()
    args = dict(num_beams=3, num_return_sequences=2)
    expected = generate(llama, ids, **args)
    assert torch.equal(generate(arbor, ids, **args), expected)
    assert torch.equal(generate(arbor, ids, use_cache=False, **args), expected)


# ---------------------------------------------------------------- the cache keyword
def _decode_in_two_calls(model, ids: torch.Tensor, name: str) -> tuple[torch.Tensor, compat.Cache]:
    """Logits of a prefill and a continuation, the cache passed as ``name=`` to both calls."""
    cache = compat.DynamicCache(config=model.config)
    logits = []
    with torch.no_grad():
        for chunk in (ids[:, :PROMPT], ids[:, PROMPT:]):
            out = model(chunk, use_cache=True, **{name: cache})
            assert compat.output_cache(out) is cache
            logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


def test_cache_is_taken_under_either_name_and_read_back(model):
    ids = prompts(length=PROMPT + 3)
    with torch.no_grad():
        full = model(ids).logits
    new, new_cache = _decode_in_two_calls(model, ids, "cache")
    if compat.CACHE_KWARG == "cache":
        with pytest.warns(FutureWarning, match="past_key_values"):
            old, old_cache = _decode_in_two_calls(model, ids, "past_key_values")
    else:
        old, old_cache = _decode_in_two_calls(model, ids, "past_key_values")
    torch.testing.assert_close(new, full, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(old, new, atol=0, rtol=0)
    assert new_cache.get_seq_length() == old_cache.get_seq_length() == PROMPT + 3
    assert [layer.keys.shape[1] for layer in new_cache.layers] == model.config.layer_num_key_value_heads
    for a, b in zip(new_cache.layers, old_cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_giving_the_cache_under_both_names_is_an_error(model):
    ids = prompts()
    a, b = compat.DynamicCache(config=model.config), compat.DynamicCache(config=model.config)
    with pytest.raises(ValueError, match="past_key_values"):
        model(ids, cache=a, past_key_values=b, use_cache=True)
