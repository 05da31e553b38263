"""The ``arbor`` command line, run in-process through ``main`` and once as a real program."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from arbor.cli import COMMANDS, main
from arbor.model.config import PRESETS, ArborConfig
from arbor import ArborForCausalLM, count_parameters
from arbor.plugins import reset_plugins
from test_plugins import REGISTERING_PLUGIN, make_dist


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch, fresh_plugins):
    """No plugins.toml from the repository, no plugin environment, fresh plugin state."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """An installed third-party plugin ``fakeplug`` registering attention backend ``fake-attn``."""
    import importlib

    root = tmp_path / "site"
    root.mkdir()
    module = make_dist(root, "fakeplug", REGISTERING_PLUGIN.format(name="fake-attn"))
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    reset_plugins()
    yield root
    sys.modules.pop(module, None)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code, out, err, *fragments):
    assert code == 2
    assert err.startswith("arbor: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""
    for fragment in fragments:
        assert fragment in err


@pytest.mark.parametrize("argv", [[], *([name] for name in COMMANDS)])
def test_help_everywhere(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert "usage: arbor" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("arbor 0.1")


def test_plugins_lists_builtin_backends(capsys):
    code, out, err = run(capsys, "plugins")
    assert code == 0, err
    assert "arbor-lm (attention)" in out
    for backend in ("eager", "sdpa", "flex", "flash-attn"):
        assert f"attention_backend:{backend}" in out


def test_plugins_json_lists_third_party(capsys, fake_site):
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 0
    infos = {i["distribution"]: i for i in json.loads(out) if not i["builtin"]}
    assert infos["fakeplug"]["version"] == "0.1"
    assert infos["fakeplug"]["components"] == [{"kind": "attention_backend", "name": "fake-attn"}]


def test_plugins_json_in_a_subprocess(fake_site):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake_site), os.environ.get("PYTHONPATH", "")])}
    env.pop("ARBOR_LOAD_PLUGINS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "arbor.cli", "plugins", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "fakeplug" in {i["distribution"] for i in json.loads(proc.stdout)}


def test_plugins_shows_failed_plugin(capsys, fake_site):
    (fake_site / "fakeplug_mod.py").write_text("raise ImportError('needs libfoo')\n")
    with pytest.warns(UserWarning, match="fakeplug"):
        code, out, _ = run(capsys, "plugins")
    assert code == 0
    assert "FAILED" in out and "ImportError: needs libfoo" in out


def test_plugins_checks_plugins_toml(capsys, tmp_path):
    (tmp_path / "plugins.toml").write_text('[attention_backend]\nname = "eager"\n')
    code, out, _ = run(capsys, "plugins")
    assert code == 0 and "plugins.toml: ok" in out and "attention_backend = eager" in out

    other = tmp_path / "other.toml"
    other.write_text('[attention_backend]\nname = "fast"\n')
    code, out, err = run(capsys, "plugins", "--plugins", str(other))
    assert_usage_error(code, out, err, "other.toml", "'fast'", "valid names", "'sdpa'")


def test_plugins_missing_file(capsys):
    assert_usage_error(*run(capsys, "plugins", "--plugins", "missing.toml"), "missing.toml")


def test_presets_table(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0
    for name in PRESETS:
        assert name in out
    assert f"{count_parameters(ArborConfig.from_preset('tiny')):,}" in out


def test_presets_json_counts_are_true(capsys):
    code, out, _ = run(capsys, "presets", "tiny", "--json")
    assert code == 0
    (record,) = json.loads(out)
    config = ArborConfig.from_preset("tiny")
    model = ArborForCausalLM(config)  # tiny: the real model is cheap enough to count
    assert record["parameters"] == sum(p.numel() for p in model.parameters())
    assert (record["layers"], record["hidden_size"], record["heads"], record["kv_heads"]) == (2, 64, 4, 2)
    assert (record["ffn"], record["vocab"], record["positions"]) == (128, 512, 512)


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["presets", "nope"], ["unknown preset 'nope'", "tiny"]),
        (["presets", "--bogus"], ["unrecognized arguments: --bogus", "arbor presets --help"]),
        (["frobnicate"], ["invalid choice"]),
    ],
)
def test_bad_input_is_one_line(capsys, argv, fragments):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors exit from inside parse_args
        code = exc.code
    out, err = capsys.readouterr()
    assert_usage_error(code, out, err, *fragments)


# ------------------------------------------------------------ train's model table
@pytest.mark.parametrize(("setting", "fragments"), [
    ("model.num_layers=8", ["model.num_layers=8", "did you mean model.num_hidden_layers?"]),
    ("model.n_head=4", ["model.n_head=4", "did you mean model.num_attention_heads?"]),
    ("model.presett=tiny", ["model.presett='tiny'", "did you mean model.preset?"]),
    ("model.colour=1", ["model.colour=1", "not a model setting", "preset"]),
    ("model.attention_bias=true", ["model.attention_bias=True", "arbor does not support it"]),
    ("model.vocab_size=100", ["model.vocab_size=100", "top-level vocab_size"]),
    ("model.eos_token_id=3", ["model.eos_token_id=3", "tokenizer"]),
])
def test_train_refuses_a_bad_model_setting_before_any_work(capsys, tmp_path, setting, fragments):
    code, out, err = run(capsys, "train", "--set", setting, "--out", str(tmp_path / "run"))
    assert_usage_error(code, out, err, *fragments)  # out == "": no data was read, no tokenizer trained
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_typo_in_the_config_files_model_table(capsys, tmp_path):
    (tmp_path / "run.toml").write_text('max_steps = 5\n\n[model]\npreset = "tiny"\nnum_hiden_layers = 4\n')
    code, out, err = run(capsys, "train", str(tmp_path / "run.toml"), "--out", str(tmp_path / "run"))
    assert_usage_error(code, out, err, "model.num_hiden_layers=4", "did you mean model.num_hidden_layers?")
    assert not (tmp_path / "run").exists()



@pytest.mark.parametrize("module", ["arbor", "arbor.cli"])
def test_python_dash_m_knows_every_command(module):
    proc = subprocess.run([sys.executable, "-m", module, "train", "--check", "--set", "max_steps=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ok: the run's settings are valid" in proc.stdout
