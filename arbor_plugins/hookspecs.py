"""Every hook arbor calls, with the contract a plugin must keep.

Plugins implement these with ``@arbor_plugins.hookimpl`` in a module that is
named by an entry point in the ``arbor`` group::

    [project.entry-points.arbor]
    my_plugin = "my_package.plugin"

A hook implementation may accept any subset of the arguments named here.
``model`` is always an ``arbor.ArborForCausalLM`` (typed as ``nn.Module`` so
this package needs no import of arbor's core). docs/hooks.md documents every
argument of every hook, with when it is called and what it may do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - types only
    import torch
    from torch import nn
    from transformers import PreTrainedConfig

    from arbor_plugins.growth import GrowthEvent
    from arbor_plugins.registry import Registry

PROJECT_NAME = "arbor"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def arbor_register(registry: Registry) -> None:
    """Add named components to ``registry``.

    Called once, when the plugin manager first loads. Use
    ``registry.register(kind, name, component)`` for each triggers, insertion
    policy, init scheme, freeze policy, substrate, attention backend or RoPE
    scaling the plugin provides. Two plugins registering the same ``(kind,
    name)`` is an error that names both.
    """


@hookspec
def arbor_pre_forward_stats(model: nn.Module, layer_idx: int, hidden_states: torch.Tensor, step: int) -> None:
    """Observe the input of decoder block ``layer_idx`` before it runs.

    Called only on steps where statistics are collected: in training mode,
    when ``model.stats_interval`` is positive and ``step`` is a multiple of it.
    ``hidden_states`` is detached; do not modify it in place. Avoid host
    synchronisation (``.item()``, ``.cpu()``) here: accumulate on the device and
    read the totals when a decision is needed. It fires from module hooks that
    exist only during a collecting forward, so the model's ``forward`` stays
    pure; a model under plain ``torch.compile`` collects nothing (use
    ``arbor.model.modeling.CompiledForward``, as ``arbor train --compile`` does).
    """


@hookspec
def arbor_grow_width(model: nn.Module, event: GrowthEvent) -> None:
    """React to a width change (FFN width, attention heads or hidden size).

    Called after the core has resized the modules exactly. ``event`` is an
    `arbor_plugins.GrowthEvent`: axis, layers touched, old and new shapes and
    the names of new parameters. Init schemes may re-initialise the new parts
    here; optimizer carry-over and logging listen here too.
    """


@hookspec
def arbor_grow_depth(model: nn.Module, event: GrowthEvent) -> None:
    """React to new decoder layers having been inserted.

    Same contract as :func:`arbor_grow_width`, for the depth axis.
    """


@hookspec
def arbor_freeze(model: nn.Module, names: list[str], frozen: bool) -> None:
    """Parameters ``names`` of ``model`` had ``requires_grad`` set to ``not frozen``.

    LoRA-style policies attach or detach adapters here.
    """


@hookspec
def arbor_state_dict(model: nn.Module) -> dict[str, Any] | None:
    """Return the training state this plugin keeps for ``model``, to be saved in a checkpoint.

    Called each time a training run writes a checkpoint. Return
    ``{key: state}`` under a key of your own (your package's name, say), or
    ``None`` when there is nothing to keep. ``state`` may hold tensors,
    numbers, strings, ``None``, lists and dicts: it is written with
    ``torch.save`` and read back with ``weights_only=True``, so objects of
    your own classes are refused. The dicts of all plugins are merged; two
    plugins returning the same key is an error. What belongs here: whatever
    a resumed run needs to continue exactly as the uninterrupted one, and the
    weights alone do not say (masks still ramping in and how far, adapters,
    windows of statistics). The model weights, the optimizer and the
    trigger's ``state_dict`` are saved by arbor already.
    """


@hookspec
def arbor_load_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Put back what :func:`arbor_state_dict` returned, when a run resumes.

    ``state`` is the merged dict of every plugin: take your own key. A
    missing key means the checkpoint was written without your plugin's state
    (an older run, or the plugin was not installed): start afresh. Called
    after the model's weights are loaded and before the optimizer state is,
    so parameters your state recreates (LoRA adapters, say) are found by name
    when the optimizer's saved groups are matched to the model.
    """


@hookspec(firstresult=True)
def arbor_rope_config(config: PreTrainedConfig, rope_parameters: dict[str, Any]) -> dict[str, Any] | None:
    """Return changed RoPE parameters, or ``None`` to leave them alone.

    Called with a copy of ``config.rope_parameters`` before the rotary tables
    are built. The first plugin that returns a dict wins; the result must be a
    valid transformers ``rope_parameters`` dict (``rope_type``, ``rope_theta``
    and the keys that type needs, such as ``factor``).
    """
