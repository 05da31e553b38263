"""Every hook arbor calls, with the contract a plugin must keep.

Plugins implement these with ``@arbor_plugins.hookimpl`` in a module that is
named by an entry point in the ``arbor`` group::

    [project.entry-points.arbor]
    my_plugin = "my_package.plugin"

A hook implementation may accept any subset of the arguments named here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - types only
    import torch

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
def arbor_pre_forward_stats(model: Any, layer_idx: int, hidden_states: torch.Tensor, step: int) -> None:
    """Observe the input of decoder block ``layer_idx`` before it runs.

    Called only on steps where statistics are collected: in training mode,
    when ``model.stats_interval`` is positive and ``step`` is a multiple of it.
    ``hidden_states`` is detached; do not modify it in place. Avoid host
    synchronisation (``.item()``, ``.cpu()``) here: accumulate on the device and
    read the totals when a decision is needed.
    """


@hookspec
def arbor_grow_width(model: Any, event: Any) -> None:
    """React to a width change (FFN width, attention heads or hidden size).

    Called after the core has resized the modules exactly. ``event`` is an
    ``arbor.growth.GrowthEvent``: axis, layers touched, old and new shapes and
    the names of new parameters. Init schemes may re-initialise the new parts
    here; optimizer carry-over and logging listen here too.
    """


@hookspec
def arbor_grow_depth(model: Any, event: Any) -> None:
    """React to new decoder layers having been inserted.

    Same contract as :func:`arbor_grow_width`, for the depth axis.
    """


@hookspec
def arbor_freeze(model: Any, names: list[str], frozen: bool) -> None:
    """Parameters ``names`` of ``model`` had ``requires_grad`` set to ``not frozen``.

    LoRA-style policies attach or detach adapters here.
    """


@hookspec(firstresult=True)
def arbor_rope_config(config: Any, rope_parameters: dict[str, Any]) -> dict[str, Any] | None:
    """Return changed RoPE parameters, or ``None`` to leave them alone.

    Called with a copy of ``config.rope_parameters`` before the rotary tables
    are built. The first plugin that returns a dict wins; the result must be a
    valid transformers ``rope_parameters`` dict (``rope_type``, ``rope_theta``
    and the keys that type needs, such as ``factor``).
    """
