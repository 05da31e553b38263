"""Attention backends give eager attention's logits, or refuse.

Every built-in backend that can run here goes through the same checks: the
same inputs again after inputs of other lengths and after a model of another
shape, with and without left padding, on a fresh and on a grown, uneven model,
and left-padded cached generation. A kernel compiled for the first shape it
sees and reused for the next passes a single call and fails these.

flex attention is refused on CPU (see `arbor.model.attention.flex_cpu_refusal`); the
refusal is checked here, and flex runs the parity checks where CUDA is.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface

import arbor_plugins
from arbor import ArborConfig, ArborForCausalLM
from arbor.model import attention
from arbor.plugins import get_registry
from arbor_plugins.testing import check_attention_backend

ATOL = 1e-5
#: Backends whose kernels run on CUDA tensors only (flex is refused on CPU).
CUDA_ONLY = {"flex", "flash-attn"}


def _backend_params() -> list:
    params = []
    for name, backend in attention.BUILTIN_BACKENDS.items():
        device = "cuda" if name in CUDA_ONLY else "cpu"
        ok, reason = backend.is_available()
        if name == "flash-attn":  # fp16/bf16 kernels: fp32 parity does not apply (test_model checks it in bf16)
            ok, reason = False, "flash-attn runs in fp16/bf16 only; test_model checks it against sdpa in bf16"
        elif ok and device == "cuda" and not torch.cuda.is_available():
            ok, reason = False, f"{name} runs on CUDA tensors; no CUDA device here"
        marks = () if ok else pytest.mark.skip(reason=reason)
        params.append(pytest.param(name, device, marks=marks, id=name))
    return params


BACKENDS = _backend_params()


def _randomised(model: ArborForCausalLM) -> ArborForCausalLM:
    # Weights far from the default init: logits of order several units, where a wrong kernel shows.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    return model.eval()


def fresh(**overrides) -> ArborForCausalLM:
    torch.manual_seed(0)
    return _randomised(ArborForCausalLM(ArborConfig.from_preset("tiny", max_position_embeddings=64, **overrides)))


def uneven() -> ArborForCausalLM:
    """Layers of different FFN widths and head counts (6 query heads: not a power of two)."""
    model = fresh()
    model.grow_depth(1, positions=[1])
    model.grow_width(192, layers=[0, 2])
    model.grow_heads(6, 3, layers=[1])
    model.grow_heads(8, layers=[2])
    torch.manual_seed(1)
    return _randomised(model)


def pair(model: ArborForCausalLM, name: str, device: str) -> tuple[ArborForCausalLM, ArborForCausalLM]:
    """(eager reference, the same weights on backend ``name``), both on ``device``."""
    ref = copy.deepcopy(model).to(device)
    ref.set_attn_implementation("eager")
    other = copy.deepcopy(model).to(device)
    other.set_attn_implementation(name)
    return ref, other


def padded(vocab: int, batch: int, length: int, pads: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids, mask


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    bound = ATOL * max(1.0, float(want.abs().max()))
    diff = float((got - want).abs().max())
    assert diff <= bound, f"{what}: logits differ from eager attention by {diff:.3g} (> {bound:.3g})"


def logits(model: ArborForCausalLM, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(ids.to(device), attention_mask=None if mask is None else mask.to(device)).logits.cpu()
    return out if mask is None else out[mask.bool()]  # padded positions compute nothing anyone reads


# ------------------------------------------------------------------ parity
@pytest.mark.parametrize(("name", "device"), BACKENDS)
def test_repeated_calls_of_other_shapes_match_eager(name, device):
    # head_dim 8 and 16 at the same input length: the case where a kernel compiled for one
    # model and reused for another goes wrong (flex on CPU did).
    models = {"fresh": pair(fresh(), name, device), "uneven": pair(uneven(), name, device),
              "head_dim 8": pair(fresh(head_dim=8), name, device)}
    vocab = 512
    first = padded(vocab, 2, 8, [0, 3], seed=1)
    calls = [
        ("fresh", first),
        ("fresh", first),
        ("fresh", (first[0], None)),
        ("fresh", padded(vocab, 3, 7, [2, 0, 1], seed=2)),
        ("fresh", first),
        ("head_dim 8", first),
        ("uneven", padded(vocab, 2, 9, [0, 4], seed=3)),
        ("uneven", (first[0], None)),
        ("fresh", first),
        ("fresh", padded(vocab, 1, 1, [0], seed=4)),
        ("head_dim 8", (first[0], None)),
        ("fresh", first),
    ]
    for i, (which, (ids, mask)) in enumerate(calls, 1):
        ref, model = models[which]
        padding = "left-padded" if mask is not None else "no mask"
        what = f"{name}, call {i}: {which} model, shape {tuple(ids.shape)}, {padding}"
        assert_logits_close(logits(model, ids, mask), logits(ref, ids, mask), what)


@pytest.mark.parametrize("build", [fresh, uneven], ids=["fresh", "uneven"])
@pytest.mark.parametrize(("name", "device"), BACKENDS)
def test_left_padded_cached_generation_matches_eager(name, device, build):
    ref, model = pair(build(), name, device)
    ids, mask = padded(512, 3, 8, [0, 3, 5], seed=5)
    args = dict(attention_mask=mask.to(device), max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0,
                output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = ref.generate(ids.to(device), **args)
        got = model.generate(ids.to(device), **args)
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.scores, want.scores)):
        assert_logits_close(a.cpu(), b.cpu(), f"{name}, generation step {step}")


@pytest.mark.parametrize(("name", "device"), [p for p in BACKENDS if p.values[1] == "cpu"])
def test_builtin_backend_passes_the_conformance_kit(name, device):
    report = check_attention_backend(name)
    assert len(report.passed) == 2 and not report.notes, report


# ------------------------------------------------------------------ flex refuses CPU
REFUSAL = (r"flex attention is refused on CPU: torch .*'s CPU flex kernels give wrong logits.*"
           r"use sdpa \(or eager\), or flex on CUDA")


def test_flex_is_unavailable_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, reason = attention.FlexAttention().is_available()
    assert not ok
    assert "flex attention is refused on CPU" in reason and torch.__version__ in reason
    assert "wrong logits" in reason and "use sdpa (or eager), or flex on CUDA" in reason


def test_choosing_flex_without_cuda_fails_with_the_reason_and_the_alternatives(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"attn_implementation='flex' \(attention backend 'flex'\) is not available "
                                         r"here: " + REFUSAL + r"; available backends: eager, sdpa"):
        ArborForCausalLM._from_config(ArborConfig.from_preset("tiny"), attn_implementation="flex")
    model = fresh()
    with pytest.raises(ValueError, match=REFUSAL):
        model.set_attn_implementation("flex_attention")
    assert model.config._attn_implementation != "flex_attention"


def test_flex_on_cpu_tensors_is_refused_where_cuda_exists(monkeypatch):
    # On a CUDA machine flex can be chosen (the model is usually moved there next); a forward
    # pass on CPU tensors is refused all the same.
    model = fresh()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention.FlexAttention().is_available() == (True, "")
    model.set_attn_implementation("flex")
    monkeypatch.undo()
    assert model.config._attn_implementation == "flex_attention"
    ids = torch.randint(1, 512, (2, 6))
    with pytest.raises(RuntimeError, match=REFUSAL):
        model(ids)
    with pytest.raises(RuntimeError, match=REFUSAL):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_the_device_check_refuses_flex_on_cpu_only():
    with pytest.raises(RuntimeError, match=REFUSAL):
        attention.check_attention_device("flex_attention", torch.device("cpu"))
    attention.check_attention_device("flex_attention", torch.device("cuda", 0))
    attention.check_attention_device("flex_attention", torch.device("meta"))
    for implementation in ("eager", "sdpa", "flash_attention_2", None):
        attention.check_attention_device(implementation, torch.device("cpu"))


def test_the_kit_notes_the_refusal_without_running_flex(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = check_attention_backend("flex")
    assert not report.passed and "flex attention is refused on CPU" in report.notes[0]


# ------------------------------------------------------------------ the kit catches broken kernels
def _sdpa(module, query, key, value, attention_mask, **kwargs):
    return AttentionInterface()["sdpa"](module, query, key, value, attention_mask, **kwargs)


class FirstShapeAttention:
    """Like a kernel compiled once for the first shape it saw: later calls get the first call's scaling."""

    def __init__(self):
        self.scaling = None

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        if self.scaling is None:
            self.scaling = scaling
        return _sdpa(module, query, key, value, attention_mask, scaling=self.scaling, **kwargs)


