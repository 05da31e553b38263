"""Checks of the model components: substrates, attention backends, RoPE scalings."""

from __future__ import annotations

import copy
import json
import tempfile
from typing import Any

from arbor_plugins.testing._common import (
    Report,
    TINY_CONFIGS,
    _Check,
    _diff,
    _inputs,
    _logits,
    _resolve,
    _save_load,
    _seeded,
    _settings,
    _train_steps,
    tiny_model,
)


# ---------------------------------------------------------------- substrates
def check_substrate(substrate: Any, settings: dict[str, Any] | None = None, export: bool = True) -> Report:
    """Build, shape, ``.weight``, frozen-ness, export and save/load of a substrate (untied head)."""
    import torch

    from arbor import ArborConfig

    name, substrate, registered = _resolve("substrate", substrate)
    check = _Check("substrate", name)
    parsed = _settings(substrate, settings, check)
    raw = settings if settings is not None else getattr(substrate, "example_settings", None) or {}
    fields = dict(TINY_CONFIGS["mha-untied"], max_position_embeddings=64)
    config = ArborConfig(**fields, **({"substrate": name, "substrate_settings": raw} if registered else {}))
    modules = []
    for _ in range(2):
        with _seeded(0), check.calling("build(config, settings)"):
            modules.append(substrate.build(config, parsed))
    a, b = modules
    ids, mask = _inputs(config.vocab_size)
    sa, sb = a.state_dict(), b.state_dict()
    check(sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa),
          "two builds from the same config, settings and seed differ")
    with torch.no_grad(), check.calling("the built module's forward"):
        out, out_b = a(ids), b(ids)
    want = (*ids.shape, config.hidden_size)
    check(tuple(out.shape) == want, f"output shape {tuple(out.shape)} for input {tuple(ids.shape)}: expected {want}")
    check(out.is_floating_point() and bool(torch.isfinite(out).all()), f"output must be finite floats, got {out.dtype}")
    check(torch.equal(out, out_b), "two equal builds give different outputs")
    weight = getattr(a, "weight", None)
    check(torch.is_tensor(weight), f"module {type(a).__name__} has no .weight tensor (the (vocab, hidden) matrix)")
    shape = (config.vocab_size, config.hidden_size)
    check(tuple(weight.shape) == shape, f".weight has shape {tuple(weight.shape)}: expected (vocab, hidden) = {shape}")
    frozen = getattr(substrate, "frozen", False)
    trainable = [n for n, p in a.named_parameters() if p.requires_grad]
    if frozen:
        check(not trainable, f"declared frozen but has trainable parameters: {trainable}")
    elif not trainable:
        check.note("declared trainable (frozen = False) but has no trainable parameter")
    check.passed("deterministic build, (batch, seq, hidden) output, (vocab, hidden) .weight")

    if registered:
        with check.calling("building a model with it"):
            model = tiny_model(config.to_dict())
    else:  # not registered: a config cannot name it, so put its module in place by hand
        model = tiny_model(fields)
        with _seeded(0):
            model.model.embed_tokens = substrate.build(config, parsed)
    embed = model.model.embed_tokens
    held = {k: v.clone() for k, v in embed.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in embed.named_parameters()}
    opt.step()
    _train_steps(model, opt, ids, steps=2)
    if frozen:
        check(all(g is None for g in grads.values()), f"declared frozen but got gradients: {sorted(grads)}")
        moved = [k for k, v in embed.state_dict().items() if not torch.equal(v, held[k])]
        check(not moved, f"declared frozen but moved over 3 AdamW steps (weight decay 0.1): {moved}")
        check.passed("frozen: no gradient, no movement under AdamW")
    elif trainable and all(grads.get(n) is None for n in trainable):
        check.note("trainable parameters got no gradient from the language-model loss")
    if export:
        from arbor.growth.export import ExportError, to_llama

        with tempfile.TemporaryDirectory() as tmp:
            try:
                report = to_llama(model, f"{tmp}/llama")
            except ExportError as exc:
                raise AssertionError(f"substrate {name!r}: export to Llama fails: {exc}") from None
        check.passed(f"exports to LlamaForCausalLM (max logit difference {report.max_abs_diff:.3g})")
    if registered:
        _save_load(check, model, ids, mask, "a model with this substrate")
        check.passed("save_pretrained -> from_pretrained keeps the logits")
    else:
        check.note("not registered: save/load not checked (from_pretrained finds substrates by name)")
    # Hidden-size growth: an nn.Embedding is widened by the operator, anything else by its grow_hidden(d).
    if isinstance(embed, torch.nn.Embedding) or callable(getattr(embed, "grow_hidden", None)):
        before = _logits(model, ids, mask)
        with check.calling("hidden-size growth"):
            model.grow_hidden(config.hidden_size + 8)
        diff, bound = _diff(before, _logits(model, ids, mask))
        check(diff <= bound, f"hidden-size growth changed the logits by {diff:.3g} (> {bound:.3g})")
        got, want = tuple(model.model.embed_tokens.weight.shape), (config.vocab_size, config.hidden_size + 8)
        check(got == want, f"after hidden-size growth .weight has shape {got}: expected {want}")
        if registered:
            _save_load(check, model, ids, mask, "after hidden-size growth")
        check.passed("hidden-size growth is exact" + (" and saves" if registered else ""))
    else:
        check.note("no grow_hidden(d): models with this substrate cannot grow their hidden size")
    return check.report


