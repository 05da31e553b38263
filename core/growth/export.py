"""Conversion to plain transformers Llama.

`to_llama_config` describes an arbor model as a `LlamaConfig`; every
parameter name already matches, so a uniform model's state dict loads into
`LlamaForCausalLM` unchanged.

`to_llama` writes a checkpoint that ``LlamaForCausalLM.from_pretrained``
loads without arbor installed. Llama has one FFN width and one head layout
for every layer, so a grown, uneven model is padded up to the largest layer
with units and heads that compute nothing (zero weights on every path into the
residual stream): the export is exact, and it proves it by reloading what it
wrote and comparing logits before the directory appears under its name.

Its length is that of one conversion: the padding plan, the tensors, the
reload check and the atomic write, which only make sense together.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, LlamaConfig

from arbor.growth.lora import effective_weight
from arbor.model.checkpoint import (
    TOKENIZER_FILES,
    UnsafeOutputError,
    check_output_directory,
    is_written_file,
    replace_directory,
    sibling_directory,
)
from arbor.model.config import ArborConfig, generation_config_to_save
from arbor_plugins.components import embedding_matrix

#: Weight dtypes an export may be saved in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """The model cannot be exported as asked, or the written checkpoint failed its check."""


def to_llama_config(
    config: ArborConfig,
    *,
    intermediate_size: int | None = None,
    num_attention_heads: int | None = None,
    num_key_value_heads: int | None = None,
    **overrides,
) -> LlamaConfig:
    """The `LlamaConfig` of the same architecture.

    Llama has one size per model; a per-layer size that differs between
    layers must be given (the uniform size the layers are padded to, at least
    the largest layer's), otherwise the config must be uniform in it.
    """
    per_layer = {
        "intermediate_size": (config.layer_intermediate_sizes, intermediate_size),
        "num_attention_heads": (config.layer_num_attention_heads, num_attention_heads),
        "num_key_value_heads": (config.layer_num_key_value_heads, num_key_value_heads),
    }
    sizes = {}
    for name, (values, given) in per_layer.items():
        if given is None and len(set(values)) > 1:
            raise ValueError(
                "to_llama_config needs equal FFN widths and head counts in every layer (or the padded "
                f"sizes given); got layer_intermediate_sizes={config.layer_intermediate_sizes}, "
                f"layer_num_attention_heads={config.layer_num_attention_heads}, "
                f"layer_num_key_value_heads={config.layer_num_key_value_heads}; arbor.growth.export.to_llama pads them"
            )
        if given is not None and given < max(values, default=0):
            raise ValueError(f"{name}={given} is invalid: must be >= the largest layer's {max(values)}")
        # No layers: no layer's size to copy, so Llama gets the size arbor's next layer would have.
        sizes[name] = given if given is not None else values[0] if values else getattr(config, name)
    kwargs = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        **sizes,
        num_hidden_layers=config.num_hidden_layers,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps,
        use_cache=config.use_cache,
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=dict(config.rope_parameters),
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=config.attention_dropout,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


# ------------------------------------------------------------------ padding
def uniform_heads(config: ArborConfig) -> tuple[int, int]:
    """The (query heads, kv heads) every layer is padded to.

    Each layer's kv heads and group size must fit: KV >= max kv heads and
    G = Q / KV >= max group. The smallest such layout is KV = max kv,
    G = max group, but `LlamaConfig` also insists that the head count divide
    hidden_size (even though head_dim is explicit), so when that fails the
    smallest larger layout that divides it is taken.
    """
    hidden = config.hidden_size
    # A model without layers pads nothing: the heads its next layer would get stand in.
    qs = config.layer_num_attention_heads or [config.num_attention_heads]
    kvs = config.layer_num_key_value_heads or [config.num_key_value_heads]
    kv_min = max(kvs)
    g_min = max(q // kv for q, kv in zip(qs, kvs))
    for q in range(kv_min * g_min, hidden + 1):
        if hidden % q:
            continue
        for kv in range(kv_min, q // g_min + 1):
            if q % kv == 0:
                return q, kv
    raise ExportError(
        f"num_attention_heads cannot be represented in Llama: LlamaConfig needs hidden_size={hidden} to be "
        f"divisible by num_attention_heads, and the layers need at least {kv_min} kv heads x {g_min} query "
        f"heads per kv head = {kv_min * g_min} heads; allowed: a head count that divides {hidden}"
    )


def _pad_rows(weight: torch.Tensor, rows: int, index=None) -> torch.Tensor:
    """``weight`` with zero rows added up to ``rows``; old rows at ``index`` (default: first)."""
    if weight.shape[0] == rows and index is None:
        return weight
    out = weight.new_zeros((rows, *weight.shape[1:]))
    out[slice(0, weight.shape[0]) if index is None else index] = weight
    return out


def _head_rows(q_old: int, kv_old: int, groups: int, head_dim: int) -> torch.Tensor:
    """Rows of the padded q_proj (columns of o_proj) that the old query heads move to.

    Query head h reads kv head h // g. In the padded layout (``groups`` per kv
    head) it keeps its kv head and its rank in the group, as `add_heads` does.
    """
    g_old = q_old // kv_old
    heads = torch.arange(q_old)
    slots = (heads // g_old) * groups + heads % g_old
    return (slots[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def llama_state_dict(model, intermediate_size: int, num_heads: int, num_kv_heads: int,
                     tied: bool) -> dict[str, torch.Tensor]:
    """The Llama tensors of ``model``, padded to uniform sizes, on the CPU, float32.

    Built tensor by tensor: a tensor that needs no padding is the model's own
    (no copy when the model is float32 on the CPU). Nothing in ``model`` is changed.
    """
    hd = model.config.head_dim

    def t(x) -> torch.Tensor:
        if isinstance(x, nn.Module):  # a projection, maybe wrapped by LoRA: its effective weight
            x = effective_weight(x)
        return x.detach().to(device="cpu", dtype=torch.float32)

    sd = {"model.embed_tokens.weight": t(embedding_matrix(model.model.embed_tokens))}
    groups = num_heads // num_kv_heads
    for i, layer in enumerate(model.model.layers):
        p, attn, mlp = f"model.layers.{i}.", layer.self_attn, layer.mlp
        q_old, kv_old = attn.num_heads, attn.num_key_value_heads
        rows = None if (q_old, kv_old) == (num_heads, num_kv_heads) else _head_rows(q_old, kv_old, groups, hd)
        sd[p + "self_attn.q_proj.weight"] = _pad_rows(t(attn.q_proj), num_heads * hd, rows)
        sd[p + "self_attn.k_proj.weight"] = _pad_rows(t(attn.k_proj), num_kv_heads * hd)
        sd[p + "self_attn.v_proj.weight"] = _pad_rows(t(attn.v_proj), num_kv_heads * hd)
        sd[p + "self_attn.o_proj.weight"] = _pad_rows(t(attn.o_proj).T, num_heads * hd, rows).T
        sd[p + "mlp.gate_proj.weight"] = _pad_rows(t(mlp.gate_proj), intermediate_size)
        sd[p + "mlp.up_proj.weight"] = _pad_rows(t(mlp.up_proj), intermediate_size)
        sd[p + "mlp.down_proj.weight"] = _pad_rows(t(mlp.down_proj).T, intermediate_size).T
        sd[p + "input_layernorm.weight"] = t(layer.input_layernorm.weight)
        sd[p + "post_attention_layernorm.weight"] = t(layer.post_attention_layernorm.weight)
    sd["model.norm.weight"] = t(model.model.norm.weight)
    if not tied:  # a tied head is the embedding; Llama's checkpoints leave it out
        sd["lm_head.weight"] = t(model.lm_head.weight)
    return {k: v.contiguous() for k, v in sd.items()}


def _padding_parameters(config: ArborConfig, ffn: int, heads: int, kv_heads: int) -> int:
    """How many zero parameters padding every layer to these sizes adds."""
    h, hd = config.hidden_size, config.head_dim
    return sum(
        3 * h * (ffn - w) + 2 * h * hd * ((heads - q) + (kv_heads - kv))
        for w, q, kv in zip(config.layer_intermediate_sizes, config.layer_num_attention_heads,
                            config.layer_num_key_value_heads)
    )


# ------------------------------------------------------------------- report
@dataclass
class ExportReport:
    """What `to_llama` wrote and how it checked it."""

    out_dir: Path
    #: Largest |arbor logit - reloaded Llama logit| over the probe's unmasked positions (float32).
    max_abs_diff: float
    atol: float
    #: max(1, largest |logit| of the probe): the check is ``max_abs_diff <= atol * logit_scale``.
    logit_scale: float
    #: Field -> (per-layer sizes before, uniform size after), only for fields that were padded.
    padded: dict[str, tuple[list[int], int]]
    num_parameters: int
    #: Zero parameters the padding added.
    padding_parameters: int
    tied: bool
    #: Dtype of the saved weights; verification always ran in float32 before any cast.
    dtype: str
    verified_dtype: str = "float32"
    #: After a cast: largest logit difference of the saved (cast) weights, upcast, against the
    #: float32 model. Rounding, reported, not checked.
    cast_max_abs_diff: float | None = None
    attn_implementation: str = "eager"
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """A short human summary, one fact a line."""
        pads = "; ".join(f"{k} {before} -> {after}" for k, (before, after) in self.padded.items())
        out = [
            f"wrote {self.out_dir} (LlamaForCausalLM, {self.num_parameters:,} parameters, {self.dtype}"
            f"{', tied embeddings' if self.tied else ''})",
            f"padded: {pads} ({self.padding_parameters:,} zero parameters)" if pads else "padded: nothing",
            f"verified: max abs logit difference {self.max_abs_diff:.3g} <= atol {self.atol:g} x logit scale "
            f"{self.logit_scale:.3g} ({self.verified_dtype}, {self.attn_implementation})",
        ]
        if self.cast_max_abs_diff is not None:
            out.append(f"saved as {self.dtype}: max abs logit difference after the cast {self.cast_max_abs_diff:.3g}")
        return out + self.notes


# ------------------------------------------------------------------- export
def default_probe(vocab_size: int, max_positions: int, pad_token_id: int | None):
    """A fixed small batch: random ids, one row left-padded (mask 0 on the padding)."""
    gen = torch.Generator().manual_seed(0)
    length = min(12, max_positions)
    ids = torch.randint(0, vocab_size, (3, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, : length // 2] = 0
    ids[1, : length // 2] = pad_token_id if pad_token_id is not None and pad_token_id < vocab_size else 0
    return ids, mask


def _probe(config: ArborConfig, input_ids, attention_mask):
    if input_ids is None:
        return default_probe(config.vocab_size, config.max_position_embeddings, config.pad_token_id)
    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.numel() == 0 or ids.is_floating_point():
        raise ExportError(f"probe_input_ids of shape {tuple(ids.shape)} is invalid: must be integer ids (batch, seq)")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise ExportError(
            f"probe_input_ids holds ids in [{ids.min().item()}, {ids.max().item()}]; "
            f"allowed: 0 to vocab_size-1={config.vocab_size - 1}"
        )
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
    if mask.shape != ids.shape or not mask.bool().any():
        raise ExportError(
            f"probe_attention_mask of shape {tuple(mask.shape)} is invalid: must have the shape of "
            f"probe_input_ids {tuple(ids.shape)} and at least one 1"
        )
    return ids.long(), mask.long()


def _logits(model, ids, mask) -> torch.Tensor:
    """float32 logits at the unmasked positions, computed in eval mode; training flags restored."""
    modes = [(m, m.training) for m in model.modules()]
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    finally:
        for m, training in modes:
            m.training = training
    return out.float().cpu()[mask.bool()]


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _check_target(out: Path, overwrite: bool) -> None:
    """The shared rule (`arbor.model.checkpoint.check_output_directory`): never a file or a run
    directory, and an overwrite replaces only a directory of files arbor writes."""
    try:
        check_output_directory(out, overwrite=overwrite, label=f"out_dir {os.fspath(out)}")
    except UnsafeOutputError as exc:
        raise ExportError(str(exc)) from None


def _save(sd: dict[str, torch.Tensor], llama_config: LlamaConfig, generation: GenerationConfig | None,
          directory: Path, dtype: torch.dtype) -> None:
    from huggingface_hub import save_torch_state_dict

    for old in [*directory.glob("*.safetensors"), *directory.glob("*.safetensors.index.json")]:
        old.unlink()
    save_torch_state_dict({k: v.to(dtype) for k, v in sd.items()}, directory)
    llama_config.dtype = dtype
    llama_config.save_pretrained(directory)
    if generation is not None:
        generation.save_pretrained(directory)


def _reload(directory: Path, device):
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    # transformers' loading bar goes to stderr; the export reports its own phases.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        llama, info = LlamaForCausalLM.from_pretrained(
            directory, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ExportError(f"the written checkpoint does not load cleanly into LlamaForCausalLM: {problems}")
    return llama.to(device)


def to_llama(
    model,
    out_dir: str | os.PathLike,
    *,
    probe_input_ids=None,
    probe_attention_mask=None,
    atol: float = 1e-5,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, str | os.PathLike] | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Write ``model`` (an `ArborForCausalLM`) as a plain `LlamaForCausalLM` checkpoint in ``out_dir``.

    Uneven layers are padded with zero FFN units and zero heads, which changes
    no output; the substrate is written as an ordinary embedding matrix. The
    checkpoint is written into a temporary sibling directory, reloaded with
    ``LlamaForCausalLM.from_pretrained`` and run on a probe batch (default: a
    fixed random batch with a left-padded row) next to ``model``; only if the
    float32 logits agree within ``atol`` is it cast to ``dtype`` (default: the
    model's dtype) and renamed to ``out_dir``. Otherwise `ExportError`, and
    ``out_dir`` is left as it was. ``model`` is not changed and no growth hook
    fires; a model that is not float32 is checked through a float32 copy.

    ``out_dir`` may be new or empty; with ``overwrite`` it may also hold an earlier checkpoint or
    export, but nothing arbor does not write there (config, weights, tokenizer files: see
    `arbor.model.checkpoint.check_output_directory`) and no training run; otherwise `ExportError`
    naming the file. ``extra_files`` (name in ``out_dir`` -> source file, e.g. the tokenizer's, whose
    names must be among those) are copied in before the directory gets its name.
    """
    say = progress or (lambda message: None)
    config = getattr(model, "config", None)
    if not isinstance(config, ArborConfig):
        raise ExportError(
            f"model of type {type(model).__name__} is not an arbor model (config: {type(config).__name__})"
        )
    model_dtype = next(model.parameters()).dtype
    if dtype is None:
        dtype = model_dtype if model_dtype in DTYPES.values() else torch.float32
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ExportError(f"dtype={dtype!r} is invalid: must be one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ExportError(f"dtype={dtype} is invalid: must be one of {', '.join(f'torch.{d}' for d in DTYPES)}")
    if not atol >= 0:
        raise ExportError(f"atol={atol!r} is invalid: must be a number >= 0")
    out = Path(out_dir).absolute()
    if out.is_symlink():  # replace the directory it points to, not the link
        out = Path(os.path.realpath(out))
    _check_target(out, overwrite)
    extra = {name: Path(source) for name, source in (extra_files or {}).items()}
    unknown = [name for name in extra if name != Path(name).name or not is_written_file(Path(name))]
    if unknown:
        raise ExportError(f"extra_files names {unknown[0]!r}; allowed: plain names of files arbor writes into a "
                          f"checkpoint ({', '.join(TOKENIZER_FILES)})")
    ids, mask = _probe(config, probe_input_ids, probe_attention_mask)

    # --- sizes every layer is padded to
    ffn = max(config.layer_intermediate_sizes, default=config.intermediate_size)
    heads, kv_heads = uniform_heads(config)
    padded = {}
    for name, values, target in (("intermediate_size", config.layer_intermediate_sizes, ffn),
                                 ("num_attention_heads", config.layer_num_attention_heads, heads),
                                 ("num_key_value_heads", config.layer_num_key_value_heads, kv_heads)):
        if any(v != target for v in values):
            padded[name] = (list(values), target)
    # Hooks (arbor_rope_config) may have changed the RoPE tables the model actually runs with.
    rope = getattr(getattr(model.model.rotary_emb, "config", None), "rope_parameters", None) or config.rope_parameters
    embed = embedding_matrix(model.model.embed_tokens)
    tied = bool(config.tie_word_embeddings) and (
        model.lm_head.weight is embed or torch.equal(model.lm_head.weight, embed)
    )
    notes = []
    if config.tie_word_embeddings and not tied:
        notes.append("note: the config says tied embeddings but the head differs from the embedding; exported untied")
    if config.substrate != "learned":
        notes.append(f"note: substrate {config.substrate!r} written as an ordinary (trainable) embedding matrix")
    try:
        llama_config = to_llama_config(config, intermediate_size=ffn, num_attention_heads=heads,
                                       num_key_value_heads=kv_heads, rope_parameters=dict(rope),
                                       tie_word_embeddings=tied)
    except ValueError as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise ExportError(f"the model cannot be described as a LlamaConfig: {reason}") from None
    llama_config.architectures = ["LlamaForCausalLM"]
    generation = generation_config_to_save(copy.deepcopy(getattr(model, "generation_config", None)), config)

    say(f"padding to intermediate_size={ffn}, num_attention_heads={heads}, num_key_value_heads={kv_heads}")
    sd = llama_state_dict(model, ffn, heads, kv_heads, tied)
    num_parameters = sum(v.numel() for v in sd.values())
    reference = model if model_dtype == torch.float32 else copy.deepcopy(model).float()

    tmp = sibling_directory(out, "export")
    try:
        say(f"writing float32 weights to {tmp}")
        _save(sd, llama_config, generation, tmp, torch.float32)
        say("reloading with LlamaForCausalLM.from_pretrained and comparing logits")
        device = next(reference.parameters()).device
        expected = _logits(reference, ids, mask)
        llama = _reload(tmp, device)
        max_diff = _diff(_logits(llama, ids, mask), expected)
        del llama
        # atol is meant for logits of order 1; float32 rounding grows with their size, so the bound does too.
        scale = max(1.0, float(expected.abs().max()))
        if not max_diff <= atol * scale:  # NaN fails too
            raise ExportError(
                f"verification failed: the reloaded Llama's logits differ from the arbor model's by up to "
                f"{max_diff:.3g}, more than atol={atol:g} x logit scale {scale:.3g}; nothing was written to "
                f"{os.fspath(out)}"
            )
        cast_diff = None
        if dtype != torch.float32:
            say(f"casting the saved weights to {str(dtype).removeprefix('torch.')}")
            _save(sd, llama_config, generation, tmp, dtype)
            llama = _reload(tmp, device)  # upcast on load: what is measured is the rounding alone
            cast_diff = _diff(_logits(llama, ids, mask), expected)
            del llama
        for name, source in extra.items():
            shutil.copy2(source, tmp / name)
        _check_target(out, overwrite)  # again: the target may have appeared meanwhile
        replace_directory(tmp, out)  # an earlier export is moved aside, and dropped once this one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"done: {out}")
    return ExportReport(
        out_dir=out,
        max_abs_diff=max_diff,
        atol=atol,
        logit_scale=scale,
        padded=padded,
        num_parameters=num_parameters,
        padding_parameters=_padding_parameters(config, ffn, heads, kv_heads),
        tied=tied,
        dtype=str(dtype).removeprefix("torch."),
        cast_max_abs_diff=cast_diff,
        notes=notes,
    )
