"""The plugin manager, the registry it builds, attention backends and plugins.toml.

Third-party plugins are real distributions written to a temporary directory
(a ``*.dist-info`` folder with ``entry_points.txt`` next to the module), so the
entry-point path under test is the one ``pip install`` would create.
"""

from __future__ import annotations

import sys
import textwrap
import warnings

import pytest

import arbor_plugins
from arbor.model import attention
from arbor.plugins import (
    ArborPluginWarning,
    PluginLoadError,
    call_hook,
    get_plugin_manager,
    get_registry,
    has_hook_impls,
    plugin_infos,
    reset_plugins,
)
from arbor.plugins.selection import PluginsConfigError, load_plugins_toml
from arbor_plugins import ComponentConflictError
from arbor_plugins.settings import PluginsFileError, parse_plugins_toml

REGISTERING_PLUGIN = """
import arbor_plugins

class Backend(arbor_plugins.AttentionBackend):
    implementation = "sdpa"

@arbor_plugins.hookimpl
def arbor_register(registry):
    registry.register("attention_backend", {name!r}, Backend())
"""


def make_dist(root, dist, code, *, module=None, entry_point=None, version="0.1"):
    """Write an installed distribution ``dist`` whose ``arbor`` entry point names ``module``."""
    module = module or f"{dist.replace('-', '_')}_mod"
    entry_point = entry_point or dist
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[arbor]\n{entry_point} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(code))
    return module


@pytest.fixture(autouse=True)
def _fresh(fresh_plugins):
    """Every test starts and ends with no cached plugins and default environment."""


def names(kind="attention_backend"):
    return get_registry().names(kind)


# ---------------------------------------------------------------- built-ins
def test_builtins_load_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reg = get_registry()
    assert {"eager", "sdpa", "flex", "flash-attn"} <= set(reg.names("attention_backend"))
    assert "learned" in reg.names("substrate")
    infos = {i["entry_point"]: i for i in plugin_infos() if i["builtin"]}
    assert infos["attention"]["distribution"] == "arbor-lm"
    assert infos["attention"]["hooks"] == ["arbor_register"]
    assert {"kind": "attention_backend", "name": "sdpa"} in infos["attention"]["components"]
    # Several entry points in one distribution: each is named after its entry point.
    assert next(reg.entries("attention_backend")).plugin == "arbor-lm (attention)"


def test_resolve_attn_implementation(monkeypatch):
    import torch

    assert attention.resolve_attn_implementation(None) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # flex is refused on CPU-only machines
    assert attention.resolve_attn_implementation("flex") == "flex_attention"
    assert attention.resolve_attn_implementation("flex_attention") == "flex_attention"
    monkeypatch.undo()
    assert attention.resolve_attn_implementation("eager") == "eager"
    assert attention.resolve_attn_implementation("sdpa") == "sdpa"
    with pytest.raises(ValueError, match=r"attn_implementation='flsh'.*valid names:.*flash-attn.*sdpa"):
        attention.resolve_attn_implementation("flsh")


def test_resolve_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setattr(attention.FlashAttention2, "is_available", lambda self: (False, "no flash_attn here"))
    with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2'.*no flash_attn here"):
        attention.resolve_attn_implementation("flash_attention_2")


def test_hook_helpers():
    assert has_hook_impls("arbor_register")
    assert has_hook_impls("arbor_pre_forward_stats")  # the built-in statistics collector
    assert not has_hook_impls("arbor_rope_config")  # no built-in changes RoPE
    assert call_hook("arbor_rope_config", config=None, rope_parameters={}) is None
    with pytest.raises(ValueError, match="unknown hook 'arbor_nope'.*arbor_register"):
        has_hook_impls("arbor_nope")