class DriftingAttention:
    """Right on the first forward pass; every later pass drifts a little further."""

    def __init__(self):
        self.passes = 0

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == 0:
            self.passes += 1
        out, weights = _sdpa(module, query, key, value, attention_mask, **kwargs)
        return out * (1.0 + 0.05 * (self.passes - 1)), weights


def _register_backend(key: str, kernel) -> arbor_plugins.AttentionBackend:
    """A backend running ``kernel`` under transformers key ``key``, registered in arbor as ``key``."""
    AttentionInterface.register(key, kernel)
    AttentionMaskInterface.register(key, AttentionMaskInterface()["sdpa"])  # the padding mask sdpa gets

    class Backend(arbor_plugins.AttentionBackend):
        implementation = key

    backend = Backend()
    get_registry().register("attention_backend", key, backend)
    return backend


@pytest.mark.parametrize(
    ("kernel", "failure"),
    [
        (DriftingAttention, r"call 2 \(the first input again, shape \(2, 8\), left-padded\): logits differ from eager"),
        (FirstShapeAttention, r"call 5 \(a model of another shape, shape \(2, 8\), left-padded\): logits differ from "
                              r"eager"),
    ],
    ids=["drifts-on-repeats", "keeps-the-first-shape"],
)
def test_kit_fails_a_backend_whose_answer_depends_on_earlier_calls(fresh_plugins, kernel, failure):
    key = f"test_{kernel.__name__.lower()}"
    backend = _register_backend(key, kernel())
    with pytest.raises(AssertionError, match=rf"attention_backend '{key}': " + failure):
        check_attention_backend(backend)


def test_kit_passes_a_correct_wrapper_of_sdpa(fresh_plugins):
    backend = _register_backend("test_plain_sdpa", _sdpa)
    report = check_attention_backend(backend)
    assert len(report.passed) == 2, report
