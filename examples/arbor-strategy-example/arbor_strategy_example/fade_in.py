"""The ``fade-in`` init scheme: new layers join at zero strength and fade in while training goes on.

A new decoder layer starts with random weights, like the layers around it,
but both of its writes to the residual stream (the attention output
projection and the FFN down projection) pass through a gate that opens from
0 to 1 over ``steps`` training forwards. At 0 the layer adds nothing, so the
growth step is exact; as the gate opens the layer's contribution grows
smoothly instead of arriving all at once.

How far each gate has opened is training state that the weights do not hold.
The plugin saves it through the ``arbor_state_dict`` hook and puts it back
through ``arbor_load_state`` (see ``arbor_strategy_example/__init__.py``), so
a run resumed from a checkpoint continues every fade where it stopped and
trains exactly as the run that never stopped.

A checkpoint written mid-fade holds the layer's weights without its gate:
loaded outside a resumed run (``from_pretrained`` for inference), the new
layer counts in full. Let the fade finish before exporting a model.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from arbor_plugins import InitScheme, StrictSettings

#: This plugin's key in a checkpoint's training state.
STATE_KEY = "arbor_strategy_example.fade-in"


class FadeInSettings(StrictSettings):
    #: Training forwards over which a new layer's gate opens from 0 to 1.
    steps: int = Field(100, ge=1)


class Gate:
    """Scales the residual writes of one decoder layer by ``done / steps`` (at most 1)."""

    def __init__(self, layer: torch.nn.Module, steps: int, done: int = 0):
        self.layer, self.steps, self.done = layer, steps, done
        self.handles = [proj.register_forward_hook(lambda module, args, out: out * self.value)
                        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj)]

    @property
    def value(self) -> float:
        return min(1.0, self.done / self.steps)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def gates(model) -> list[Gate]:
    """The gates of ``model`` that are still opening."""
    return model.__dict__.setdefault("_fade_in_gates", [])


def _advance(model) -> None:
    if not (model.training and torch.is_grad_enabled()):
        return
    for gate in gates(model):
        gate.done += 1
        if gate.value >= 1.0:  # fully open: the gate is the identity now
            gate.remove()
    model.__dict__["_fade_in_gates"] = [g for g in gates(model) if g.handles]


def attach(model, layer: torch.nn.Module, steps: int, done: int = 0) -> Gate:
    """Put a gate on decoder ``layer`` of ``model``, opened ``done`` of ``steps`` forwards so far."""
    if "_fade_in_hook" not in model.__dict__:
        model.__dict__["_fade_in_hook"] = model.register_forward_pre_hook(lambda m, args: _advance(m))
    gate = Gate(layer, steps, done)
    gates(model).append(gate)
    return gate


class FadeInInit(InitScheme):
    description = "new layers start random and fade in from 0 to 1 over `steps` training forwards (exact)"
    exact = True
    axes = ("depth",)
    Settings = FadeInSettings

    def initialize(self, model, event, settings: FadeInSettings) -> None:
        std = model.config.initializer_range
        for i in event.layers:
            layer = model.model.layers[i]
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.weight.normal_(0.0, std)  # arbor built them at zero; the gate keeps the step exact
            attach(model, layer, settings.steps)


def state_dict(model) -> dict[str, Any] | None:
    """Each opening gate by its layer's current name, for ``arbor_state_dict``."""
    if not gates(model):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    return {STATE_KEY: [{"layer": names[id(g.layer)], "steps": g.steps, "done": g.done} for g in gates(model)]}


def load_state(model, state: dict[str, Any]) -> None:
    """Rebuild the gates `state_dict` saved, for ``arbor_load_state``."""
    for gate in gates(model):
        gate.remove()
    model.__dict__["_fade_in_gates"] = []
    for saved in state.get(STATE_KEY, []):
        attach(model, model.get_submodule(saved["layer"]), int(saved["steps"]), int(saved["done"]))