# --------------------------------------------------------- third-party plugins
def test_third_party_plugin_registers_and_is_listed(site):
    site("fakeplug", REGISTERING_PLUGIN.format(name="fake-attn"))
    assert "fake-attn" in names()
    (info,) = [i for i in plugin_infos() if i["distribution"] == "fakeplug"]
    assert info == {
        "distribution": "fakeplug",
        "version": "0.1",
        "entry_point": "fakeplug",
        "module": "fakeplug_mod",
        "hooks": ["arbor_register"],
        "components": [{"kind": "attention_backend", "name": "fake-attn"}],
        "builtin": False,
    }
    # A plugin's backend resolves like a built-in one.
    assert attention.resolve_attn_implementation("fake-attn") == "sdpa"


def test_third_party_plugin_receives_other_hooks(site):
    site(
        "fakeplug",
        """
        import arbor_plugins
        seen = []

        @arbor_plugins.hookimpl
        def arbor_freeze(model, names, frozen):
            seen.append((names, frozen))
        """,
    )
    assert has_hook_impls("arbor_freeze")
    call_hook("arbor_freeze", model=None, names=["w"], frozen=True)
    assert sys.modules["fakeplug_mod"].seen == [(["w"], True)]


def test_broken_plugin_warns_once_and_builtins_survive(site):
    site("fakeplug", "raise ImportError('needs libfoo')")
    with pytest.warns(ArborPluginWarning) as record:
        reg = get_registry()
    ours = [w for w in record if "fakeplug" in str(w.message)]
    assert len(ours) == 1 and len(record) == 1
    assert "ImportError: needs libfoo" in str(ours[0].message)
    assert "sdpa" in reg.names("attention_backend") and "learned" in reg.names("substrate")
    (failed,) = [i for i in plugin_infos() if "error" in i]
    assert failed["distribution"] == "fakeplug" and "needs libfoo" in failed["error"]


def test_plugin_whose_register_raises_is_skipped(site):
    site(
        "fakeplug",
        """
        import arbor_plugins

        @arbor_plugins.hookimpl
        def arbor_register(registry):
            registry.register("substrate", "half-done", arbor_plugins.Substrate())
            raise RuntimeError("boom")
        """,
    )
    with pytest.warns(ArborPluginWarning, match=r"fakeplug.*arbor_register: RuntimeError: boom"):
        reg = get_registry()
    assert "half-done" not in reg.names("substrate")  # nothing left behind
    assert not any(i["distribution"] == "fakeplug" and "error" not in i for i in plugin_infos())


def test_plugin_registering_a_non_component_is_skipped_and_named(site):
    site(
        "fakeplug",
        """
        import arbor_plugins

        @arbor_plugins.hookimpl
        def arbor_register(registry):
            registry.register("trigger", "not-a-trigger", object())
        """,
    )
    with pytest.warns(ArborPluginWarning, match=r"fakeplug.*'not-a-trigger'.*not an instance of arbor_plugins.Trigger"):
        reg = get_registry()
    assert "not-a-trigger" not in reg.names("trigger")


def test_plugin_with_misspelled_hook_is_skipped(site):
    site("fakeplug", "import arbor_plugins\n@arbor_plugins.hookimpl\ndef arbor_registr(registry): pass\n")
    with pytest.warns(ArborPluginWarning, match="unknown hook.*arbor_registr.*valid hooks"):
        get_plugin_manager()


