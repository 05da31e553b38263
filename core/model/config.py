"""`ArborConfig`: the whole architecture of a growable Llama-class model.

Field names follow `transformers.LlamaConfig` wherever they mean the same
thing. What Llama keeps as one number per model, arbor also keeps per layer
(`layer_intermediate_sizes`, `layer_num_attention_heads`,
`layer_num_key_value_heads`), because growth makes layers uneven and an uneven
model must save and load exactly. The scalar fields are the sizes that new
layers get.

Most of its length is validation: every field is checked when the config is
built, with a message naming the field, the value and what is allowed, and
the presets live beside the fields they fill.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
from typing import Any

from transformers import GenerationConfig, LlamaConfig, PreTrainedConfig

from arbor.compat import ACT2FN, CACHE_KWARG, ROPE_INIT_FUNCTIONS
from arbor_plugins import DEFAULTS, UserError
from arbor_plugins.growth import GrowthError, parse_growth_spec

#: RoPE types arbor builds tables for, all through transformers' init functions.
ROPE_TYPES: tuple[str, ...] = ("default", *sorted(k for k in ROPE_INIT_FUNCTIONS if k != "default"))


class ArborConfigError(UserError):
    """An `ArborConfig` field holds a value the model cannot be built with.

    For a key that is no field at all, ``suggestion`` is the field it most
    likely meant (None when nothing is close), so that a caller with its own
    naming (``model.`` in a training config) can repeat it in its own words.
    """

    def __init__(self, field: str, value: Any, allowed: str, suggestion: str | None = None):
        self.field, self.value, self.allowed, self.suggestion = field, value, allowed, suggestion
        super().__init__(f"ArborConfig.{field}={value!r} is invalid: {allowed}")


class ArborConfigKeyError(ArborConfigError):
    """A keyword that is no setting of `ArborConfig` (``field`` is the keyword itself)."""


#: Other libraries' names for ArborConfig fields (GPT-2, nanoGPT, Meta's Llama code, OPT,
#: Megatron, ...). Checked before the spelling match, which would pair ``num_layers`` with
#: ``min_layers``. Not accepted as synonyms: a config has one name for each thing.
KEY_ALIASES: dict[str, str] = {
    **dict.fromkeys(("num_layers", "n_layer", "n_layers", "layers", "depth"), "num_hidden_layers"),
    **dict.fromkeys(("d_model", "n_embd", "dim", "model_dim", "embed_dim", "hidden"), "hidden_size"),
    **dict.fromkeys(("n_head", "n_heads", "num_heads", "heads"), "num_attention_heads"),
    **dict.fromkeys(("n_kv_heads", "n_kv_head", "num_kv_heads", "kv_heads", "num_query_groups"),
                    "num_key_value_heads"),
    **dict.fromkeys(("ffn_dim", "d_ff", "n_inner", "ffn_hidden_size", "mlp_dim", "ffn_size"),
                    "intermediate_size"),
    **dict.fromkeys(("n_positions", "n_ctx", "max_seq_len", "max_seq_length", "seq_length", "block_size",
                     "context_length", "max_sequence_length", "max_positions", "max_len"),
                    "max_position_embeddings"),
    **dict.fromkeys(("norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rms_norm_epsilon", "rms_eps", "eps"),
                    "rms_norm_eps"),
    **dict.fromkeys(("activation_function", "activation", "act_fn", "hidden_activation"), "hidden_act"),
    **dict.fromkeys(("n_vocab", "vocab", "padded_vocab_size"), "vocab_size"),
    **dict.fromkeys(("d_head", "head_size", "kv_channels", "attention_head_size"), "head_dim"),
    **dict.fromkeys(("attn_dropout", "attn_pdrop", "attention_probs_dropout_prob"), "attention_dropout"),
    **dict.fromkeys(("tie_embeddings", "weight_tying"), "tie_word_embeddings"),
    **dict.fromkeys(("init_std", "initializer_std"), "initializer_range"),
    # The RoPE base: ``rope_theta`` is accepted as is (transformers moves it into rope_parameters).
    **dict.fromkeys(("rope_base", "rotary_base", "rotary_emb_base"), "rope_theta"),
    **dict.fromkeys(("rope_type", "rope_config", "rotary_scaling"), "rope_parameters"),
}

#: Keys transformers attaches to a config after it is built and then saves with it: a quantized
#: model's settings, the remote-code class map, ``from_pretrained(fusion_config=...)``. A default
#: config does not carry them, so they cannot be read off one, but a saved config may.
_ATTACHED_BY_TRANSFORMERS: frozenset[str] = frozenset({"quantization_config", "auto_map", "fusion_config"})


@functools.cache
def _transformers_keys() -> frozenset[str]:
    """The non-field keys every transformers config carries, read off a default `PreTrainedConfig`.

    Its attributes and what ``to_dict()`` writes (``_name_or_path``, ``model_type``,
    ``output_attentions``, ...) come back when a saved or copied config is loaded; asking the
    installed version, rather than listing them here, keeps loading working when a release adds one.
    """
    probe = PreTrainedConfig()
    return frozenset(probe.__dict__) | frozenset(probe.to_dict()) | _ATTACHED_BY_TRANSFORMERS


@functools.cache
def _llama_only_fields() -> dict[str, Any]:
    """`LlamaConfig`'s fields that ArborConfig lacks, with Llama's defaults (e.g. attention_bias=False)."""
    arbor = {f.name for f in dataclasses.fields(ArborConfig)}
    defaults = LlamaConfig()
    return {f.name: getattr(defaults, f.name) for f in dataclasses.fields(LlamaConfig) if f.name not in arbor}


#: Llama-only fields that change nothing Llama computes, whatever their value: the installed Llama
#: ignores ``pretraining_tp`` (older releases split each projection into that many slices and added
#: the parts, the same function up to rounding), so refusing it would refuse Llama's own configs.
_NO_EFFECT_IN_LLAMA: dict[str, str] = {"pretraining_tp": "a positive integer or null"}


def closest_field(name: str, candidates: Any = None) -> str | None:
    """The field an unknown key most likely meant: a known alias, else the nearest spelling."""
    names = sorted(candidates) if candidates is not None else _suggestable()
    if KEY_ALIASES.get(name) in names:
        return KEY_ALIASES[name]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.7)
    return close[0] if close else None


def _suggestable() -> list[str]:
    # The legacy RoPE keys are accepted, so they may be suggested too.
    return sorted({f.name for f in dataclasses.fields(ArborConfig)} | {"rope_theta", "rope_scaling"})


# The sizes below are the architecture; the parameter counts `arbor presets`
# prints are computed from the built model, not written down here, and compared
# with the figures of the source cards in `arbor.model.cards`. Each preset
# spells out every field whose default it does not mean to follow: the defaults
# are LlamaConfig's, and a preset must not change when they do. RMSNorm epsilon
# is 1e-5 as in the Llama-2/3 checkpoints (LlamaConfig's default is 1e-6); the
# special-token ids are None because a preset has no tokenizer (arbor train
# sets them from the one it uses), where LlamaConfig assumes Llama's 1 and 2.
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
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=True,
        min_layers=24,
        max_layers=64,
    ),
    # Progressive Growth Transformers study model (the "1_9" cards): 9 layers reached in
    # stages, d_model 1024, 32 heads, vocab 65,536, context 1024. The cards' blocks are
    # GPT-style (a 4x-wide GELU MLP, 12*d^2 + 13*d parameters a block); arbor's SwiGLU MLP
    # has three matrices, and 2,736 (about 2/3 of 4*d, a multiple of 16) is the width that
    # gives a block the same count: 247.6M in all, as the cards say.
    "pgt-9": dict(
        vocab_size=65_536,
        hidden_size=1024,
        intermediate_size=2736,
        num_hidden_layers=9,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
        min_layers=1,
        max_layers=9,
    ),
    # The abs-bvv series (PGT on frozen visual-Unicode glyphs): d_model 4096, 32 heads,
    # vocab 131,072, grown one layer at a time from a single block up to abs-bvv-6. The
    # substrate is frozen, so the LM head cannot be tied to it. FFN 11,008 is Llama's SwiGLU
    # width for hidden 4096 (about 2/3 of 4*d), within 0.5 % of the cards' GPT-style blocks.
    "abs-bvv": dict(
        vocab_size=131_072,
        hidden_size=4096,
        intermediate_size=11_008,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=False,
        substrate="unicode-glyphs",
        min_layers=1,
        max_layers=6,
    ),
    # What `arbor train` grows into by default, and the final model of benches/efficiency.py:
    # trains at about 8,000 tokens/s on two CPU cores.
    "small": dict(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=True,
        min_layers=1,
        max_layers=16,
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
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=True,
        min_layers=1,
        max_layers=16,
    ),
}
# abs-bvv-4 as its card describes it: 4 layers of the abs-bvv series (1.9B with the frozen glyph
# matrix counted).
PRESETS["abs-bvv-4"] = {**PRESETS["abs-bvv"], "num_hidden_layers": 4}


class ArborConfig(PreTrainedConfig):
    r"""Configuration of an `ArborForCausalLM`.

    Args:
        vocab_size: number of token ids.
        hidden_size: width of the residual stream (d_model).
        intermediate_size: FFN width of new layers (and of every layer when
            `layer_intermediate_sizes` is not given).
        num_hidden_layers: number of decoder blocks; 0 leaves embeddings, final norm and LM head.
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
        growth: the step ``model.grow()`` takes, as an `arbor_plugins.GrowthSpec`
            dict (e.g. ``{"axis": "ffn", "factor": 1.5}``); None means Arbor's
            step, 4 zero-initialised layers at the middle.
        layer_generations: per layer, the depth-growth step that created it
            (0 for the initial stack); freezing "all but the newest k layers"
            reads it.

    The defaults are `LlamaConfig`'s, so ``ArborConfig(**kw)`` and
    ``LlamaConfig(**kw)`` describe the same function. A keyword that is no field
    raises `ArborConfigKeyError` naming the field it most likely meant, except
    the keys transformers itself writes and reads on every config (``dtype``,
    ``architectures``, ``attn_implementation``, legacy ``rope_theta`` and
    ``rope_scaling``, ...). `LlamaConfig`'s ``attention_bias`` and ``mlp_bias``
    are accepted only as False (arbor has no bias terms) and dropped;
    ``pretraining_tp`` is accepted and dropped, since Llama ignores it.
    """

    model_type = "arbor"
    keys_to_ignore_at_inference = [CACHE_KWARG]

    # Defaults are LlamaConfig's (a test holds them equal), so the same keywords build the same
    # function in both; that makes the default a Llama-7B-sized model.
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
    substrate: str = DEFAULTS["substrate"]
    substrate_settings: dict | None = None
    min_layers: int = 1
    max_layers: int | None = None
    growth: dict | None = None

    def __post_init__(self, **kwargs):
        # ``kwargs`` holds every keyword that is no field. Keys first, values after: a misspelt
        # key leaves a default in place, and a complaint about that default would mislead.
        kwargs = self._check_extra_keys(kwargs)
        if self.rope_parameters is None and not kwargs.get("rope_scaling"):
            self.rope_parameters = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta", 10_000.0)}
        elif isinstance(self.rope_parameters, dict):
            # Never share the caller's dict: standardisation below writes into it.
            self.rope_parameters = copy.deepcopy(self.rope_parameters)
        elif self.rope_parameters is not None:  # transformers would fail on it with an AttributeError
            raise ArborConfigError(
                "rope_parameters", self.rope_parameters, "must be a table (dict) with rope_type and rope_theta"
            )
        if isinstance(kwargs.get("rope_scaling"), dict):
            kwargs["rope_scaling"] = copy.deepcopy(kwargs["rope_scaling"])
        # transformers takes the keys it knows (legacy RoPE keys, torch_dtype, attn_implementation,
        # generation settings, ...) and stores whatever else is left as a plain attribute; those
        # leftovers are the unknown keys. Asking it, instead of listing its keys here, keeps the
        # check right for the keys a later release adds.
        super().__post_init__(**kwargs)
        unknown = [
            key for key in kwargs
            if key in self.__dict__ and key not in _transformers_keys() and not _is_property(type(self), key)
        ]
        if unknown:
            raise _unknown_key_error(unknown, kwargs)
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
        self.validate_arbor()

    def _check_extra_keys(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Settle the non-field keys transformers would take without a word but arbor cannot honour."""
        kwargs = dict(kwargs)
        # The class decides the model type; the key only names the class that wrote the dict
        # (a LlamaConfig's to_dict() says "llama"), and stored on the instance it would be saved.
        kwargs.pop("model_type", None)
        for key, default in _llama_only_fields().items():
            if key not in kwargs:
                continue
            value = kwargs.pop(key)
            if key in _NO_EFFECT_IN_LLAMA:
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                    raise ArborConfigError(key, value, f"must be {_NO_EFFECT_IN_LLAMA[key]}")
            elif type(value) is not type(default) or value != default:
                raise ArborConfigError(
                    key, value, f"arbor does not support it; only LlamaConfig's default {default!r} is accepted"
                )
        for key, value in kwargs.items():
            prop = getattr(type(self), key, None)
            if isinstance(prop, property) and prop.fset is None:
                raise ArborConfigError(key, value, "transformers computes it from other fields; it cannot be set")
        if kwargs.get("per_layer_config") is not None:
            raise ArborConfigError(
                "per_layer_config", kwargs["per_layer_config"],
                "arbor does not read it; per-layer sizes are layer_intermediate_sizes, "
                "layer_num_attention_heads and layer_num_key_value_heads",
            )
        self._check_rope_keys(kwargs)
        return kwargs

    def _check_rope_keys(self, kwargs: dict[str, Any]) -> None:
        # transformers lets rope_scaling replace rope_parameters and lets rope_parameters' own
        # rope_theta win over a rope_theta key, both without a word; two different values for
        # one setting are refused instead.
        scaling, theta = kwargs.get("rope_scaling"), kwargs.get("rope_theta")
        if scaling and self.rope_parameters is not None and scaling != self.rope_parameters:
            raise ArborConfigError(
                "rope_scaling", scaling,
                f"rope_scaling is the old name of rope_parameters, and rope_parameters={self.rope_parameters!r} "
                "is also given; give only one",
            )
        given = scaling or self.rope_parameters
        if theta is not None and isinstance(given, dict) and given.get("rope_theta", theta) != theta:
            raise ArborConfigError(
                "rope_theta", theta,
                f"rope_parameters also gives rope_theta={given['rope_theta']!r}; give it in one place only",
            )

    # ------------------------------------------------------------------ checks
    def _check_scalars(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads"):
            _positive_int(name, getattr(self, name))
        # Zero layers is a model too (embeddings, final norm, LM head): the start of growth from nothing.
        _int_at_least("num_hidden_layers", self.num_hidden_layers, 0)
        for name in ("num_key_value_heads", "head_dim", "max_layers"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        _positive_int("max_position_embeddings", self.max_position_embeddings)
        _int_at_least("min_layers", self.min_layers, 0)
        # A string or a boolean here is a typo (rms_norm_eps = "1e-5", tie_word_embeddings = "false" reads
        # as true): refused, not compared or taken for its truth value.
        _real("rms_norm_eps", self.rms_norm_eps, lambda v: v > 0, "a finite number > 0")
        _real("attention_dropout", self.attention_dropout, lambda v: 0 <= v < 1, "a number in [0, 1)")
        # The std of the normal new weights are drawn from: NaN or Infinity would fill the model with them.
        _real("initializer_range", self.initializer_range, lambda v: v >= 0, "a finite number >= 0")
        for name in ("tie_word_embeddings", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ArborConfigError(name, getattr(self, name), "must be true or false (a boolean)")

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
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise ArborConfigError("hidden_act", self.hidden_act, f"must be one of {', '.join(sorted(ACT2FN))}")
        if not isinstance(self.substrate, str) or not self.substrate:
            raise ArborConfigError("substrate", self.substrate, "must be the name of a registered substrate")
        if not isinstance(self.substrate_settings, dict):
            raise ArborConfigError("substrate_settings", self.substrate_settings, "must be a table (dict)")
        self._check_rope()
        if self.growth is not None:
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
        for key in ("rope_theta", "factor"):  # transformers checks neither sign nor finiteness
            value = rope.get(key)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ArborConfigError(f"rope_parameters.{key}", value, "must be a finite number > 0")
        try:
            self.validate_rope()
        except (KeyError, ValueError, TypeError) as exc:
            raise ArborConfigError("rope_parameters", rope, str(exc).strip().splitlines()[0]) from None

    # ----------------------------------------------------------------- helpers
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ArborConfig:
        """A config from a named preset (`arbor presets` lists them), with overrides."""
        if not isinstance(name, str) or name not in PRESETS:
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


def generation_config_to_save(generation: GenerationConfig | None, config: PreTrainedConfig) -> GenerationConfig | None:
    """The generation config a saved model carries: ``generation`` with ``max_length`` (prompt plus
    new tokens) set to the model's context, ``config.max_position_embeddings``, where it was left at
    transformers' default, as Llama 2's checkpoints write their 4,096. A length set on purpose is
    kept; ``generation`` itself is not changed (a copy is returned)."""
    if generation is None or generation.max_length != GenerationConfig().max_length:
        return generation
    generation = copy.deepcopy(generation)
    generation.max_length = config.max_position_embeddings
    return generation


def _is_property(cls: type, key: str) -> bool:
    # transformers' own settings behind a property (num_labels, allow_global_per_layer_attribute_access)
    # may store under their own name; they are not unknown keys.
    return isinstance(getattr(cls, key, None), property)


def _unknown_key_error(unknown: list[str], kwargs: dict[str, Any]) -> ArborConfigKeyError:
    key = unknown[0]
    suggestion = closest_field(key)
    allowed = "not a setting of ArborConfig"
    if suggestion is not None:
        allowed += f"; did you mean {suggestion}?"
    else:
        base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
        own = [f.name for f in dataclasses.fields(ArborConfig) if f.name not in base]
        allowed += f"; its settings are {', '.join(own)} (and transformers' own, such as dtype)"
    if len(unknown) > 1:
        allowed += f" (also unknown: {', '.join(unknown[1:])})"
    return ArborConfigKeyError(key, kwargs[key], allowed, suggestion=suggestion)


def _real(field: str, value: Any, ok: Any, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ArborConfigError(field, value, f"must be {allowed}")


def _int_at_least(field: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ArborConfigError(field, value, f"must be an integer >= {low}")


def _positive_int(field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArborConfigError(field, value, "must be a positive integer")
