"""Settings the user types are strict, and every problem is found before any work, all at once.

``arbor train --check`` (and the start of every run) reads the settings and runs
`arbor.training.preflight.check_run` before data is read or a tokenizer trained. Each case here
was accepted, misread, or refused only after hours of work before; each now fails in one line
that names the setting, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from arbor.cli import main
from arbor.model.config import ArborConfig
from arbor.training.card_config import FOREIGN_NAMES
from arbor.training.config import TrainConfig
from arbor.training.preflight import BPE_MIN_VOCAB, RunCheckError, check_run, validate_run_settings


def check(tmp_path, capsys, *settings: str) -> tuple[int, str]:
    """``arbor train --check --set S ...`` in a fresh run directory: exit code and the one error line."""
    argv = ["train", "--out", str(tmp_path / "run"), "--check"]
    for setting in settings:
        argv += ["--set", setting]
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    errors = [line for line in captured.err.strip().splitlines() if not line.startswith(("note:", "warning:"))]
    if code == 0:
        assert not errors, captured.err
        return code, ""
    assert len(errors) == 1, captured.err
    return code, errors[0]


def problems(settings: dict) -> list[str]:
    """Every problem `validate_run_settings` (pydantic's checks, then `check_run`) finds in ``settings``."""
    try:
        check_run(validate_run_settings(settings))
    except RunCheckError as exc:
        return exc.problems
    return []


# ------------------------------------------------------------- other trainers' names
@pytest.mark.parametrize(("name", "whose", "arbor"), [
    ("learning_rate", "Hugging Face", "lr"),
    ("per_device_train_batch_size", "Hugging Face", "batch_size"),
    ("gradient_accumulation_steps", "Hugging Face", "grad_accum"),
    ("max_grad_norm", "Hugging Face", "grad_clip"),
    ("eval_steps", "Hugging Face", "eval_interval"),
    ("save_steps", "Hugging Face", "save_interval"),
    ("logging_steps", "Hugging Face", "log_interval"),
    ("max_iters", "nanoGPT", "max_steps"),
    ("num_train_steps", "nanoGPT", "max_steps"),
    ("block_size", "nanoGPT", "seq_len"),
    ("warmup_iters", "nanoGPT", "warmup_steps"),
    ("n_layer", "nanoGPT", "model.num_hidden_layers"),
])
def test_another_trainers_name_is_refused_with_arbors(tmp_path, capsys, name, whose, arbor):
    code, error = check(tmp_path, capsys, f"{name}=3")
    assert code == 2
    assert f"{name}: unknown setting; `{name}` is the {whose} name, arbor's is `{arbor}`" in error


def test_every_foreign_name_leads_to_a_setting_that_exists():
    model_fields = {f.name for f in dataclasses.fields(ArborConfig)}
    for name, (_, arbor, _) in FOREIGN_NAMES.items():
        assert name not in TrainConfig.model_fields, name  # arbor's own name is never refused
        if arbor.startswith("model."):
            assert arbor.removeprefix("model.") in model_fields, name
        else:
            assert arbor in TrainConfig.model_fields, name


def test_other_near_misses_get_a_hint(tmp_path, capsys):
    assert "num_train_epochs: unknown setting; `num_train_epochs` is a Hugging Face setting arbor has no " \
           "equivalent for: arbor trains for a number of optimizer steps; set max_steps" in \
           check(tmp_path, capsys, "num_train_epochs=3")[1]
    assert "hidden_size: unknown setting; did you mean model.hidden_size?" in check(tmp_path, capsys,
                                                                                    "hidden_size=64")[1]
    assert "lrr: unknown setting; did you mean lr?" in check(tmp_path, capsys, "lrr=0.1")[1]


def test_names_arbor_shares_with_hugging_face_are_taken(tmp_path, capsys):
    assert check(tmp_path, capsys, "weight_decay=0.01", "seed=3", "warmup_steps=5", "max_steps=50")[0] == 0


# ------------------------------------------------------------------------ strict types
@pytest.mark.parametrize(("setting", "fragments"), [
    ("max_steps=true", ["max_steps: Input should be a valid integer", "got True"]),
    ("lr=true", ["lr: Input should be a valid number", "got True"]),
    ('lr="1e-3"', ["lr: Input should be a valid number", "got '1e-3': write it as a number without quotes"]),
    ('bf16="false"', ["bf16: Input should be a valid boolean", "got 'false': write false without quotes"]),
    ('seq_len="64"', ["seq_len: Input should be a valid integer", "got '64'"]),
    ("growth.warmup_steps=false", ["growth.warmup_steps: Input should be a valid integer", "got False"]),
    ("growth.exact_tolerance=true", ["growth.exact_tolerance: Input should be a valid number"]),
    ('growth.enabled="no"', ["growth.enabled: Input should be a valid boolean", "got 'no'"]),
    ('betas=["0.9", 0.95]', ["betas.0: Input should be a valid number", "got '0.9'"]),
    ('growth.stages=[{"lr_scale": true}]', ["growth.stages: stage 0: lr_scale=True must be a number, not a bool"]),
    ('model.tie_word_embeddings="false"',
     ["model.tie_word_embeddings='false' is invalid: must be true or false (a boolean)"]),
    ('model.use_cache="yes"', ["model.use_cache='yes' is invalid: must be true or false"]),
    ('model.rms_norm_eps="1e-5"', ["model.rms_norm_eps='1e-5' is invalid: must be a finite number > 0"]),
    ("model.attention_dropout=true", ["model.attention_dropout=True is invalid: must be a number in [0, 1)"]),
    ("model.hidden_size=true", ["model.hidden_size=True is invalid: must be a positive integer"]),
    ("model.preset=[]", ["model.preset=[] is invalid: must be one of"]),
    ('model.hidden_act=["silu"]', ["model.hidden_act=['silu'] is invalid: must be one of"]),
    ("model.dtype=float17", ["model.dtype='float17' is invalid: transformers cannot read it"]),
])
def test_a_value_of_the_wrong_type_is_refused_not_converted(tmp_path, capsys, setting, fragments):
    code, error = check(tmp_path, capsys, setting)
    assert code == 2
    for fragment in fragments:
        assert fragment in error, error


def test_an_int_for_a_float_stays_accepted(tmp_path, capsys):
    assert check(tmp_path, capsys, "lr=1", "weight_decay=0", "grad_clip=2", "betas=[0, 0.5]",
                 "model.initializer_range=0", "model.rms_norm_eps=1", "growth.exact_tolerance=1")[0] == 0


def test_saved_settings_validate_again():
    # What a run writes to train_config.json (betas as a JSON list) is read back by --resume.
    config = TrainConfig.model_validate({"betas": [0.8, 0.9], "growth": {"stages": [{}, {"lr_scale": 2}]}})
    saved = json.loads(json.dumps(config.model_dump(mode="json")))
    assert TrainConfig.model_validate(saved) == config


# --------------------------------------------------------------- values out of range
@pytest.mark.parametrize("value", ["NaN", "-0.5", "Infinity", "-Infinity"])
def test_initializer_range_must_be_finite_and_not_negative(tmp_path, capsys, value):
    code, error = check(tmp_path, capsys, f"model.initializer_range={value}")
    shown = repr(float(value)) if math.isfinite(float(value)) else str(float(value))
    assert code == 2 and f"model.initializer_range={shown} is invalid: must be a finite number >= 0" in error


@pytest.mark.parametrize("device", ["meta", "xpu", "hpu:0"])
def test_a_device_arbor_does_not_train_on_is_refused(tmp_path, capsys, device):
    code, error = check(tmp_path, capsys, f"device={device}")
    assert code == 2 and f"device='{device}': arbor trains on cpu, cuda, cuda:N or mps" in error


# ----------------------------------------- problems that were found only after the work
@pytest.mark.parametrize(("setting", "fragment"), [
    ("betas=[1.0, 0.95]", "betas.0: Input should be less than 1 (got 1.0)"),
    ("betas=[0.9, -0.1]", "betas.1: Input should be greater than or equal to 0 (got -0.1)"),
    ("vocab_size=100", "vocab_size=100: a byte-level BPE needs at least 259 tokens"),
    ("model.attn_implementation=fast", "model.attn_implementation='fast': not a known attention backend; "
                                       "valid names: eager"),
    ("sample_prompt=", "sample_prompt='': is empty"),
])
def test_a_problem_once_found_mid_run_is_found_by_the_check(tmp_path, capsys, setting, fragment):
    code, error = check(tmp_path, capsys, setting)
    assert code == 2 and fragment in error, error


def test_the_bpe_minimum_is_the_tokenizers():
    from arbor.training.tokenizer import TokenizerError, train_bpe

    texts = ["a small text to train on"] * 4
    with pytest.raises(TokenizerError):
        train_bpe(texts, vocab_size=BPE_MIN_VOCAB - 1)
    train_bpe(texts, vocab_size=BPE_MIN_VOCAB)


def test_a_small_vocabulary_is_fine_where_no_bpe_is_trained():
    # The unicode-glyphs substrate brings its own code-point tokenizer: vocab_size is not used.
    settings = {"vocab_size": 100, "model": {"preset": "tiny", "substrate": "unicode-glyphs"}}
    assert not any("vocab_size" in p for p in problems(settings))
    assert any("vocab_size=100" in p for p in problems({**settings, "tokenizer": "bpe"}))


def test_an_empty_prompt_is_fine_when_no_sample_is_taken():
    assert problems({"sample_prompt": "", "sample_tokens": 0}) == []


def _schedule(marks, num_layers, max_layers, max_steps=100):
    return {"max_steps": max_steps, "model": {"preset": "tiny", "num_hidden_layers": 2, "max_layers": max_layers},
            "growth": {"trigger": "schedule", "trigger_settings": {"steps": marks},
                       "step": {"axis": "depth", "num_layers": num_layers}}}


def test_a_schedule_that_grows_past_max_layers_is_refused(tmp_path, capsys):
    code, error = check(tmp_path, capsys, "model.max_layers=7", "growth.trigger=schedule",
                        'growth.trigger_settings={"steps": [10, 20, 30]}',
                        'growth.step={"axis": "depth", "num_layers": 2}')
    assert code == 2
    assert "growth: growth step 3 of the schedule (at step 30) would grow the model to 8 layers, past " \
           "model.max_layers=7 (it starts with 2)" in error


def test_the_depth_budget_counts_only_the_steps_the_run_takes():
    # 2 + 3 x 2 = 8 layers, one too many; but a mark at or past max_steps never fires (the trainer asks
    # the trigger after each step before the last).
    assert problems(_schedule([10, 20, 30], 2, 7)) != []
    assert problems(_schedule([10, 20, 100], 2, 7)) == []
    assert problems(_schedule([10, 20, 99], 2, 7)) != []
    assert problems(_schedule([10, 20, 30], 2, 8)) == []
    # An FFN step adds no layer; a per-mark list is read entry by entry.
    settings = _schedule([10, 20, 30], 2, 6)
    settings["growth"]["trigger_settings"]["growth"] = [
        {"axis": "depth", "num_layers": 2}, {"axis": "ffn", "factor": 2.0}, {"axis": "depth", "num_layers": 2}]
    assert problems(settings) == []
    # Without a step anywhere, the default step (4 layers) is what grows.
    settings = _schedule([10], 2, 5)
    del settings["growth"]["step"]
    settings["growth"]["trigger_settings"]["growth"] = None
    assert any("6 layers, past model.max_layers=5" in p for p in problems(settings))


def test_the_default_run_and_a_tokens_schedule_fit():
    assert problems({}) == []
    tokens = _schedule([0], 2, 4)
    tokens["growth"]["trigger_settings"] = {"tokens": [1, 2, 3]}  # one mark per step: steps 1, 2 and 3
    assert any("would grow the model to 6 layers" in p for p in problems(tokens))


# ------------------------------------------------------------------- all at once
FIVE = {"lr": -1, "betas": [2, 0.9], "model": {"preset": "tiny", "num_hiden_layers": 4},
        "growth": {"init": "nope"}, "device": "meta"}
FIVE_FRAGMENTS = ["lr: Input should be greater than 0", "betas.0: Input should be less than 1",
                  "model.num_hiden_layers=4", "growth.init='nope'", "device='meta'"]


def test_five_problems_are_reported_together():
    with pytest.raises(RunCheckError) as info:
        validate_run_settings(FIVE)
    message = str(info.value)
    assert "\n" not in message and len(info.value.problems) == 5, info.value.problems
    for fragment in FIVE_FRAGMENTS:
        assert fragment in message, message


def test_a_setting_left_at_its_default_for_the_other_checks_raises_no_problem_of_its_own():
    # seq_len is refused for its type; its default (128) would not fit 64 positions, but is not reported.
    found = problems({"seq_len": True, "model": {"preset": "tiny", "max_position_embeddings": 64}, "device": "meta"})
    assert len(found) == 2 and found[0].startswith("seq_len: Input should be a valid integer") and \
        found[1].startswith("device='meta'"), found


def test_the_cli_reports_every_type_and_range_problem_at_once(tmp_path, capsys):
    code, error = check(tmp_path, capsys, "lr=-1", "betas=[2, 0.9]", "max_steps=true", "learning_rate=1")
    assert code == 2
    for fragment in ("lr: Input", "betas.0:", "max_steps:", "`learning_rate` is the Hugging Face name"):
        assert fragment in error, error


def test_the_cli_reports_five_problems_of_both_kinds_at_once(tmp_path, capsys):
    code, error = check(tmp_path, capsys, "lr=-1", "betas=[2, 0.9]", "model.preset=tiny", "model.num_hiden_layers=4",
                        "growth.init=nope", "device=meta")
    assert code == 2
    for fragment in FIVE_FRAGMENTS:
        assert fragment in error, error


# --------------------------------------------------------- a plugin failing to check
PICKY_PLUGIN = """
import arbor_plugins


class Picky(arbor_plugins.Trigger):
    def validate_settings(self, settings):
        raise TypeError("settings must be frozen")

    def start(self, model, settings):
        raise AssertionError("never started")


@arbor_plugins.hookimpl
def arbor_register(registry):
    registry.register("trigger", "picky", Picky())
"""


@pytest.fixture
def picky_plugin(site):
    site("pickyplug", PICKY_PLUGIN, version="0.2")


def test_a_plugin_whose_settings_check_raises_is_named_in_one_line(picky_plugin, tmp_path, capsys):
    code, error = check(tmp_path, capsys, "growth.trigger=picky", "device=meta")
    assert code == 2
    assert "growth.trigger_settings: plugin 'pickyplug' 0.2" in error and \
        "failed in trigger 'picky'.validate_settings(): TypeError: settings must be frozen" in error, error
    assert "device='meta'" in error  # the other problems are still reported


def test_a_plugins_toml_choosing_that_plugin_is_one_line_too(picky_plugin, tmp_path, capsys):
    plugins = tmp_path / "plugins.toml"
    plugins.write_text('[trigger]\nname = "picky"\n')
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--check", "--plugins", str(plugins)]) == 2
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and "Traceback" not in captured.err
    assert "[trigger] plugin 'pickyplug' 0.2" in errors[0] and "TypeError: settings must be frozen" in errors[0]


def test_yaml_exponent_numbers_are_numbers(tmp_path):
    from arbor.cli.main import build_parser
    from arbor.cli.train import build_config

    path = tmp_path / "run.yaml"
    path.write_text("lr: 2e-3\nmin_lr_ratio: 1E-1\nsample_prompt: 1e5x\n")
    config = build_config(build_parser().parse_args(["train", str(path)]))
    assert config.lr == 2e-3 and config.min_lr_ratio == 0.1 and config.sample_prompt == "1e5x"
