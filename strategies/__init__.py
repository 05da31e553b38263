"""Built-in growth strategies: triggers, insertion policies, init schemes and
freeze policies, registered through the ``arbor`` entry point group exactly
like a third-party plugin's."""

from arbor_plugins import hookimpl
from arbor_strategies.init_schemes import INIT_SCHEMES, remap_masks
from arbor_strategies.policies import INSERTION_POLICIES


@hookimpl
def arbor_register(registry):
    for name, scheme in INIT_SCHEMES.items():
        registry.register("init_scheme", name, scheme)
    for name, policy in INSERTION_POLICIES.items():
        registry.register("insertion_policy", name, policy)


@hookimpl
def arbor_grow_width(model, event):
    # Masks of earlier "masked" steps follow units that this step moved (head growth permutes slots).
    remap_masks(model, event)
