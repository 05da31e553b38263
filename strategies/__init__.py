"""Built-in growth strategies: triggers, insertion policies, init schemes and
freeze policies, registered through the ``arbor`` entry point group exactly
like a third-party plugin's. Also the activation statistics triggers read."""

from arbor_plugins import hookimpl
from arbor_strategies.init_schemes import INIT_SCHEMES, load_mask_state, mask_state, remap_masks
from arbor_strategies.policies import FREEZE_POLICIES, INSERTION_POLICIES
from arbor_strategies.stats import layer_stats, load_stats_state, stats_state
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


#: Keys of the built-in strategies' training state in a checkpoint (``arbor_state_dict``).
MASKS_KEY, LORA_KEY, STATS_KEY = "arbor_strategies.masked", "arbor_strategies.lora-below", "arbor_strategies.stats"


@hookimpl
def arbor_state_dict(model):
    from arbor.growth.lora import lora_state

    state = {MASKS_KEY: mask_state(model), LORA_KEY: lora_state(model), STATS_KEY: stats_state(model)}
    return {key: value for key, value in state.items() if value is not None} or None


@hookimpl
def arbor_load_state(model, state):
    from arbor.growth.lora import restore_lora

    restore_lora(model, state.get(LORA_KEY))  # first: masks may sit on the projections it wraps
    load_mask_state(model, state.get(MASKS_KEY))
    load_stats_state(model, state.get(STATS_KEY))  # the utilization window and which forwards it samples