def test_strict_mode_covers_arbor_register(site, monkeypatch):
    site("fakeplug", "import arbor_plugins\n@arbor_plugins.hookimpl\ndef arbor_register(registry): 1 / 0\n")
    monkeypatch.setenv("ARBOR_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError, match="fakeplug.*arbor_register: ZeroDivisionError"):
        get_registry()


@pytest.mark.parametrize("how", ["env", "argument"])
def test_strict_mode_raises(site, monkeypatch, how):
    site("fakeplug", "1 / 0")
    if how == "env":
        monkeypatch.setenv("ARBOR_STRICT_PLUGINS", "1")
        call = get_registry
    else:
        call = lambda: get_plugin_manager(strict=True)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # strict: an error, not a warning
        with pytest.raises(PluginLoadError, match="fakeplug.*ZeroDivisionError: division by zero"):
            call()


def test_strict_argument_after_lenient_load(site):
    site("fakeplug", "1 / 0")
    with pytest.warns(ArborPluginWarning):
        get_plugin_manager()
    with pytest.raises(PluginLoadError, match="fakeplug"):
        get_plugin_manager(strict=True)


def test_name_conflict_names_both_distributions(site):
    site("fakeplug", REGISTERING_PLUGIN.format(name="same"))
    site("otherplug", REGISTERING_PLUGIN.format(name="same"))
    with pytest.raises(ComponentConflictError, match=r"'fakeplug'.*'otherplug'"):
        get_registry()


def test_conflict_with_builtin_is_an_error_too(site):
    site("fakeplug", REGISTERING_PLUGIN.format(name="sdpa"))
    with pytest.raises(ComponentConflictError, match=r"arbor-lm \(attention\).*fakeplug"):
        get_registry()


def test_allow_list(site, monkeypatch):
    site("fakeplug", REGISTERING_PLUGIN.format(name="one"))
    site("otherplug", REGISTERING_PLUGIN.format(name="two"))
    monkeypatch.setenv("ARBOR_LOAD_PLUGINS", "")
    assert not {"one", "two"} & set(names()) and "sdpa" in names()

    reset_plugins()
    monkeypatch.setenv("ARBOR_LOAD_PLUGINS", "otherplug")
    assert "two" in names() and "one" not in names() and "sdpa" in names()

    reset_plugins()
    monkeypatch.setenv("ARBOR_LOAD_PLUGINS", "fakeplug, not-installed")
    with pytest.warns(ArborPluginWarning, match="'not-installed', which is not installed"):
        assert "one" in names() and "two" not in names()


# ------------------------------------------------------------- plugins.toml
def write(tmp_path, text):
    path = tmp_path / "plugins.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_plugins_toml_valid(tmp_path):
    sel = load_plugins_toml(write(tmp_path, '[substrate]\nname = "learned"\n[attention_backend]\nname = "flex"\n'))
    assert sel.name("attention_backend") == "flex"
    assert sel.component("attention_backend").implementation == "flex_attention"
    assert sel.settings("substrate") is not None
    assert sel.name("trigger") is None and sel.component("trigger") is None
    with pytest.raises(ValueError, match="unknown role 'triger'"):
        sel.name("triger")


def test_plugins_toml_absent_means_empty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not load_plugins_toml()
    write(tmp_path, 'attention_backend = "eager"\n')  # shorthand, found in the working directory
    assert load_plugins_toml().name("attention_backend") == "eager"


def test_repo_plugins_toml_loads():
    from pathlib import Path

    sel = load_plugins_toml(Path(__file__).parents[1] / "plugins.toml")
    assert sel.name("attention_backend") == "sdpa" and sel.name("substrate") == "learned"


@pytest.mark.parametrize(
    "text, pattern",
    [
        ('[attenton_backend]\nname = "sdpa"\n', r"unknown role 'attenton_backend'; valid roles: trigger, .*rope_"),
        ('[attention_backend]\nname = "fast"\n', r"attention_backend.name: unknown attention_backend 'fast'; "
         r"valid names: 'eager', 'flash-attn', 'flex', 'sdpa'"),
        ('[attention_backend]\nname = "sdpa"\nblock = 64\n', r"attention_backend.block: unknown setting; "
         r"this component takes no settings"),
        ('[attention_backend]\nblock = 64\n', r"attention_backend.name: missing"),
        ('[substrate]\nname = "learned"\n\n[attention_backend\nname = "x"\n', r"invalid TOML: .*line 4"),
    ],
    ids=["unknown-role", "unknown-name", "bad-setting", "no-name", "malformed"],
)
def test_plugins_toml_errors_are_one_line(tmp_path, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(PluginsConfigError, match=pattern) as info:
        load_plugins_toml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


#: A third-party RoPE scaling with one setting, for the tests below.
LINEAR_ROPE_PLUGIN = """
import arbor_plugins
from pydantic import BaseModel, ConfigDict

class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    factor: float = 1.0

class Linear(arbor_plugins.RopeScaling):
    Settings = Settings
    def apply(self, rope_parameters, settings):
        return {**rope_parameters, "rope_type": "linear", "factor": settings.factor}

@arbor_plugins.hookimpl
def arbor_register(registry):
    registry.register("rope_scaling", "linear-x", Linear())
"""


def test_plugin_settings_are_validated(site, tmp_path):
    site("fakeplug", LINEAR_ROPE_PLUGIN)
    sel = load_plugins_toml(write(tmp_path, '[rope_scaling]\nname = "linear-x"\nfactor = 4\n'))
    assert sel.settings("rope_scaling").factor == 4.0
    with pytest.raises(PluginsConfigError, match=r"rope_scaling.factor: .*\(got 'big'\); accepted settings: factor"):
        load_plugins_toml(write(tmp_path, '[rope_scaling]\nname = "linear-x"\nfactor = "big"\n'))


def test_a_rope_scaling_chosen_in_plugins_toml_changes_the_model_arbor_train_builds(site, tmp_path):
    site("fakeplug", LINEAR_ROPE_PLUGIN)
    import torch

    from arbor import ArborForCausalLM
    from arbor.cli.train import build_model
    from arbor.training.trainer import TrainConfig

    tokenizer = type("Tok", (), {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "__len__": lambda s: 64})()
    config = TrainConfig.model_validate({"model": {"preset": "tiny"}})
    plain = build_model(config, tokenizer, load_plugins_toml(write(tmp_path, "")))
    scaled = build_model(config, tokenizer, load_plugins_toml(write(tmp_path, '[rope_scaling]\nname = "linear-x"\n'
                                                                               'factor = 4\n')))
    assert plain.config.rope_parameters["rope_type"] == "default"
    assert scaled.config.rope_parameters["rope_type"] == "linear" and scaled.config.rope_parameters["factor"] == 4
    assert torch.allclose(scaled.model.rotary_emb.inv_freq * 4, plain.model.rotary_emb.inv_freq)
    scaled.save_pretrained(tmp_path / "saved")  # the saved model carries it, with no plugin needed to load
    assert ArborForCausalLM.from_pretrained(tmp_path / "saved").config.rope_parameters["factor"] == 4


def test_schema_without_registry():
    parsed = parse_plugins_toml({"substrate": {"name": "learned", "dim": 3}})
    assert parsed.substrate.name == "learned" and parsed.substrate.settings == {"dim": 3}
    assert list(parsed.roles()) == ["substrate"]
    with pytest.raises(PluginsFileError, match="substrate: must be a table"):
        parse_plugins_toml({"substrate": 3})


def test_hookspecs_match_kinds():
    # Every registry kind is a role of plugins.toml (the schema asserts the same at import).
    from arbor_plugins.settings import PluginsFile

    assert tuple(PluginsFile.model_fields) == arbor_plugins.KINDS


# -------------------------------------------------------------- the guard
#: One plugin with a fault for every kind of call; models pick a hook's fault by an unusual
#: max_position_embeddings (384: growth hook, 256: stats hook, 777: RoPE hook).
FAULTY_PLUGIN = """
import torch
import arbor_plugins


class State(arbor_plugins.TriggerState):
    def __init__(self, mode):
        self.mode = mode

    def decide(self, step, tokens, model):
        if self.mode == "none":
            return None
        if self.mode == "dict":
            return {"grow": True}
        return arbor_plugins.Decision(grow=step == 1, reason="test", growth={"axis": "depth", "num_layers": 1})

    def state_dict(self):
        return {"history": torch.zeros(2)} if self.mode == "tensor" else {}


class Faulty(arbor_plugins.Trigger):
    def __init__(self, mode):
        self.mode = mode

    def start(self, model, settings):
        if self.mode == "raise":
            raise KeyError("no such statistic")
        return State(self.mode)


class Liar(arbor_plugins.InitScheme):
    exact = True  # but it changes the function

    def initialize(self, model, event, settings):
        with torch.no_grad():
            model.model.norm.weight.mul_(1.5)


@arbor_plugins.hookimpl
def arbor_register(registry):
    for mode in ("none", "dict", "tensor", "grow", "raise"):
        registry.register("trigger", "faulty-" + mode, Faulty(mode))
    registry.register("init_scheme", "liar", Liar())


# The hooks fail only for models marked by an unusual position count, so each case picks its fault.
@arbor_plugins.hookimpl
def arbor_grow_depth(model, event):
    if model.config.max_position_embeddings == 384:
        raise RuntimeError("cannot follow depth growth")


@arbor_plugins.hookimpl
def arbor_pre_forward_stats(model, layer_idx, hidden_states, step):
    if model.config.max_position_embeddings == 256:
        raise ValueError("bad statistic")


@arbor_plugins.hookimpl
def arbor_rope_config(config, rope_parameters):
    if config.max_position_embeddings == 777:
        return {"rope_type": "default", "rope_theta": -5.0}
    return None
"""


def _tiny(**kw):
    from arbor import ArborConfig, ArborForCausalLM

    return ArborForCausalLM(ArborConfig.from_preset("tiny", vocab_size=48, **kw))


def _trainer(tmp_path, trigger):
    import torch

    from arbor.training.trainer import TrainConfig, Trainer

    data = torch.randint(0, 48, (16, 16))
    config = TrainConfig.model_validate({"max_steps": 4, "batch_size": 2, "seq_len": 16, "save_interval": 2,
                                         "growth": {"trigger": trigger}})
    return Trainer(_tiny(), config, data[:12], data[12:], tmp_path, progress=False, echo=lambda s: None)


@pytest.mark.parametrize(("trigger", "message"), [
    ("faulty-none", r"plugin 'brokenplug' 0\.3 .*trigger 'faulty-none' state\.decide\(\) returned a NoneType, "
                    r"not a Decision"),
    ("faulty-tensor", r"plugin 'brokenplug' 0\.3 .*state\.state_dict\(\) returned a dict that is not JSON"),
    ("faulty-raise", r"plugin 'brokenplug' 0\.3 .*failed in trigger 'faulty-raise'\.start\(\): KeyError"),
])
def test_a_failing_component_is_named_with_its_distribution(site, tmp_path, trigger, message):
    from arbor.plugins import PluginError

    site("brokenplug", FAULTY_PLUGIN, version="0.3")
    with pytest.raises(PluginError, match=message):
        _trainer(tmp_path, trigger).fit()


def test_failing_hooks_are_named_with_their_distribution(site):
    import torch

    from arbor.plugins import PluginError

    site("brokenplug", FAULTY_PLUGIN, version="0.3")
    with pytest.raises(PluginError, match=r"plugin 'brokenplug' 0\.3 .*failed in hook arbor_grow_depth: "
                                          r"RuntimeError: cannot follow depth growth"):
        _tiny(max_position_embeddings=384).grow_depth(1)
    model = _tiny(max_position_embeddings=256).train()
    model.stats_interval = 1
    with pytest.raises(PluginError, match=r"'brokenplug'.*hook arbor_pre_forward_stats: ValueError"):
        model(torch.randint(0, 48, (1, 4)))
    with pytest.raises(PluginError, match=r"arbor_rope_config hook \(plugin 'brokenplug'.*invalid RoPE"):
        _tiny(max_position_embeddings=777)


def test_the_cli_names_a_failing_plugin_in_one_line(site, tmp_path, capsys):
    from arbor.cli import main

    site("brokenplug", FAULTY_PLUGIN, version="0.3")
    plugins = tmp_path / "plugins.toml"
    plugins.write_text('[trigger]\nname = "faulty-none"\n')
    argv = ["train", "--out", str(tmp_path / "run"), "--plugins", str(plugins), "--max-steps", "3",
            "--no-progress", "--data", "builtin", "--set", "seq_len=32", "--set", "vocab_size=300",
            "--set", "sample_tokens=0"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'brokenplug' 0.3" in err[0] and "not a Decision" in err[0], err