# -------------------------------------------------------- attention backends
def _padded_inputs(vocab: int, batch: int, length: int, pad: int, seed: int):
    """``batch`` rows of ``length`` tokens, the last row left-padded by ``pad``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, :pad] = 0
    return ids, mask


def _device_logits(model, ids, mask):
    """`_logits` on the model's device, returned on the CPU."""
    device = model.device
    return _logits(model, ids.to(device), mask.to(device)).cpu()


def _generated_scores(model, ids, mask):
    """Greedy, cached, left-padded generation: the tokens and each step's logits, on the CPU."""
    import torch

    model.eval()
    with torch.no_grad():
        out = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=4,
                             do_sample=False, use_cache=True, pad_token_id=0, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences.cpu(), torch.stack(out.scores).cpu()


def check_attention_backend(backend: Any, settings: dict[str, Any] | None = None) -> Report:
    """``is_available()`` answers (bool, reason); when available, the kernel matches eager attention
    (on CUDA where there is one) on left-padded inputs, on the same input again after inputs of
    another length and after a model of another head_dim, and in left-padded cached generation."""
    import torch

    name, backend, registered = _resolve("attention_backend", backend)
    check = _Check("attention_backend", name)
    _settings(backend, settings, check)
    with check.calling("is_available()"):
        answer = backend.is_available()
    check(isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], bool) and isinstance(answer[1], str),
          f"is_available() returned {answer!r}: must be (bool, reason)")
    if not answer[0]:
        check(answer[1].strip(), "is_available() says no without a reason for the user")
        check.note(f"not available here ({answer[1]}): kernel not run")
        return check.report
    impl = name if registered else getattr(backend, "implementation", None)
    check(isinstance(impl, str) and impl, f"implementation={impl!r} must name a transformers attention key")

    # Where CUDA is, the kernels run there: some backends (flex) refuse CPU tensors.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = {}
    for config in ("gqa-tied", "mha-untied"):
        ref, model = tiny_model(config).to(device), tiny_model(config).to(device)
        ref.set_attn_implementation("eager")
        with check.calling(f"set_attn_implementation({impl!r})"):
            model.set_attn_implementation(impl)
        models[config] = ref, model
    vocab = {config: ref.config.vocab_size for config, (ref, _) in models.items()}
    # The first input comes back after an input of another length and after a model of another
    # head_dim: a kernel compiled for one shape and reused for the next, or one that keeps state
    # between calls, passes a single call and fails a repeat.
    first = ("gqa-tied", *_padded_inputs(vocab["gqa-tied"], 2, 8, 2, seed=1))
    calls = [
        ("the first input", first),
        ("the first input again", first),
        ("a second input of another length", ("gqa-tied", *_padded_inputs(vocab["gqa-tied"], 3, 5, 1, seed=2))),
        ("the first input after the second", first),
        ("a model of another shape", ("mha-untied", *_padded_inputs(vocab["mha-untied"], 2, 8, 3, seed=3))),
        ("the first input after the other model", first),
    ]
    # Kernels sum in different orders: allow fp32 rounding, not the exactness bound.
    worst = 0.0
    for i, (what, (config, ids, mask)) in enumerate(calls, 1):
        ref, model = models[config]
        where = f"call {i} ({what}, shape {tuple(ids.shape)}, left-padded)"
        with check.calling(where):
            logits = _device_logits(model, ids, mask)
        diff, bound = _diff(_device_logits(ref, ids, mask), logits)
        check(diff <= 100 * bound, f"{where}: logits differ from eager attention by {diff:.3g} (> {100 * bound:.3g})")
        worst = max(worst, diff)
    check.passed(f"{len(calls)} calls of 3 shapes, left-padded, repeated: logits within {worst:.3g} of eager")

    ref, model = models["gqa-tied"]
    ids, mask = first[1:]
    with check.calling("left-padded generate(use_cache=True)"):
        tokens, scores = _generated_scores(model, ids, mask)
    want_tokens, want_scores = _generated_scores(ref, ids, mask)
    what = "left-padded cached greedy generation"
    check(scores.shape == want_scores.shape, f"{what} gives {tokens.tolist()}, eager attention {want_tokens.tolist()}")
    diff, bound = _diff(want_scores, scores)
    check(diff <= 100 * bound, f"{what}: step logits differ from eager attention by {diff:.3g} (> {100 * bound:.3g}); "
                               f"tokens {tokens.tolist()}, eager attention {want_tokens.tolist()}")
    check.passed(f"left-padded cached generation: step logits within {diff:.3g} of eager")
    return check.report


