"""An arbor checkpoint's own modeling code, for loading it where arbor is not installed.

``save_pretrained`` copies this file into every checkpoint as ``modeling_arbor.py`` and names
its classes in ``config.json``'s ``auto_map``, so that::

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

loads the model with nothing but torch and transformers, as the Arbor and PGT model cards load
theirs. It imports nothing from arbor (and must not: it runs where arbor is absent) and is a
copy frozen into each checkpoint, so it leans only on transformers pieces that are stable
across releases: Llama's RMSNorm, rotary tables and ``apply_rotary_pos_emb``, the attention
function registry, ``create_causal_mask``, ``DynamicCache`` and ``GenerationMixin``. What
transformers renamed within 5.x (the KV cache passed as ``cache=`` from 5.25 on, as
``past_key_values=`` before) is settled by asking the installed version.

The model computes what `arbor.model.modeling.ArborForCausalLM` computes, layer sizes per
layer included (a grown model's uneven FFN widths and head counts), with none of its growth,
freezing, plugin hooks or statistics. A frozen substrate's embedding matrix is not in
``model.safetensors`` (arbor rebuilds it from the config, which needs arbor); the checkpoint
carries it in ``substrate.safetensors``, which `ArborForCausalLM.from_pretrained` here reads.
"""

from __future__ import annotations

import inspect
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import cached_file

try:  # checkpointed blocks; a plain module where a transformers release lacks the class
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - every 5.x release has it
    GradientCheckpointingLayer = nn.Module

#: The name under which this transformers passes the KV cache to models and mask functions.
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
#: The model-output field that holds the cache in this transformers.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
#: The file beside the weights holding a frozen substrate's embedding matrix (tensor ``weight``).
SUBSTRATE_FILE = "substrate.safetensors"
#: The substrate whose embedding is an ordinary trainable matrix in the weights file.
LEARNED = "learned"
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


class ArborConfig(PreTrainedConfig):
    """The keys arbor writes into ``config.json``; arbor-only keys (growth settings, substrate
    settings, depth bounds) are kept as they are and change nothing here."""

    model_type = "arbor"
    keys_to_ignore_at_inference = [CACHE_KWARG]

    vocab_size: int = 32_000
    hidden_size: int = 4096
    intermediate_size: int = 11_008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    layer_intermediate_sizes: list[int] | None = None
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_generations: list[int] | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_dropout: float = 0.0
    substrate: str = LEARNED
    substrate_settings: dict | None = None
    min_layers: int = 1
    max_layers: int | None = None
    growth: dict | None = None

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)
        if self.rope_parameters is None and not kwargs.get("rope_scaling"):
            self.rope_parameters = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta", 10_000.0)}
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        n = self.num_hidden_layers
        if self.layer_intermediate_sizes is None:
            self.layer_intermediate_sizes = [self.intermediate_size] * n
        if self.layer_num_attention_heads is None:
            self.layer_num_attention_heads = [self.num_attention_heads] * n
        if self.layer_num_key_value_heads is None:
            self.layer_num_key_value_heads = [self.num_key_value_heads] * n
        for name in ("layer_intermediate_sizes", "layer_num_attention_heads", "layer_num_key_value_heads"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries; num_hidden_layers={n} needs one per layer")


class ArborMLP(nn.Module):
    def __init__(self, config: ArborConfig, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ArborAttention(nn.Module):
    """Grouped-query attention with this layer's own head counts."""

    def __init__(self, config: ArborConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.layer_num_attention_heads[layer_idx]
        self.num_key_value_heads = config.layer_num_key_value_heads[layer_idx]
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache: Cache | None = None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        implementation = self.config._attn_implementation
        attention = eager_attention_forward if implementation in (None, "eager") else ALL_ATTENTION_FUNCTIONS[implementation]
        output, weights = attention(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )
        return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


class ArborDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ArborConfig, layer_idx: int):
        super().__init__()
        self.self_attn = ArborAttention(config, layer_idx)
        self.mlp = ArborMLP(config, config.layer_intermediate_sizes[layer_idx])
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        # The model passes the cache under CACHE_KWARG (the name checkpointing drops it by).
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_values", None)
        kwargs.pop("use_cache", None)
        attn, weights = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache=cache, **kwargs
        )
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)), weights


