"""The conformance kit (`arbor_plugins.testing`) on every built-in component, and on broken ones.

The built-ins are read from the registry, so a new built-in is checked here
without anyone listing it; settings below only make short runs reach real
decisions (or give required fields).
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import arbor_plugins
from arbor.plugins import BUILTIN_DISTRIBUTION, get_registry, reset_plugins
from arbor_plugins import Decision, FreezePolicy, InitScheme, InsertionPolicy, Substrate, Trigger, TriggerState
from arbor_plugins.testing import (  # noqa: F401 - the fixtures are used by name
    TINY_CONFIGS,
    arbor_registry,
    arbor_tiny_model,
    check_component,
    check_freeze_policy,
    check_init_scheme,
    check_insertion_policy,
    check_plugin,
    check_substrate,
    check_trigger,
    tiny_model,
)
from test_plugins import make_dist

#: Settings that make the kit's 12-step loop reach growth decisions (defaults wait thousands of steps).
SETTINGS = {
    ("trigger", "utilization"): {"threshold": 0.01, "history": 1, "stats_interval": 1, "cooldown": 3, "num_layers": 1},
    ("trigger", "loss-plateau"): {"window": 2, "epsilon": 0.5, "cooldown": 2},
    ("trigger", "schedule"): {"steps": [3, 6], "growth": {"axis": "ffn", "add": 4}},
    ("trigger", "compute-optimal"): {"tokens_per_parameter": 0.005},
}
#: flex_attention compiles a kernel on first use (many seconds on a CPU); test_model covers it.
SLOW = {("attention_backend", "flex")}


def builtins() -> list[tuple[str, str]]:
    reset_plugins()  # collection must not see plugins another test left behind
    entries = [(e.kind, e.name) for e in get_registry().entries()
               if e.plugin.split(" ")[0] == BUILTIN_DISTRIBUTION and (e.kind, e.name) not in SLOW]
    reset_plugins()
    return entries


@pytest.fixture(autouse=True)
def _fresh(fresh_plugins):
    """No plugin environment variables and no cached plugin state, before and after."""


@pytest.mark.parametrize(("kind", "name"), builtins(), ids=lambda v: v)
def test_builtin_component_conforms(kind, name):
    report = check_component(kind, name, settings=SETTINGS.get((kind, name)))
    assert report.passed or report.notes, report
    component = get_registry().get(kind, name)
    if kind == "init_scheme":
        assert report.exact == component.exact and set(report.max_logit_diff) == set(component.axes)
        if not component.exact:  # reported, not failed
            assert max(report.max_logit_diff.values()) > 1e-3
    if kind == "trigger":  # the settings above make every built-in trigger grow the model at least once
        assert any(d["grow"] for d in report.decisions), report.decisions


def test_every_kind_is_covered():
    # rope_scaling has no built-in; test_check_plugin_runs_every_component_of_a_distribution checks one.
    assert {kind for kind, _ in builtins()} >= set(arbor_plugins.KINDS) - {"rope_scaling"}


# ------------------------------------------------------------------ broken components
class PerturbingScheme(InitScheme):
    """Declares exact, but nudges the old FFN output weights."""

    exact = True
    axes = ("ffn",)

    def initialize(self, model, event, settings):
        for i in event.layers:
            model.model.layers[i].mlp.down_proj.weight[:, 0] += 0.1


class ResizingScheme(InitScheme):
    """Widens a new layer's FFN behind the operator's back: the config no longer describes the model."""

    axes = ("depth",)

    def initialize(self, model, event, settings):
        from arbor.model.modeling import ArborMLP

        i = event.layers[0]
        model.model.layers[i].mlp = ArborMLP(model.config, model.config.layer_intermediate_sizes[i] * 2)


def test_kit_fails_a_scheme_that_declares_exact_but_is_not():
    with pytest.raises(AssertionError, match=r"init_scheme 'PerturbingScheme': ffn growth on gqa-tied: declared "
                                             r"exact but the logits changed by"):
        check_init_scheme(PerturbingScheme())


def test_kit_fails_a_scheme_that_changes_shapes_behind_the_config():
    with pytest.raises(AssertionError, match=r"tensors do not fit the config.*mlp\.down_proj\.weight"):
        check_init_scheme(ResizingScheme(), configs=("mqa-one-layer",))


def test_kit_reports_a_non_exact_scheme_without_failing_it():
    report = check_init_scheme("copy-neighbor", configs=("gqa-tied",))
    assert report.exact is False and report.max_logit_diff["depth"] > 1e-3
    assert "exact" not in " ".join(report.notes)  # it really changes the logits: nothing to suggest


class LyingSubstrate(Substrate):
    """Declares frozen, builds a trainable embedding."""

    frozen = True

    def build(self, config, settings):
        return nn.Embedding(config.vocab_size, config.hidden_size)


class ShapelessSubstrate(Substrate):
    """Returns vectors of the wrong width."""

    def build(self, config, settings):
        return nn.Embedding(config.vocab_size, config.hidden_size // 2)


def test_kit_fails_a_frozen_substrate_with_a_trainable_parameter():
    with pytest.raises(AssertionError, match=r"declared frozen but has trainable parameters: \['weight'\]"):
        check_substrate(LyingSubstrate())


def test_kit_fails_a_substrate_of_the_wrong_width():
    with pytest.raises(AssertionError, match=r"output shape \(2, 8, 8\) for input \(2, 8\): expected \(2, 8, 16\)"):
        check_substrate(ShapelessSubstrate())


class TensorTrigger(Trigger):
    """Puts a tensor into its decision: fine in memory, fatal in a JSON log."""

    class State(TriggerState):
        def decide(self, step, tokens, model):
            return Decision(step >= 2, "step reached", {"axis": "depth", "num_layers": torch.tensor(1)})

    def start(self, model, settings):
        return self.State()


class ForgetfulTrigger(Trigger):
    """Counts steps but does not save the count, so a resumed run decides differently."""

    class State(TriggerState):
        seen = 0

        def observe(self, step, tokens, loss, model):
            self.seen += 1

        def decide(self, step, tokens, model):
            return Decision(self.seen >= 8, f"{self.seen} steps seen")

    def start(self, model, settings):
        return self.State()


def test_kit_fails_a_trigger_whose_decision_is_not_serialisable():
    with pytest.raises(AssertionError, match=r"step 1: the decision is not JSON-serialisable.*Tensor"):
        check_trigger(TensorTrigger())


def test_kit_fails_a_trigger_that_does_not_resume():
    with pytest.raises(AssertionError, match=r"step 7: a state restored from state_dict\(\) decides.*1 steps seen"):
        check_trigger(ForgetfulTrigger(), steps=12)


class OffTheEnd(InsertionPolicy):
    def positions(self, model, num_layers, settings):
        return [model.config.num_hidden_layers + 1] * num_layers


class Dice(InsertionPolicy):
    def positions(self, model, num_layers, settings):
        return [random.randint(0, model.config.num_hidden_layers) for _ in range(num_layers)]


def test_kit_fails_bad_insertion_policies():
    with pytest.raises(AssertionError, match=r"returned \[2\] for a 1-layer stack: positions must lie in \[0, 1\]"):
        check_insertion_policy(OffTheEnd())
    with pytest.raises(AssertionError, match="is not deterministic"):
        check_insertion_policy(Dice())


class ClaimsOnly(FreezePolicy):
    """Says it froze the embeddings, freezes nothing."""

    def apply(self, model, event, settings, optimizer=None):
        return ["model.embed_tokens.weight"]


class Typo(FreezePolicy):
    def apply(self, model, event, settings, optimizer=None):
        model.freeze("embeddings", optimizer=optimizer)
        return ["model.embed_token.weight"]


def test_kit_fails_bad_freeze_policies():
    with pytest.raises(AssertionError, match=r"says it froze \['model.embed_tokens.weight'\], but they still"):
        check_freeze_policy(ClaimsOnly())
    with pytest.raises(AssertionError, match=r"names that are not parameters: \['model.embed_token.weight'\]"):
        check_freeze_policy(Typo())


# ----------------------------------------------------------------- dispatch and plugins
def test_check_component_names_valid_kinds():
    with pytest.raises(ValueError, match="unknown component kind 'trigers'; valid kinds: trigger, insertion_policy"):
        check_component("trigers", "utilization")
    with pytest.raises(LookupError, match="unknown trigger 'nope'"):
        check_component("trigger", "nope")


def test_check_component_asks_for_required_settings():
    with pytest.raises(AssertionError, match=r"trigger 'schedule': settings \{\} are invalid.*example_settings"):
        check_component("trigger", "schedule")


PLUGIN = """
import arbor_plugins

