"""`ArborConfig` cannot be misread: unknown keys are refused, and its defaults are LlamaConfig's.

The same keywords given to `ArborConfig` and to `LlamaConfig` must describe
the very same function; a keyword `ArborConfig` does not know must stop the
program with the name of the field it most likely meant, not leave a default
in place; and every key transformers itself writes into a config must still
load.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedConfig

from arbor import ArborConfig, ArborConfigError, ArborForCausalLM
from arbor.model.config import KEY_ALIASES, PRESETS, ArborConfigKeyError, closest_field

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


def arbor_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(ArborConfig)}


def llama_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(LlamaConfig)}


# ------------------------------------------------------------ same function
@pytest.mark.parametrize("kwargs", [
    pytest.param({}, id="sizes-only"),  # rms_norm_eps, rope, kv heads, head_dim all from the defaults
    pytest.param(dict(num_key_value_heads=2, tie_word_embeddings=True), id="gqa-tied"),
    pytest.param(dict(num_key_value_heads=1, rope_theta=500.0), id="mqa-rope_theta"),
    pytest.param(dict(hidden_size=24, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                      rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 4.0}),
                 id="head_dim-linear-rope"),
    pytest.param(dict(rms_norm_eps=1e-5, tie_word_embeddings=False, num_hidden_layers=3), id="explicit-eps"),
    pytest.param(dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=300.0), id="legacy-rope"),
])
def test_same_keywords_give_exactly_llamas_function(kwargs):
    kwargs = {**SMALL, **kwargs}
    torch.manual_seed(0)
    arbor = ArborForCausalLM._from_config(ArborConfig(**kwargs), attn_implementation="eager").eval()
    with torch.no_grad():  # larger weights than the default init, so any difference would show
        for p in arbor.parameters():
            p.normal_(0.0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    llama = LlamaForCausalLM._from_config(LlamaConfig(**kwargs), attn_implementation="eager").eval()
    missing, unexpected = llama.load_state_dict(arbor.state_dict(), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    ids = torch.randint(0, kwargs["vocab_size"], (2, 13))
    with torch.no_grad():
        a, b = arbor(ids).logits, llama(ids).logits
    assert a.dtype == b.dtype == torch.float32
    assert torch.equal(a, b), (a - b).abs().max()


def test_shared_defaults_are_llamas():
    arbor, llama = ArborConfig(), LlamaConfig()
    shared = sorted(arbor_fields() & llama_fields())
    for name in ("rms_norm_eps", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings", "bos_token_id", "eos_token_id",
                 "rope_parameters", "tie_word_embeddings", "vocab_size"):
        assert name in shared
    assert {n: getattr(arbor, n) for n in shared} == {n: getattr(llama, n) for n in shared}


def test_llama_to_dict_builds_the_same_config():
    llama = LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True)
    arbor = ArborConfig(**llama.to_dict())
    assert arbor.model_type == "arbor" and arbor.to_dict()["model_type"] == "arbor"
    shared = arbor_fields() & llama_fields() - {"transformers_version"}
    assert {n: getattr(arbor, n) for n in shared} == {n: getattr(llama, n) for n in shared}
    assert not set(arbor.to_dict()) & {"attention_bias", "mlp_bias", "pretraining_tp"}


def test_presets_keep_their_own_settings():
    # A preset names every setting it does not mean to take from the (LlamaConfig) defaults.
    for name, fields in PRESETS.items():
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "rope_parameters", "rms_norm_eps",
                    "tie_word_embeddings", "bos_token_id", "eos_token_id"):
            assert key in fields, (name, key)
        config = ArborConfig.from_preset(name)
        assert config.rms_norm_eps == 1e-5 and config.bos_token_id is None and config.eos_token_id is None


# --------------------------------------------------------------- unknown keys
@pytest.mark.parametrize(("key", "meant"), [
    ("num_layers", "num_hidden_layers"),
    ("num_hiden_layers", "num_hidden_layers"),
    ("n_layer", "num_hidden_layers"),
    ("n_layers", "num_hidden_layers"),
    ("d_model", "hidden_size"),
    ("n_embd", "hidden_size"),
    ("hiden_size", "hidden_size"),
    ("n_head", "num_attention_heads"),
    ("num_kv_heads", "num_key_value_heads"),
    ("ffn_dim", "intermediate_size"),
    ("d_ff", "intermediate_size"),
    ("n_positions", "max_position_embeddings"),
    ("max_seq_len", "max_position_embeddings"),
    ("layer_norm_eps", "rms_norm_eps"),
    ("rope_base", "rope_theta"),
    ("tie_embeddings", "tie_word_embeddings"),
    ("rope_parameter", "rope_parameters"),
])
def test_unknown_key_names_it_and_the_field_meant(key, meant):
    with pytest.raises(ArborConfigKeyError) as info:
        ArborConfig(**SMALL, **{key: 8})
    message = str(info.value)
    assert f"ArborConfig.{key}=8" in message and f"did you mean {meant}?" in message, message
    assert (info.value.field, info.value.value, info.value.suggestion) == (key, 8, meant)
    assert isinstance(info.value, ArborConfigError) and isinstance(info.value, ValueError)


def test_aliases_point_at_fields_or_accepted_keys():
    accepted = arbor_fields() | {"rope_theta", "rope_scaling"}
    assert set(KEY_ALIASES.values()) <= accepted
    assert not set(KEY_ALIASES) & accepted  # an alias never shadows a real key


def test_unknown_key_without_a_close_field_lists_the_fields():
    with pytest.raises(ArborConfigKeyError, match=r"ArborConfig.colour='red' is invalid: .*hidden_size") as info:
        ArborConfig(**SMALL, colour="red")
    assert info.value.suggestion is None and closest_field("colour") is None


def test_every_unknown_key_is_named():
    with pytest.raises(ArborConfigKeyError, match=r"n_head=4 .*also unknown: n_layer"):
        ArborConfig(**SMALL, n_head=4, n_layer=2)


def test_keys_are_checked_before_values():
    # n_head leaves num_attention_heads at its default (32), which gives an odd head_dim of 3;
    # the message must be about the key that was meant, not about the default.
    with pytest.raises(ArborConfigKeyError, match="did you mean num_attention_heads"):
        ArborConfig(hidden_size=96, n_head=3)


def test_transformers_standard_keys_are_accepted():
    # Everything transformers writes for every config ...
    written = PreTrainedConfig().to_dict()
    assert ArborConfig(**{**written, **SMALL}).to_diff_dict() == ArborConfig(**SMALL).to_diff_dict()
    # ... and what it takes as keywords on any config, generation settings it still tolerates included.
    generation = {k: GenerationConfig().to_dict()[k] for k in ("max_length", "do_sample", "temperature", "num_beams")}
    config = ArborConfig(
        **SMALL, **generation, torch_dtype="bfloat16", attn_implementation="eager",
        name_or_path="somewhere", _commit_hash="abc", num_labels=3, output_attentions=False,
        output_hidden_states=True, return_dict=False, architectures=["ArborForCausalLM"],
        auto_map={"AutoConfig": "module.Config"}, quantization_config={"quant_method": "none"},
        _attn_implementation_internal="sdpa", transformers_version="5.0.0", chunk_size_feed_forward=0,
        is_encoder_decoder=False, problem_type=None, use_cache=False,
    )
    assert config.dtype == torch.bfloat16 and config._attn_implementation == "eager"
    assert config.num_labels == 3 and config.name_or_path == "somewhere" and config.output_hidden_states
    assert config.auto_map == {"AutoConfig": "module.Config"} and config.architectures == ["ArborForCausalLM"]
    assert not hasattr(config, "temperature") and config.use_cache is False


def test_read_only_transformers_attribute_is_refused():
    with pytest.raises(ArborConfigError, match="use_return_dict=False .*cannot be set"):
        ArborConfig(**SMALL, use_return_dict=False)


def test_per_layer_config_is_refused():
    with pytest.raises(ArborConfigError, match="per_layer_config=.*layer_intermediate_sizes"):
        ArborConfig(**SMALL, per_layer_config={0: {"intermediate_size": 8}})


def test_model_type_key_does_not_change_the_class():
    config = ArborConfig(**SMALL, model_type="llama")
    assert config.model_type == "arbor" and "model_type" not in config.__dict__


# ------------------------------------------------------------ Llama-only keys
def test_llama_only_fields_are_known():
    # A LlamaConfig field arbor does not have must be decided on here, not swallowed.
    assert llama_fields() - arbor_fields() == {"attention_bias", "mlp_bias", "pretraining_tp"}


@pytest.mark.parametrize(("key", "value"), [("attention_bias", True), ("mlp_bias", True), ("mlp_bias", 0),
                                            ("attention_bias", None)])
def test_llama_bias_keys_must_be_false(key, value):
    with pytest.raises(ArborConfigError, match=rf"{key}={value!r} is invalid: arbor does not support it; "
                                               r"only LlamaConfig's default False"):
        ArborConfig(**SMALL, **{key: value})


@pytest.mark.parametrize("tp", [1, 2, 8, None])
def test_llama_defaults_and_pretraining_tp_are_accepted_and_dropped(tp):
    # pretraining_tp changes nothing the installed Llama computes, so any value is Llama's function.
    config = ArborConfig(**SMALL, attention_bias=False, mlp_bias=False, pretraining_tp=tp)
    assert not {"attention_bias", "mlp_bias", "pretraining_tp"} & set(config.to_dict())


@pytest.mark.parametrize("tp", [0, -1, "2", True])
def test_bad_pretraining_tp_is_refused(tp):
    with pytest.raises(ArborConfigError, match="pretraining_tp=.*positive integer"):
        ArborConfig(**SMALL, pretraining_tp=tp)


# ----------------------------------------------------------------------- RoPE
def test_legacy_rope_keys_become_rope_parameters():
    assert ArborConfig(**SMALL, rope_theta=500.0).rope_parameters == {"rope_type": "default", "rope_theta": 500.0}
    scaling = {"type": "linear", "factor": 2.0}
    config = ArborConfig(**SMALL, rope_scaling=scaling, rope_theta=50.0)
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2.0
    assert config.rope_parameters["rope_theta"] == 50.0 and scaling == {"type": "linear", "factor": 2.0}
    assert ArborConfig(**SMALL, rope_scaling=None, rope_theta=7.0).rope_parameters["rope_theta"] == 7.0


def test_one_rope_setting_given_twice_is_refused():
    rope = {"rope_type": "default", "rope_theta": 10_000.0}
    with pytest.raises(ArborConfigError, match="rope_theta=5.0 is invalid: rope_parameters also gives"):
        ArborConfig(**SMALL, rope_parameters=rope, rope_theta=5.0)
    with pytest.raises(ArborConfigError, match="rope_scaling=.*old name of rope_parameters"):
        ArborConfig(**SMALL, rope_parameters=rope, rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert ArborConfig(**SMALL, rope_parameters=rope, rope_theta=10_000.0).rope_parameters == rope


# -------------------------------------------------------------- save and load
def test_save_and_load_round_trip(tmp_path):
    config = ArborConfig(**SMALL, num_key_value_heads=2, layer_intermediate_sizes=[48, 16],
                         growth={"axis": "ffn", "factor": 2.0}, attn_implementation="eager")
    config.save_pretrained(tmp_path)
    for loaded in (ArborConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is ArborConfig
        assert loaded.to_diff_dict() == config.to_diff_dict()
        assert ArborConfig(**loaded.to_dict()).to_dict() == loaded.to_dict()


def test_a_model_saves_and_loads(tmp_path):
    model = ArborForCausalLM(ArborConfig(**SMALL))
    model.save_pretrained(tmp_path)
    assert ArborForCausalLM.from_pretrained(tmp_path).config.to_diff_dict() == model.config.to_diff_dict()


def test_config_written_by_an_older_arbor_loads_unchanged(tmp_path):
    # What `save_pretrained` wrote before the defaults became LlamaConfig's: every field is written,
    # so the old epsilon and token ids come back as they were.
    old = {
        "architectures": ["ArborForCausalLM"], "attention_dropout": 0.0, "bos_token_id": None, "dtype": "float32",
        "eos_token_id": None, "growth": None, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
        "initializer_range": 0.02, "intermediate_size": 128, "layer_generations": [0, 0],
        "layer_intermediate_sizes": [128, 128], "layer_num_attention_heads": [4, 4],
        "layer_num_key_value_heads": [2, 2], "max_layers": 16, "max_position_embeddings": 512, "min_layers": 1,
        "model_type": "arbor", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "pad_token_id": None, "rms_norm_eps": 1e-05,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "substrate": "learned",
        "substrate_settings": {}, "tie_word_embeddings": True, "transformers_version": "5.0.0", "use_cache": True,
        "vocab_size": 512,
    }
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.rms_norm_eps == 1e-5 and config.bos_token_id is None and config.eos_token_id is None
    assert config.to_diff_dict() == ArborConfig.from_preset("tiny").to_diff_dict() | {
        "architectures": ["ArborForCausalLM"], "dtype": "float32"}


def test_a_saved_config_with_a_stray_key_does_not_load(tmp_path):
    ArborConfig(**SMALL).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "num_layers": 8}))
    with pytest.raises(ArborConfigKeyError, match="num_layers=8 .*did you mean num_hidden_layers"):
        AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(("rope", "field"), [
    ({"rope_type": "default", "rope_theta": -5.0}, "rope_parameters.rope_theta"),
    ({"rope_type": "default", "rope_theta": float("inf")}, "rope_parameters.rope_theta"),
    ({"rope_type": "linear", "rope_theta": 10_000.0, "factor": 0.0}, "rope_parameters.factor"),
])
def test_rope_numbers_must_be_finite_and_positive(rope, field):
    with pytest.raises(ArborConfigError, match=field.replace(".", r"\.")):
        ArborConfig.from_preset("tiny", rope_parameters=rope)