# -------------------------------------------------------------- rope scaling
def check_rope_scaling(scaling: Any, settings: dict[str, Any] | None = None) -> Report:
    """``apply`` returns a new valid RoPE dict, leaves its input alone, and a model runs with it."""
    from arbor import ArborConfig

    name, scaling, _ = _resolve("rope_scaling", scaling)
    check = _Check("rope_scaling", name)
    parsed = _settings(scaling, settings, check)
    given = {"rope_type": "default", "rope_theta": 10_000.0}
    kept = copy.deepcopy(given)
    with check.calling("apply(rope_parameters, settings)"):
        result = scaling.apply(given, parsed)
    check(given == kept, f"apply() changed its input: {kept} -> {given}")
    check(isinstance(result, dict) and "rope_type" in result,
          f"apply() returned {result!r}: must be a dict with rope_type")
    check(result == scaling.apply(copy.deepcopy(kept), parsed), "apply() is not deterministic")
    try:
        json.dumps(result)
        config = ArborConfig(**TINY_CONFIGS["gqa-tied"], max_position_embeddings=64, rope_parameters=result)
    except Exception as exc:
        raise AssertionError(f"rope_scaling {name!r}: {result!r} is not a valid rope_parameters dict: {exc}") from None
    ids, mask = _inputs(config.vocab_size)
    with check.calling(f"a model with rope_parameters={result}"):
        logits = _logits(tiny_model(config.to_dict()), ids, mask)
    check(bool(logits.isfinite().all()), f"a model with rope_parameters={result} gives non-finite logits")
    check.passed(f"valid rope_parameters {result}")
    return check.report