class Everywhere(arbor_plugins.InsertionPolicy):
    description = "one new layer before every old one"

    def positions(self, model, num_layers, settings):
        n = model.config.num_hidden_layers
        return [k % (n + 1) for k in range(num_layers)]

class Halve(arbor_plugins.RopeScaling):
    description = "halve the RoPE base"

    def apply(self, rope_parameters, settings):
        return {**rope_parameters, "rope_theta": rope_parameters["rope_theta"] / 2}

@arbor_plugins.hookimpl
def arbor_register(registry):
    registry.register("insertion_policy", "everywhere", Everywhere())
    registry.register("rope_scaling", "halve", Halve())
"""


def test_check_plugin_runs_every_component_of_a_distribution(tmp_path, monkeypatch):
    make_dist(tmp_path, "arbor-strategy-fake", PLUGIN)
    make_dist(tmp_path, "arbor-strategy-broken", "raise ImportError('needs libfoo')")
    monkeypatch.syspath_prepend(str(tmp_path))
    reset_plugins()
    with pytest.warns(UserWarning, match="libfoo"):
        reports = check_plugin("arbor_strategy_fake")  # names compare as pip does
    assert [(r.kind, r.name) for r in reports] == [("insertion_policy", "everywhere"), ("rope_scaling", "halve")]
    with pytest.raises(AssertionError, match="arbor-strategy-broken.*ImportError: needs libfoo"):
        check_plugin("arbor-strategy-broken")
    with pytest.raises(AssertionError, match="'arbor-strategy-missing' is not installed.*plugins found: arbor-lm"):
        check_plugin("arbor-strategy-missing")


# ------------------------------------------------------------------------- fixtures
# Imported above; a plugin's conftest.py gets them with pytest_plugins = ["arbor_plugins.testing"].
def test_pytest_fixtures(arbor_tiny_model, arbor_registry):
    config = arbor_tiny_model.config
    assert (config.hidden_size, config.num_key_value_heads, config.tie_word_embeddings) == (16, 2, True)
    assert not arbor_tiny_model.training and "zero" in arbor_registry.names("init_scheme")
    with torch.no_grad():
        scale = arbor_tiny_model(torch.arange(8)[None]).logits.abs().max()
    assert 0.3 < scale < 30  # logits of order 1, so the exactness bound means what it says
    assert set(TINY_CONFIGS) == {"gqa-tied", "mha-untied", "mqa-one-layer"}
    assert torch.equal(tiny_model("mha-untied").lm_head.weight, tiny_model("mha-untied").lm_head.weight)
