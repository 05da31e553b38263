"""The arbor model: a Llama-class decoder whose sizes may differ per layer.

Read top to bottom: rotary embedding, MLP, attention, block, model, LM.
Parameter names follow the Llama layout exactly (``model.embed_tokens``,
``model.layers.N.self_attn.q_proj``, ``model.layers.N.mlp.gate_proj``, ...), so
peft targets, weight tools and the Llama export speak the same names.

What transformers already maintains is reused rather than rewritten: Llama's
RMSNorm, the attention function interface (eager, sdpa, flex, flash), mask
creation, RoPE init functions, ``DynamicCache``, ``GenerationMixin`` and the loss.

The whole decoder is one module, as transformers keeps each model in one
modeling file: the classes are small and read in the order a forward runs,
and splitting them would scatter one forward pass over several files.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from arbor import compat
from arbor.compat import (
    ACT2FN,
    ALL_ATTENTION_FUNCTIONS,
    BaseModelOutputWithPast,
    Cache,
    CausalLMOutputWithPast,
    DynamicCache,
    GradientCheckpointingLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    accepts_cache_kwarg,
    apply_rotary_pos_emb,
    can_return_tuple,
    capture_outputs,
    eager_attention_forward,
    merge_with_config_defaults,
)
from arbor.model import checkpoint as checkpoint_checks
from arbor.model.attention import check_attention_device, resolve_attn_implementation
from arbor.model.config import ArborConfig
from arbor.plugins import PluginError, call_hook, get_registry, has_hook_impls, hook_implementers


class ArborRotaryEmbedding(LlamaRotaryEmbedding):
    """Llama's rotary tables, built after plugins may have changed the RoPE parameters.

    The ``arbor_rope_config`` hook sees a copy of ``config.rope_parameters``;
    what it returns is used for the tables of this module only, so the saved
    config keeps describing the model as the user configured it.
    """

    def __init__(self, config: ArborConfig):
        changed = call_hook("arbor_rope_config", config=config, rope_parameters=copy.deepcopy(config.rope_parameters))
        if changed is not None:
            config = copy.copy(config)
            config.rope_parameters = dict(changed) if isinstance(changed, dict) else changed
            try:  # what a plugin returns is checked like the user's own settings
                config.standardize_rope_params()
                config._check_rope()
            except Exception as exc:
                raise PluginError(
                    f"an arbor_rope_config hook ({', '.join(hook_implementers('arbor_rope_config'))}) returned "
                    f"invalid RoPE parameters {changed!r}: {exc}"
                ) from exc
        super().__init__(config)


class ArborMLP(nn.Module):
    """SwiGLU feed-forward block: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, config: ArborConfig, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ArborAttention(nn.Module):
    """Grouped-query attention with this layer's own head counts.

    The kernel is whatever ``config._attn_implementation`` names in
    transformers' attention interface, so every backend transformers supports
    (and every one a plugin adds there) runs unchanged.
    """

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

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class ArborDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: ArborConfig, layer_idx: int):
        super().__init__()
        self.self_attn = ArborAttention(config, layer_idx)
        self.mlp = ArborMLP(config, config.layer_intermediate_sizes[layer_idx])
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @compat.layer_accepts_cache_kwarg
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class ArborPreTrainedModel(PreTrainedModel):
    config_class = ArborConfig
    config: ArborConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ArborDecoderLayer"]
    _skip_keys_device_placement = [compat.CACHE_KWARG]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": ArborDecoderLayer, "attentions": ArborAttention}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, verify_checksums: bool = True, **kwargs):
        """As in transformers, but a local checkpoint is checked first: a file whose bytes
        differ from its ``checksums.json`` (see `arbor.model.checkpoint`) fails naming the file, and
        tensors that do not fit the config fail naming the tensor and both shapes."""
        path = pretrained_model_name_or_path
        is_local_dir = isinstance(path, (str, os.PathLike)) and os.path.isdir(path)
        if is_local_dir and verify_checksums:
            checkpoint_checks.verify_checksums(path, only=checkpoint_checks.is_model_file)
        if is_local_dir and not kwargs.get("ignore_mismatched_sizes"):
            config = kwargs.get("config")
            if not isinstance(config, ArborConfig):
                config = checkpoint_checks.read_config(path, ArborConfig)
            checkpoint_checks.check_checkpoint_shapes(path, cls, config)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        checkpoint_checks.drop_remote_code_map(model.config)  # written again by each save
        return loaded

    def save_pretrained(self, save_directory, *args, remote_code: bool = True, **kwargs):
        """As in transformers, after removing the checksums of an earlier save into the same directory.

        With ``remote_code`` (the default) the directory also gets the model's own modeling code,
        named in ``config.json``'s ``auto_map``, and a frozen substrate's matrix (see
        `arbor.model.checkpoint.write_remote_code`), so that
        ``AutoModelForCausalLM.from_pretrained(save_directory, trust_remote_code=True)`` loads it
        where arbor is not installed. ``remote_code=False`` saves without them.
        """
        # Checksums of an earlier save there would describe files this save replaces.
        checkpoint_checks.drop_checksums(save_directory)
        if not kwargs.get("is_main_process", True) or os.path.isfile(save_directory):
            return super().save_pretrained(save_directory, *args, **kwargs)
        os.makedirs(save_directory, exist_ok=True)
        if remote_code:
            remote_code = checkpoint_checks.write_remote_code(self, save_directory)
        else:
            checkpoint_checks.remove_remote_code(save_directory)
        # The map is the config's for this save only, as the code it names is this save's.
        config = self.config
        previous = config.__dict__.get("auto_map")
        checkpoint_checks.drop_remote_code_map(config)
        if remote_code:
            config.auto_map = {**config.__dict__.get("auto_map", {}), **checkpoint_checks.REMOTE_CODE_AUTO_MAP}
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            config.__dict__.pop("auto_map", None)
            if previous is not None:
                config.auto_map = previous

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        # Registered backend names ("flex", "flash-attn", a plugin's) map to transformers
        # keys here, and an unavailable backend fails now with its reason. Hub kernel
        # references ("org/repo", "paged|...") go to transformers untouched.
        if isinstance(attn_implementation, str) and not any(c in attn_implementation for c in "/|"):
            attn_implementation = resolve_attn_implementation(attn_implementation)
        return compat.check_and_adjust_attn_implementation(
            ArborPreTrainedModel, self, attn_implementation, is_init_check, **kwargs
        )

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # Substrates other than a plain embedding initialise themselves.
        reset = getattr(module, "reset_substrate", None)
        if callable(reset):
            reset()


