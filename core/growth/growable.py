"""The growable model: ``arbor.ArborForCausalLM``, and its growth methods with ``model.grow()``.

`ArborForCausalLM` here is the decoder of `arbor.model.modeling` plus the
growth methods of `GrowableMixin`, the freezing of
`arbor.growth.freezing.FreezableMixin` and the merging of LoRA adapters on
save. It keeps the name of the class it extends, so ``config.json`` names the
same architecture whichever of the two saved it; importing ``arbor``
registers this one with transformers' Auto classes.

Each method builds an `arbor.growth.step.GrowthStep` and takes one step, so
a model grown here, by `arbor.training.trainer.Trainer`, by
`arbor.training.integrations.GrowthCallback` or by ``arbor grow`` goes through the same
code. ``grow()`` takes one step of the growth the config names
(``config.growth``, a `GrowthSpec`), with the init scheme and insertion
policy ``plugins.toml`` picks::

    model.config.growth = {"axis": "ffn", "factor": 1.5}
    event = model.grow(optimizer=opt, new_param_lr_multiplier=2.0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from arbor.growth.freezing import FreezableMixin
from arbor.growth.lora import has_lora, merged_state_dict
from arbor.growth.operators import GrowthError, GrowthEvent
from arbor.growth.step import GrowthSpec, GrowthStep, Operation, parse_growth_spec
from arbor.model import modeling
from arbor.model.config import generation_config_to_save
from arbor.plugins.selection import Selection
from arbor_plugins import DEFAULTS

__all__ = ["ArborForCausalLM", "GrowableMixin", "GrowthSpec", "parse_growth_spec"]


class GrowableMixin:
    """Growth methods for a causal LM whose config is an `ArborConfig`.

    Every method grows the model in place, exactly with an exact ``init``
    (default ``"zero"``), fires the matching ``arbor_grow_*`` hook, moves the
    state of ``optimizer`` (and ``scheduler``) into the new shapes when given
    (``optim_kwargs`` go to `arbor.growth.optim.carry_over`: ``new_param_lr_multiplier``,
    ``warmup_steps``), and returns the `GrowthEvent`.
    """

    def grow_depth(self, num_layers: int = 1, positions: list[int] | None = None, policy: str | None = None,
                   init: str = DEFAULTS["init_scheme"], init_settings: dict | None = None, optimizer=None, scheduler=None,
                   **optim_kwargs) -> GrowthEvent:
        """Insert ``num_layers`` new layers at ``positions`` (indices into the current
        stack), where the insertion ``policy`` says, where the init scheme prefers
        (``stack`` appends), or else at the middle."""
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise GrowthError(f"num_layers={num_layers!r} is invalid: must be a positive integer")
        op = Operation("depth", num_layers, positions=positions, policy=policy, init=init, init_settings=init_settings)
        return self._step(op, optimizer, scheduler, optim_kwargs)

    def grow_width(self, intermediate_size: int, layers=None, init: str = DEFAULTS["init_scheme"], init_settings: dict | None = None,
                   optimizer=None, scheduler=None, **optim_kwargs) -> GrowthEvent:
        """Widen the FFN of ``layers`` (default: all) to ``intermediate_size``."""
        op = Operation("ffn", intermediate_size, layers=layers, init=init, init_settings=init_settings)
        return self._step(op, optimizer, scheduler, optim_kwargs)

    def grow_heads(self, num_attention_heads: int, num_key_value_heads: int | None = None, layers=None,
                   init: str = DEFAULTS["init_scheme"], init_settings: dict | None = None, optimizer=None, scheduler=None,
                   **optim_kwargs) -> GrowthEvent:
        """Give ``layers`` (default: all) more query and optionally kv heads."""
        op = Operation("heads", num_attention_heads, layers=layers, kv_target=num_key_value_heads, init=init,
                       init_settings=init_settings)
        return self._step(op, optimizer, scheduler, optim_kwargs)

    def grow_hidden(self, hidden_size: int, init: str = DEFAULTS["init_scheme"], init_settings: dict | None = None, optimizer=None,
                    scheduler=None, **optim_kwargs) -> GrowthEvent:
        """Widen the residual stream (d_model) to ``hidden_size``."""
        op = Operation("hidden", hidden_size, init=init, init_settings=init_settings)
        return self._step(op, optimizer, scheduler, optim_kwargs)

    def grow(self, spec: dict | GrowthSpec | None = None, plugins: str | Path | Any = None, optimizer=None,
             scheduler=None, **optim_kwargs) -> GrowthEvent:
        """Take one step of the growth ``spec`` (default: ``config.growth``) describes.

        ``plugins`` is a ``plugins.toml`` path or a loaded selection (default:
        ``./plugins.toml`` when present); its ``[init_scheme]`` and
        ``[insertion_policy]`` tables, with their settings, apply where the
        spec names none. With neither, the step is Arbor's: 4 new layers at
        the middle, zero-initialised (exact).
        """
        _check_optim(optimizer, optim_kwargs)
        step = GrowthStep(plugins=plugins, **optim_kwargs)
        return step(self, spec, optimizer=optimizer, scheduler=scheduler).event

    def _step(self, op: Operation, optimizer, scheduler, optim_kwargs) -> GrowthEvent:
        _check_optim(optimizer, optim_kwargs)
        return GrowthStep(plugins=_NO_PLUGINS, **optim_kwargs)(self, op, optimizer=optimizer, scheduler=scheduler).event


#: The explicit methods name their init scheme; plugins.toml does not apply to them.
_NO_PLUGINS = Selection()


def _check_optim(optimizer, optim_kwargs) -> None:
    if optim_kwargs and optimizer is None:
        raise GrowthError(f"{', '.join(optim_kwargs)} only apply together with optimizer=")


class ArborForCausalLM(GrowableMixin, FreezableMixin, modeling.ArborForCausalLM):
    """The arbor language model: the decoder of `arbor.model.modeling.ArborForCausalLM`, which
    grows (`GrowableMixin`), freezes (`arbor.growth.freezing.FreezableMixin`) and saves LoRA
    adapters merged into plain Llama-named weights."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As in transformers; LoRA adapters (`arbor.growth.lora`) are merged into the saved
        weights, so a checkpoint always holds plain Llama-named tensors, and
        ``generation_config.json`` gives the model's context (``max_position_embeddings``) as its
        ``max_length`` unless one was set (`arbor.model.config.generation_config_to_save`)."""
        if has_lora(self) and kwargs.get("state_dict") is None:
            kwargs["state_dict"] = merged_state_dict(self)
        generation = self.generation_config
        self.generation_config = generation_config_to_save(generation, self.config)  # for this save only
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.generation_config = generation
