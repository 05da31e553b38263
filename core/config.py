"""`ArborConfig`: the whole architecture of a growable Llama-class model.

Field names follow `transformers.LlamaConfig` wherever they mean the same
thing. What Llama keeps as one number per model, arbor also keeps per layer
(`layer_intermediate_sizes`, `layer_num_attention_heads`,
`layer_num_key_value_heads`), because growth makes layers uneven and an uneven
model must save and load exactly. The scalar fields are the sizes that new
layers get.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PreTrainedConfig

from arbor.compat import ACT2FN, CACHE_KWARG, ROPE_INIT_FUNCTIONS

#: RoPE types arbor builds tables for, all through transformers' init functions.
ROPE_TYPES: tuple[str, ...] = ("default", *sorted(k for k in ROPE_INIT_FUNCTIONS if k != "default"))


class ArborConfigError(ValueError):
    """An `ArborConfig` field holds a value the model cannot be built with."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"ArborConfig.{field}={value!r} is invalid: {allowed}")


# The sizes below are the architecture; the parameter counts `arbor presets`
# prints are computed from the built model, not written down here.
PRESETS: dict[str, dict[str, Any]] = {
    # The Arbor dynamic-growth model: starts at 24 layers, grows to at most 64,
    # 4,096 positions natively, RoPE linearly scaled x32 to 131,072.
    "arbor-500m-1b": dict(
        vocab_size=128_000,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=131_072,
        rope_parameters={"rope_type": "linear", "rope_theta": 10_000.0, "factor": 32.0},
        tie_word_embeddings=True,
        min_layers=24,
        max_layers=64,
    ),
    # Progressive Growth Transformers study model: 9 layers reached in stages.
    "pgt-9": dict(
        vocab_size=65_536,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=9,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        tie_word_embeddings=False,
        min_layers=1,
        max_layers=9,
    ),
    # Wide model grown one layer at a time from a single block.
    "abs-bvv": dict(
        vocab_size=131_072,
        hidden_size=4096,
        intermediate_size=11_008,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        tie_word_embeddings=False,
        min_layers=1,
        max_layers=32,
    ),
    # Small enough for tests and demos on a laptop CPU; grouped-query attention.
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        tie_word_embeddings=True,
        min_layers=1,
        max_layers=16,
    ),
}