def build_substrate(config: ArborConfig) -> nn.Module:
    """The embedding module of the substrate ``config.substrate`` names."""

    component = get_registry().get("substrate", config.substrate)
    settings = component.validate_settings(config.substrate_settings)
    return component.build(config, settings)


class _StatsCollection:
    """The hooks of one forward that collects statistics: a pre-hook on every layer that passes the
    layer's input to ``arbor_pre_forward_stats``, and a hook that removes them all when the forward
    ends (also when it raises). Layers are read at the start of each collecting forward, so layers a
    growth step inserted are observed too."""

    def __init__(self, decoder: ArborModel, step: int):
        self.decoder, self.step = decoder, step
        self.seen: set[int] = set()
        self.handles = [
            # First among the layer's pre-hooks: the input as the block receives it.
            layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True, prepend=True)
            for i, layer in enumerate(decoder.layers)
        ]
        self.handles.append(decoder.register_forward_hook(self._finish, always_call=True))
        decoder._stats_collection = self

    def _layer_hook(self, layer_idx: int) -> Callable:
        def hook(module, args, kwargs) -> None:  # returns nothing: the layer's input is left as it is
            # Once per layer and forward; a layer run again in the same forward is not counted twice.
            if torch.compiler.is_compiling() or layer_idx in self.seen:
                return
            self.seen.add(layer_idx)
            hidden_states = args[0] if args else kwargs["hidden_states"]
            call_hook("arbor_pre_forward_stats", model=self.decoder, layer_idx=layer_idx,
                      hidden_states=hidden_states.detach(), step=self.step)

        return hook

    def _finish(self, module, args, output) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.decoder.__dict__.get("_stats_collection") is self:
            del self.decoder._stats_collection


def _count_stats_forward(decoder: ArborModel, args) -> None:
    """Forward pre-hook of the decoder while ``stats_interval`` > 0: counts training forwards and hooks
    the layers of a forward that collects. Under ``torch.compile`` it does nothing, so a compiled
    graph holds no statistics code (`CompiledForward` runs the collecting forwards eagerly)."""
    if torch.compiler.is_compiling():
        return
    stale = decoder.__dict__.get("_stats_collection")
    if stale is not None:  # left by a forward that could not finish its hooks
        stale.remove()
    step = decoder._next_stats_step()
    if step is not None:
        _StatsCollection(decoder, step)


