"""Conversion to plain transformers Llama.

`to_llama_config` describes an arbor model as a `LlamaConfig`; every
parameter name already matches, so a uniform model's state dict loads into
`LlamaForCausalLM` unchanged.
"""

from __future__ import annotations

from transformers import LlamaConfig

from arbor.config import ArborConfig


def to_llama_config(config: ArborConfig, **overrides) -> LlamaConfig:
    """The `LlamaConfig` of the same architecture; the config must be uniform across layers."""
    if not config.is_uniform:
        raise ValueError(
            "to_llama_config needs equal FFN widths and head counts in every layer; "
            f"got layer_intermediate_sizes={config.layer_intermediate_sizes}, "
            f"layer_num_attention_heads={config.layer_num_attention_heads}, "
            f"layer_num_key_value_heads={config.layer_num_key_value_heads}"
        )
    kwargs = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
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