class ArborConfig(PreTrainedConfig):
    r"""Configuration of an `ArborForCausalLM`.

    Args:
        vocab_size: number of token ids.
        hidden_size: width of the residual stream (d_model).
        intermediate_size: FFN width of new layers (and of every layer when
            `layer_intermediate_sizes` is not given).
        num_hidden_layers: number of decoder blocks.
        num_attention_heads / num_key_value_heads: query and key/value heads of
            new layers; kv heads must divide query heads (grouped-query attention).
        head_dim: size of one head. Explicit, so the hidden size can grow while
            heads keep their size; defaults to `hidden_size // num_attention_heads`.
        layer_intermediate_sizes, layer_num_attention_heads,
        layer_num_key_value_heads: per-layer sizes, one entry per layer.
        max_position_embeddings, rope_parameters, rms_norm_eps,
        initializer_range, tie_word_embeddings, attention_dropout, hidden_act:
            as in `LlamaConfig`.
        substrate / substrate_settings: the registered embedding substrate
            that turns token ids into vectors, and its settings.
        min_layers / max_layers: bounds depth growth must stay within.
        growth: the step ``model.grow()`` takes, as a `arbor.growable.GrowthSpec`
            dict (e.g. ``{"axis": "ffn", "factor": 1.5}``); None means Arbor's
            step, 4 zero-initialised layers at the middle.
        layer_generations: per layer, the depth-growth step that created it
            (0 for the initial stack); freezing "all but the newest k layers"
            reads it.
    """

    model_type = "arbor"
    keys_to_ignore_at_inference = [CACHE_KWARG]

    vocab_size: int = 32_000
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    layer_intermediate_sizes: list[int] | None = None
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_generations: list[int] | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_dropout: float = 0.0
    substrate: str = "learned"
    substrate_settings: dict | None = None
    min_layers: int = 1
    max_layers: int | None = None
    growth: dict | None = None

    def __post_init__(self, **kwargs):
        if self.rope_parameters is None and "rope_scaling" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta", 10_000.0)}
        elif isinstance(self.rope_parameters, dict):
            # Never share the caller's dict: standardisation below writes into it.
            self.rope_parameters = copy.deepcopy(self.rope_parameters)
        self._check_scalars()
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ArborConfigError(
                    "hidden_size",
                    self.hidden_size,
                    f"must be divisible by num_attention_heads={self.num_attention_heads} "
                    "when head_dim is not given (or give head_dim explicitly)",
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        n = self.num_hidden_layers
        if self.layer_intermediate_sizes is None:
            self.layer_intermediate_sizes = [self.intermediate_size] * n
        if self.layer_num_attention_heads is None:
            self.layer_num_attention_heads = [self.num_attention_heads] * n
        if self.layer_num_key_value_heads is None:
            self.layer_num_key_value_heads = [self.num_key_value_heads] * n
        if self.layer_generations is None:
            self.layer_generations = [0] * n
        if self.substrate_settings is None:
            self.substrate_settings = {}
        super().__post_init__(**kwargs)
        self.validate_arbor()

    # ------------------------------------------------------------------ checks
    def _check_scalars(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            _positive_int(name, getattr(self, name))
        for name in ("num_key_value_heads", "head_dim", "max_layers"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        _positive_int("max_position_embeddings", self.max_position_embeddings)
        if not isinstance(self.min_layers, int) or isinstance(self.min_layers, bool) or self.min_layers < 1:
            raise ArborConfigError("min_layers", self.min_layers, "must be an integer >= 1")
        if not self.rms_norm_eps > 0:
            raise ArborConfigError("rms_norm_eps", self.rms_norm_eps, "must be > 0")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ArborConfigError("attention_dropout", self.attention_dropout, "must lie in [0, 1)")

    def validate_arbor(self) -> None:
        """Check every field; raise `ArborConfigError` naming the first bad one.

        Growth operators call this after editing the config, so a grown model
        can never be described by an inconsistent config.
        """
        self._check_scalars()
        n = self.num_hidden_layers
        heads = self.num_attention_heads
        if heads % self.num_key_value_heads:
            raise ArborConfigError(
                "num_key_value_heads", self.num_key_value_heads, f"must divide num_attention_heads={heads}"
            )
        if self.head_dim % 2:
            raise ArborConfigError("head_dim", self.head_dim, "must be even (RoPE rotates pairs of dimensions)")
        for name in ("layer_intermediate_sizes", "layer_num_attention_heads", "layer_num_key_value_heads"):
            values = getattr(self, name)
            if not isinstance(values, list) or len(values) != n:
                raise ArborConfigError(name, values, f"must be a list of num_hidden_layers={n} positive integers")
            for i, v in enumerate(values):
                _positive_int(f"{name}[{i}]", v)
        gens = self.layer_generations
        if not isinstance(gens, list) or len(gens) != n or any(
            not isinstance(g, int) or isinstance(g, bool) or g < 0 for g in gens
        ):
            raise ArborConfigError(
                "layer_generations", gens, f"must be a list of num_hidden_layers={n} integers >= 0"
            )
        for i, (q, kv) in enumerate(zip(self.layer_num_attention_heads, self.layer_num_key_value_heads)):
            if q % kv:
                raise ArborConfigError(
                    f"layer_num_key_value_heads[{i}]", kv, f"must divide layer_num_attention_heads[{i}]={q}"
                )
        if self.max_layers is not None and self.max_layers < n:
            raise ArborConfigError("max_layers", self.max_layers, f"must be >= num_hidden_layers={n}")
        if self.max_layers is not None and self.max_layers < self.min_layers:
            raise ArborConfigError("max_layers", self.max_layers, f"must be >= min_layers={self.min_layers}")
        if self.hidden_act not in ACT2FN:
            raise ArborConfigError("hidden_act", self.hidden_act, f"must be one of {', '.join(sorted(ACT2FN))}")
        if not isinstance(self.substrate, str) or not self.substrate:
            raise ArborConfigError("substrate", self.substrate, "must be the name of a registered substrate")
        if not isinstance(self.substrate_settings, dict):
            raise ArborConfigError("substrate_settings", self.substrate_settings, "must be a table (dict)")
        self._check_rope()
        if self.growth is not None:
            from arbor.growable import parse_growth_spec
            from arbor.growth import GrowthError

            if not isinstance(self.growth, dict):
                raise ArborConfigError("growth", self.growth, "must be a table (dict) describing one growth step")
            try:
                parse_growth_spec(self.growth)
            except GrowthError as exc:
                raise ArborConfigError("growth", self.growth, str(exc)) from None

    def _check_rope(self) -> None:
        rope = self.rope_parameters
        if not isinstance(rope, dict):
            raise ArborConfigError("rope_parameters", rope, "must be a dict with rope_type and rope_theta")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ArborConfigError("rope_parameters.rope_type", rope_type, f"must be one of {', '.join(ROPE_TYPES)}")
        try:
            self.validate_rope()
        except (KeyError, ValueError, TypeError) as exc:
            raise ArborConfigError("rope_parameters", rope, str(exc).strip().splitlines()[0]) from None

    # ----------------------------------------------------------------- helpers
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ArborConfig:
        """A config from a named preset (`arbor presets` lists them), with overrides."""
        if name not in PRESETS:
            raise ArborConfigError("preset", name, f"must be one of {', '.join(PRESETS)}")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})

    @property
    def is_uniform(self) -> bool:
        """Whether every layer has the default FFN width and head counts."""
        return (
            set(self.layer_intermediate_sizes) == {self.intermediate_size}
            and set(self.layer_num_attention_heads) == {self.num_attention_heads}
            and set(self.layer_num_key_value_heads) == {self.num_key_value_heads}
        )


def _positive_int(field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArborConfigError(field, value, "must be a positive integer")