class FixedEmbedding(nn.Module):
    """A frozen substrate: lookup into a fixed ``(vocab, hidden)`` matrix, a non-persistent buffer
    that `ArborForCausalLM.from_pretrained` fills from the checkpoint's ``substrate.safetensors``."""

    def __init__(self, config: ArborConfig):
        super().__init__()
        self.substrate = config.substrate
        self.register_buffer("weight", torch.zeros(config.vocab_size, config.hidden_size), persistent=False)
        self.filled = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.filled:
            raise RuntimeError(
                f"the embedding matrix of substrate {self.substrate!r} was never loaded: load the model with "
                f"from_pretrained from a checkpoint that has {SUBSTRATE_FILE}"
            )
        return nn.functional.embedding(input_ids, self.weight)


class ArborPreTrainedModel(PreTrainedModel):
    config_class = ArborConfig
    config: ArborConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ArborDecoderLayer"]
    _skip_keys_device_placement = [CACHE_KWARG]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As in transformers; a frozen substrate's matrix is then read from ``substrate.safetensors``."""
        hub = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        embed = model.get_input_embeddings()
        if isinstance(embed, FixedEmbedding):
            path = cached_file(pretrained_model_name_or_path, SUBSTRATE_FILE, **hub)
            with safe_open(path, framework="pt") as handle:
                matrix = handle.get_tensor("weight")
            if tuple(matrix.shape) != tuple(embed.weight.shape):
                raise ValueError(
                    f"{SUBSTRATE_FILE} holds a {list(matrix.shape)} matrix; the config needs {list(embed.weight.shape)}"
                )
            with torch.no_grad():
                embed.weight = matrix.to(device=embed.weight.device, dtype=embed.weight.dtype)
            embed.filled = True
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As in transformers (which copies this file and writes ``auto_map``), with a frozen
        substrate's matrix written beside the weights again."""
        super().save_pretrained(save_directory, *args, **kwargs)
        embed = self.get_input_embeddings()
        if isinstance(embed, FixedEmbedding) and kwargs.get("is_main_process", True) and os.path.isdir(save_directory):
            weight = embed.weight.detach().cpu().contiguous()
            save_file({"weight": weight}, os.path.join(save_directory, SUBSTRATE_FILE),
                      metadata={"format": "pt", "substrate": str(embed.substrate)})


class ArborModel(ArborPreTrainedModel):
    """The decoder stack without the LM head."""

    def __init__(self, config: ArborConfig):
        super().__init__(config)
        self.embed_tokens = (
            nn.Embedding(config.vocab_size, config.hidden_size) if config.substrate == LEARNED else FixedEmbedding(config)
        )
        self.layers = nn.ModuleList(ArborDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, use_cache=None, past_key_values: Cache | None = None,
                output_hidden_states=None, output_attentions=None, return_dict=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            position_ids=position_ids, **{CACHE_KWARG: cache},
        )
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden, all_attentions = [hidden_states], []
        for layer in self.layers:
            hidden_states, weights = layer(
                hidden_states, attention_mask=mask, position_embeddings=position_embeddings,
                position_ids=position_ids, use_cache=use_cache, **{CACHE_KWARG: cache}, **kwargs,
            )
            all_hidden.append(hidden_states)
            all_attentions.append(weights)
        hidden_states = self.norm(hidden_states)
        all_hidden[-1] = hidden_states  # as in transformers' models: the last entry is the normed output
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            **{CACHE_FIELD: cache if use_cache else None},
        )
        return output if _return_dict(self.config, return_dict) else output.to_tuple()


class ArborForCausalLM(ArborPreTrainedModel, GenerationMixin):
    """`ArborModel` with a language-modelling head; ``labels`` give the shifted loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ArborConfig):
        super().__init__(config)
        self.model = ArborModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                past_key_values: Cache | None = None, return_dict=None, **kwargs):
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
            use_cache=use_cache, return_dict=True, **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return output if _return_dict(self.config, return_dict) else output.to_tuple()

    def _get_static_cache_init_shape(self):
        # A static cache is allocated with one kv-head count for all layers; a grown model's layers
        # differ, so each gets its own (transformers releases without this method never call it).
        shape = super()._get_static_cache_init_shape()
        per_layer = self.config.layer_num_key_value_heads
        if shape is None or len(set(per_layer)) == 1:
            return shape
        num_heads, head_dim = shape
        return (list(per_layer), head_dim) if num_heads == self.config.num_key_value_heads else None


def _return_dict(config: ArborConfig, return_dict: bool | None) -> bool:
    return return_dict if return_dict is not None else getattr(config, "return_dict", True)