class ArborModel(ArborPreTrainedModel):
    """The decoder stack without the LM head."""

    #: The block class; `arbor.growth.operators.insert_layers` builds new layers from it.
    layer_class = ArborDecoderLayer

    def __init__(self, config: ArborConfig):
        super().__init__(config)
        self.embed_tokens = build_substrate(config)
        self.layers = nn.ModuleList(self.layer_class(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = ArborRotaryEmbedding(config)
        self.gradient_checkpointing = False
        # Statistics are gathered by module hooks, never by `forward` itself: while
        # ``stats_interval`` is positive one pre-hook on this module counts training forwards,
        # and a forward that collects gets per-layer hooks for its own duration (`_StatsCollection`).
        self._stats_interval = 0
        self._stats_counter = None  # the handle of that pre-hook while stats_interval > 0
        #: Training forwards seen so far; the ``step`` passed to the stats hook.
        self.stats_step = 0
        self.post_init()

    @property
    def stats_interval(self) -> int:
        """Collect activation statistics every this many training forwards (0: never)."""
        return self._stats_interval

    @stats_interval.setter
    def stats_interval(self, value: int) -> None:
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"stats_interval={value!r} is invalid: must be an integer >= 0 (0 switches it off)")
        self._stats_interval = value
        if value and self._stats_counter is None:
            self._stats_counter = self.register_forward_pre_hook(_count_stats_forward)
        elif not value and self._stats_counter is not None:
            self._stats_counter.remove()
            self._stats_counter = None

    def _next_stats_step(self, count: bool = True) -> int | None:
        """The ``step`` of the next forward if it collects statistics, else None; ``count``
        counts it as a training forward (``stats_step``)."""
        if not (self.training and self._stats_interval > 0):
            return None
        step = self.stats_step
        if count:
            self.stats_step += 1
        if step % self._stats_interval:
            return None
        return step if has_hook_impls("arbor_pre_forward_stats") else None

    @accepts_cache_kwarg
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        check_attention_device(self.config._attn_implementation, inputs_embeds.device)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen).unsqueeze(0)

        causal_mask = compat.create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for decoder_layer in self.layers:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                # under the installed name: GradientCheckpointingLayer drops it by that name
                **{compat.CACHE_KWARG: cache},
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return compat.model_output(last_hidden_state=hidden_states, cache=cache)


class ArborForCausalLM(ArborPreTrainedModel, GenerationMixin):
    """`ArborModel` with a language-modelling head; ``labels`` give the shifted loss.

    This is the model as a function: no growth, freezing or adapters. The class
    users load, ``arbor.ArborForCausalLM`` (`arbor.growth.growable.ArborForCausalLM`),
    adds those to it under the same name.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ArborConfig):
        super().__init__(config)
        self.model = ArborModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @accepts_cache_kwarg
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        # Only the positions asked for go through the (vocab-sized) head.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return compat.causal_lm_output(
            loss=loss,
            logits=logits,
            cache=compat.output_cache(outputs),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _get_static_cache_init_shape(self):
        # generate() allocates a static cache before the first forward (chunked prefill) with the
        # kv-head count transformers reads from the config, one for all layers; a grown model's
        # layers differ, and a layer given the wrong count fails on its first write.
        shape = compat.static_cache_init_shape(ArborForCausalLM, self)
        per_layer = self.config.layer_num_key_value_heads
        if shape is None or len(set(per_layer)) == 1:
            return shape
        num_heads, head_dim = shape
        # A count other than the config's is a tensor-parallel share, not known per layer here:
        # None leaves each layer to allocate from the first keys it writes.
        return (list(per_layer), head_dim) if num_heads == self.config.num_key_value_heads else None

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """As `GenerationMixin.generate`; an empty prompt is refused in one line instead of failing
        deep inside attention (give no ``inputs`` at all to start from ``bos_token_id``)."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.shape[-1] == 0 and kwargs.get("inputs_embeds") is None:
            raise ValueError(
                "generate: the prompt is empty (input_ids has 0 tokens); give at least one token, "
                "or no input_ids at all to start from bos_token_id"
            )
        return super().generate(inputs, *args, **kwargs)

    # Statistics collection lives on the decoder; these make it reachable from the LM.
    @property
    def stats_interval(self) -> int:
        return self.model.stats_interval

    @stats_interval.setter
    def stats_interval(self, value: int) -> None:
        self.model.stats_interval = value


class CompiledForward:
    """``torch.compile(model, **options)`` as a callable that keeps activation statistics.

    The statistics hooks step aside while dynamo traces, so a compiled graph holds no statistics
    code (``fullgraph=True`` works with ``stats_interval`` on) and a model compiled with plain
    ``torch.compile`` collects none. This callable runs the training forwards that collect
    (every ``stats_interval``-th) on the eager model, where the hooks fire exactly as without
    compilation, and all others through the compiled graph, counting them in ``stats_step``: the
    statistics are those of an eager run. ``model`` stays the real module (growth, saving,
    evaluation use it); after the model's structure changes, build a new one.
    """

    def __init__(self, model: nn.Module, **options):
        self.model = model
        self.compiled = torch.compile(model, **options)

    def __call__(self, *args, **kwargs):
        decoder = self.model.model if hasattr(self.model, "lm_head") else self.model
        if decoder._next_stats_step(count=False) is not None:
            return self.model(*args, **kwargs)  # eager: the hooks count this forward and collect
        decoder._next_stats_step()  # counted here: the compiled graph does not count
        return self.compiled(*args, **kwargs)


def count_parameters(config: ArborConfig) -> int:
    """Parameters of the model ``config`` describes, counted on the meta device (no memory used)."""
    with torch.device("meta"):
        model = ArborForCausalLM(config)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already skips tied duplicates
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
