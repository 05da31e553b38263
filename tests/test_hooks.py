"""Every hookspec is documented and called at least once here.

Hooks the model fires itself (statistics, RoPE) are driven through the model;
the growth and freeze hooks are called through the plugin manager with the
arguments their specs promise, until the growth operators fire them.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import arbor_plugins
from arbor import ArborConfig, ArborForCausalLM
from arbor.plugins import call_hook, component_state, get_plugin_manager, has_hook_impls, load_component_state
from arbor_plugins import hookspecs

HOOKS = sorted(name for name, fn in vars(hookspecs).items() if name.startswith("arbor_") and callable(fn))


class Recorder:
    def __init__(self):
        self.seen: dict[str, dict] = {}

    @arbor_plugins.hookimpl
    def arbor_register(self, registry):
        self.seen["arbor_register"] = {"registry": registry}

    @arbor_plugins.hookimpl
    def arbor_pre_forward_stats(self, model, layer_idx, hidden_states, step):
        self.seen.setdefault("arbor_pre_forward_stats", {"layer_idx": layer_idx, "step": step})

    @arbor_plugins.hookimpl
    def arbor_grow_width(self, model, event):
        self.seen["arbor_grow_width"] = {"model": model, "event": event}

    @arbor_plugins.hookimpl
    def arbor_grow_depth(self, model, event):
        self.seen["arbor_grow_depth"] = {"model": model, "event": event}

    @arbor_plugins.hookimpl
    def arbor_freeze(self, model, names, frozen):
        self.seen["arbor_freeze"] = {"names": names, "frozen": frozen}

    @arbor_plugins.hookimpl
    def arbor_rope_config(self, config, rope_parameters):
        self.seen["arbor_rope_config"] = {"rope_parameters": rope_parameters}
        return None

    @arbor_plugins.hookimpl
    def arbor_state_dict(self, model):
        self.seen["arbor_state_dict"] = {"model": model}
        return {"test-recorder": {"calls": len(self.seen)}}

    @arbor_plugins.hookimpl
    def arbor_load_state(self, model, state):
        self.seen["arbor_load_state"] = {"state": state.get("test-recorder")}


@pytest.fixture
def recorder():
    pm = get_plugin_manager()
    rec = Recorder()
    pm.register(rec, name="test-recorder")
    yield rec
    pm.unregister(rec)


def test_every_hookspec_has_a_docstring():
    assert set(HOOKS) == {
        "arbor_register", "arbor_pre_forward_stats", "arbor_grow_width",
        "arbor_grow_depth", "arbor_freeze", "arbor_rope_config", "arbor_state_dict", "arbor_load_state",
    }
    for name in HOOKS:
        assert len(inspect.getdoc(getattr(hookspecs, name)) or "") > 40, name


def test_every_hook_is_called(recorder):
    model = ArborForCausalLM(ArborConfig.from_preset("tiny")).train()  # fires arbor_rope_config
    model.stats_interval = 1
    model(torch.randint(0, 512, (1, 4)))  # fires arbor_pre_forward_stats
    registry = arbor_plugins.Registry()
    call_hook("arbor_register", registry=registry)
    call_hook("arbor_grow_width", model=model, event={"axis": "ffn"})
    call_hook("arbor_grow_depth", model=model, event={"axis": "depth"})
    call_hook("arbor_freeze", model=model, names=["model.norm.weight"], frozen=True)
    state = component_state(model)  # arbor_state_dict, as a checkpoint is written
    load_component_state(model, state)  # arbor_load_state, as a run resumes
    assert sorted(recorder.seen) == HOOKS
    assert recorder.seen["arbor_load_state"]["state"] == state["test-recorder"]
    assert recorder.seen["arbor_pre_forward_stats"] == {"layer_idx": 0, "step": 0}
    assert recorder.seen["arbor_rope_config"]["rope_parameters"]["rope_type"] == "default"
    assert recorder.seen["arbor_freeze"] == {"names": ["model.norm.weight"], "frozen": True}
    assert has_hook_impls("arbor_grow_depth")


def test_unknown_hook_name_is_an_error():
    with pytest.raises(ValueError, match="valid hooks"):
        call_hook("arbor_grow_sideways", model=None)
