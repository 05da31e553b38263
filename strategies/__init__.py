"""Built-in growth strategies: triggers, insertion policies, init schemes and
freeze policies, registered through the ``arbor`` entry point group exactly
like a third-party plugin's. Also the activation statistics triggers read."""

from arbor_plugins import hookimpl
from arbor_strategies.init_schemes import INIT_SCHEMES, remap_masks
from arbor_strategies.policies import FREEZE_POLICIES, INSERTION_POLICIES
from arbor_strategies.stats import layer_stats
from arbor_strategies.triggers import TRIGGERS


@hookimpl
def arbor_register(registry):
    for kind, components in (("trigger", TRIGGERS), ("insertion_policy", INSERTION_POLICIES),
                             ("init_scheme", INIT_SCHEMES), ("freeze_policy", FREEZE_POLICIES)):
        for name, component in components.items():
            registry.register(kind, name, component)


@hookimpl
def arbor_pre_forward_stats(model, layer_idx, hidden_states, step):
    layer_stats(model).add(layer_idx, hidden_states)


@hookimpl
def arbor_grow_width(model, event):
    # Masks of earlier "masked" steps follow units that this step moved (head growth permutes slots).
    remap_masks(model, event)
