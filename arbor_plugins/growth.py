"""The types a growth step is described by: what plugins receive and return about growth.

* `GrowthSpec`: one step as asked for (``config.growth``, a trigger's
  `~arbor_plugins.Decision.growth`, ``model.grow(...)``);
* `GrowthEvent`: what a step changed, passed to init schemes, freeze policies,
  triggers (``grew``) and the ``arbor_grow_*`` hooks;
* `ResizedParameter`: where one grown tensor's old values sit in the new one;
* `GrowthError`: a growth request the model cannot honour;
* `UserError`: the base of errors about the user's settings, which arbor's
  plugin guard lets through unchanged so their message reaches the user.

They live in the contract package so a plugin can type against them without
importing arbor's core. `arbor.growth.operators` and `arbor.growth.step` use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from arbor_plugins.settings import describe_validation_error

__all__ = ["AXES", "GrowthError", "GrowthEvent", "GrowthSpec", "ResizedParameter", "UserError", "parse_growth_spec"]

#: The growth axes: new layers, FFN width, attention heads, hidden size.
AXES = ("depth", "ffn", "heads", "hidden")


class UserError(ValueError):
    """An error in what the user asked for (a config field, a growth request), naming what to fix.

    Raised from inside a plugin's component it reaches the user as it is,
    not wrapped in a `PluginError` that blames the plugin.
    """


class GrowthError(UserError):
    """A growth request the model cannot honour (shrinking, invalid sizes, limits)."""


@dataclass
class ResizedParameter:
    """Where the old values of one grown tensor sit inside the new one.

    ``old_positions[d]`` holds, for every old index along dimension ``d``, its
    index in the new tensor; dimensions not listed kept their size and order.
    """

    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    old_positions: dict[int, torch.Tensor]
    #: The replaced parameter (weakly held, so the event does not keep old memory alive).
    old_param: Any = field(default=None, repr=False)
    #: The parameter that took its place.
    new_param: Any = field(default=None, repr=False)

    def old_index(self) -> tuple[Any, ...]:
        """An index that selects the old values' positions in a new-shaped tensor."""
        index: list[Any] = []
        for dim, size in enumerate(self.old_shape):
            pos = self.old_positions.get(dim)
            index.append(slice(0, size) if pos is None else pos)
        # Advanced indexing on several dims needs broadcastable index tensors.
        tensors = [i for i, ix in enumerate(index) if isinstance(ix, torch.Tensor)]
        if len(tensors) > 1:
            shaped = []
            for i, ix in enumerate(index):
                ix = torch.arange(self.old_shape[i]) if not isinstance(ix, torch.Tensor) else ix
                view = [1] * len(index)
                view[i] = -1
                shaped.append(ix.view(view))
            return tuple(shaped)
        return tuple(index)


@dataclass
class GrowthEvent:
    """What one growth step changed; passed to init schemes, freeze policies, triggers and the ``arbor_grow_*`` hooks.

    Parameter names are those of the grown model (``model.layers.3.mlp.up_proj.weight``).
    """

    #: One of `AXES`.
    axis: str
    #: Depth: the new layers' indices in the grown stack. Width: the layers whose modules were resized.
    layers: list[int]
    #: Depth: where the new layers went, as indices into the stack before the step (sorted;
    #: ``p`` puts a layer before old layer ``p``, the old layer count appends). Empty for width steps.
    positions: list[int] = field(default_factory=list)
    #: Shapes before the step of every resized parameter, by its new name.
    old_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: Shapes after the step of every resized parameter.
    new_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: Parameters that did not exist before the step (all of a new layer's).
    new_parameters: list[str] = field(default_factory=list)
    #: For each resized parameter, where its old values sit in the new tensor.
    resized: dict[str, ResizedParameter] = field(default_factory=dict)
    #: Parameters renamed because layers were inserted before them: old name → new name.
    renamed: dict[str, str] = field(default_factory=dict)
    #: The init scheme that set the new parts.
    init: str = "zero"
    #: Whether the init scheme claims the grown model computes the same function.
    exact: bool = True
    #: Why the step happened (the trigger's reason), for logs.
    reason: str = ""
    #: Per-parameter factors an init scheme wants applied to optimizer moments of
    #: the old values (Staged Training scales moments of duplicated units):
    #: ``(first, second)``, each broadcastable to the old shape.
    moment_scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: Per-parameter moment copies for duplicated units: ``(dim, dst, src)``, indices
    #: into the NEW tensor along ``dim``; after resizing (and scaling), the state at
    #: ``src`` is copied to ``dst`` so a copy starts with its original's moments.
    moment_sources: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly digest, for logs and growth histories."""
        return {
            "axis": self.axis,
            "layers": list(self.layers),
            "positions": list(self.positions),
            "init": self.init,
            "exact": self.exact,
            "reason": self.reason,
            "new_parameters": len(self.new_parameters),
            "resized": {k: [list(v.old_shape), list(v.new_shape)] for k, v in self.resized.items()},
        }


class GrowthSpec(BaseModel):
    """One growth step, as ``config.growth`` (or a config file) describes it.

    ``axis`` picks the operator; the other fields say how much, relative to
    the model's current size so the same step can repeat:

    * ``depth``: ``num_layers`` new layers at ``positions`` or where ``policy`` says
      (default: the init scheme's preferred place, else the middle of the stack, Arbor's rule);
    * ``ffn``: every layer in ``layers`` (default all) to ``factor`` x or ``add`` + the widest one;
    * ``heads``: ``add`` query heads and ``add_kv`` kv heads to every layer in ``layers``;
    * ``hidden``: d_model to ``factor`` x or ``add`` + the current one.

    ``init`` / ``init_settings`` name the init scheme and ``policy`` /
    ``policy_settings`` the insertion policy; where they are None the entry
    point's choice applies, then ``plugins.toml``'s, then ``"zero"`` and the middle.
    """

    model_config = ConfigDict(extra="forbid")

    axis: Literal["depth", "ffn", "heads", "hidden"] = "depth"
    num_layers: int = Field(4, ge=1)
    positions: list[int] | None = None
    policy: str | None = None
    policy_settings: dict[str, Any] | None = None
    factor: float | None = Field(None, gt=1.0)
    add: int | None = Field(None, ge=1)
    add_kv: int = Field(0, ge=0)
    layers: list[int] | None = None
    init: str | None = None
    init_settings: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> GrowthSpec:
        if self.axis in ("ffn", "hidden") and (self.factor is None) == (self.add is None):
            raise ValueError(f"axis {self.axis!r} needs exactly one of factor or add")
        if self.axis == "heads" and self.add is None and not self.add_kv:
            raise ValueError("axis 'heads' needs add (query heads) and/or add_kv")
        if self.axis == "depth" and self.positions is not None and self.policy is not None:
            raise ValueError("give positions or policy, not both")
        if self.positions is not None and len(self.positions) != self.num_layers:
            raise ValueError(f"positions has {len(self.positions)} entries but num_layers={self.num_layers}")
        return self


def parse_growth_spec(value: Any) -> GrowthSpec:
    """A `GrowthSpec` from a dict (or spec); errors are `GrowthError` naming the field."""
    if isinstance(value, GrowthSpec):
        return value
    try:
        return GrowthSpec.model_validate(value or {})
    except ValidationError as exc:
        raise GrowthError(describe_validation_error(exc, prefix="growth").replace("Value error, ", "")) from None
