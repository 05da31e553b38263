"""The one place arbor touches transformers internals.

transformers renames its internals often: 5.24 passes the KV cache to a model
as ``cache=`` instead of ``past_key_values=`` (the old name goes in 5.40), and
names the output field ``cache`` too; 5.23 renames gradient checkpointing to
activation checkpointing. Everything arbor uses from transformers that is not
stable public API is imported or looked up here, and every difference between
the versions arbor supports is settled here, by asking the installed version
what it does (feature detection), not by comparing version strings. The next
rename is then a change to this file only. The oldest release supported is the
lower bound on transformers in pyproject.toml; CI runs the model tests on it as
well as on the newest release.

Stable public API (``PreTrainedModel``, ``GenerationMixin``, ``PreTrainedConfig``,
the Auto classes, ``LlamaConfig``/``LlamaForCausalLM``) is imported where it is used.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import transformers
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask as _create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

__all__ = [
    "ACT2FN",
    "ALL_ATTENTION_FUNCTIONS",
    "CACHE_KWARG",
    "CACHE_OUTPUT_FIELD",
    "ROPE_INIT_FUNCTIONS",
    "TRANSFORMERS_VERSION",
    "BaseModelOutputWithPast",
    "Cache",
    "CausalLMOutputWithPast",
    "DynamicCache",
    "GradientCheckpointingLayer",
    "LlamaRMSNorm",
    "LlamaRotaryEmbedding",
    "accepts_cache_kwarg",
    "layer_accepts_cache_kwarg",
    "apply_rotary_pos_emb",
    "can_return_tuple",
    "capture_outputs",
    "causal_lm_output",
    "checkpointing_training_argument",
    "check_and_adjust_attn_implementation",
    "create_causal_mask",
    "eager_attention_forward",
    "merge_with_config_defaults",
    "model_output",
    "output_cache",
    "static_cache_init_shape",
]

TRANSFORMERS_VERSION: str = transformers.__version__

#: The version in which transformers drops ``past_key_values`` as a name for the cache.
_OLD_CACHE_NAME_REMOVED_IN = "5.40.0"


def _cache_kwarg() -> str:
    # transformers' mask functions take the cache under the name its models and
    # ``generate`` use; that name is what arbor's layers must pass on.
    return "cache" if "cache" in inspect.signature(_create_causal_mask).parameters else "past_key_values"


#: The keyword under which the installed transformers hands a model its KV cache
#: (``generate``, mask functions, ``GradientCheckpointingLayer``): ``"cache"`` from
#: 5.24 on, ``"past_key_values"`` before.
CACHE_KWARG: str = _cache_kwarg()

#: The field of model outputs that holds the cache in the installed transformers.
CACHE_OUTPUT_FIELD: str = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _rename_past_key_values(func: Callable) -> Callable:
    """Accept ``past_key_values=`` as ``cache=`` silently: before 5.24 it is the name
    transformers itself passes, so it is not deprecated there."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if "past_key_values" in kwargs:
            if kwargs.get("cache") is not None:
                raise ValueError("give the KV cache once: as cache= or as past_key_values=, not both")
            old = kwargs.pop("past_key_values")
            if old is not None or "cache" not in kwargs:
                kwargs["cache"] = old
        return func(*args, **kwargs)

    return wrapper


def accepts_cache_kwarg(func: Callable) -> Callable:
    """Decorate a ``forward`` whose cache parameter is named ``cache`` so that it also
    takes ``past_key_values=`` — the way transformers' own models accept the old name.

    With a transformers that has moved to ``cache`` this is its ``deprecate_kwarg``
    (a ``FutureWarning`` for the old name until it is removed there); with one that
    still speaks ``past_key_values`` the old name is taken silently.
    """
    if CACHE_KWARG == "cache":
        return deprecate_kwarg(
            "past_key_values", _OLD_CACHE_NAME_REMOVED_IN, new_name="cache", raise_if_both_names=True
        )(func)
    return _rename_past_key_values(func)


def layer_accepts_cache_kwarg(func: Callable) -> Callable:
    """For a layer's ``forward`` (parameter ``cache``), called by arbor's own model with the cache
    under `CACHE_KWARG`: nothing to do where that is ``cache``, a rename where it is the old name.
    Layers run once per block per step, so they skip `accepts_cache_kwarg`'s checks."""
    return func if CACHE_KWARG == "cache" else _rename_past_key_values(func)


def create_causal_mask(
    config: Any,
    inputs_embeds: Any,
    attention_mask: Any,
    cache: Cache | None,
    position_ids: Any = None,
) -> Any:
    """transformers' ``create_causal_mask``, with the cache passed under the installed name."""
    return _create_causal_mask(
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{CACHE_KWARG: cache},
    )


def model_output(*, last_hidden_state: Any, cache: Cache | None, **fields: Any) -> BaseModelOutputWithPast:
    """A ``BaseModelOutputWithPast`` with the cache in the installed version's field."""
    return BaseModelOutputWithPast(last_hidden_state=last_hidden_state, **{CACHE_OUTPUT_FIELD: cache}, **fields)


def causal_lm_output(*, cache: Cache | None, **fields: Any) -> CausalLMOutputWithPast:
    """A ``CausalLMOutputWithPast`` with the cache in the installed version's field."""
    return CausalLMOutputWithPast(**{CACHE_OUTPUT_FIELD: cache}, **fields)


def output_cache(output: Any) -> Cache | None:
    """The KV cache a model output carries, whatever the installed version calls it."""
    return getattr(output, CACHE_OUTPUT_FIELD, None)


def static_cache_init_shape(model_cls: type, model: Any) -> Any:
    """``GenerationMixin._get_static_cache_init_shape`` (private) of the class after ``model_cls`` in the MRO."""
    return super(model_cls, model)._get_static_cache_init_shape()


def check_and_adjust_attn_implementation(model_cls: type, model: Any, attn_implementation: Any, is_init_check: bool, **kwargs: Any) -> Any:
    """Call ``PreTrainedModel._check_and_adjust_attn_implementation`` (private) of the class after ``model_cls`` in the MRO."""
    method = super(model_cls, model)._check_and_adjust_attn_implementation
    return method(attn_implementation, is_init_check, **kwargs)


# ------------------------------------------------------- gradient checkpointing
def enable_gradient_checkpointing(model: Any, **kwargs: Any) -> None:
    """Switch gradient checkpointing on: ``activation_checkpointing_enable`` where the
    installed version has it (5.23 renamed it), ``gradient_checkpointing_enable`` before."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(**kwargs)


def checkpointing_training_argument(enabled: bool = True) -> dict[str, bool]:
    """The ``TrainingArguments`` keyword that switches gradient checkpointing on in the installed
    release: ``activation_checkpointing`` where it has it (5.23 renamed it), else ``gradient_checkpointing``."""
    from transformers import TrainingArguments  # the Trainer stack is heavy; only callers that train pay for it

    fields = getattr(TrainingArguments, "__dataclass_fields__", {})
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled}


def copy_checkpointing(source: Any, layers: Any) -> None:
    """Give ``layers`` the gradient checkpointing ``source`` (a checkpointing layer) has.

    ``gradient_checkpointing_enable`` flags the layers that exist when it runs; a
    layer inserted afterwards would otherwise keep every activation.
    """
    if not getattr(source, "gradient_checkpointing", False):
        return
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = source._gradient_checkpointing_func
