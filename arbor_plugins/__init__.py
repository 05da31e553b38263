"""The arbor plugin contract: hook specifications, the ``hookimpl`` marker,
component base classes, the component registry and the growth types
(`GrowthSpec`, `GrowthEvent`, `ResizedParameter`, `Decision`).

A plugin imports only this package::

    import arbor_plugins

    @arbor_plugins.hookimpl
    def arbor_register(registry):
        registry.register("substrate", "my-substrate", MySubstrate())
"""

from arbor_plugins.components import (
    AttentionBackend,
    Component,
    Decision,
    FreezePolicy,
    InitScheme,
    InsertionPolicy,
    NoSettings,
    RopeScaling,
    StrictSettings,
    Substrate,
    Trigger,
    TriggerState,
)
from arbor_plugins.growth import (
    AXES,
    GrowthError,
    GrowthEvent,
    GrowthSpec,
    ResizedParameter,
    UserError,
    parse_growth_spec,
)
from arbor_plugins.hookspecs import PROJECT_NAME, hookimpl, hookspec
from arbor_plugins.registry import DEFAULTS, KINDS, ComponentConflictError, Registry, UnknownComponentError

__all__ = [
    "AXES",
    "DEFAULTS",
    "KINDS",
    "PROJECT_NAME",
    "AttentionBackend",
    "Component",
    "ComponentConflictError",
    "Decision",
    "FreezePolicy",
    "GrowthError",
    "GrowthEvent",
    "GrowthSpec",
    "InitScheme",
    "InsertionPolicy",
    "NoSettings",
    "Registry",
    "ResizedParameter",
    "RopeScaling",
    "StrictSettings",
    "Substrate",
    "Trigger",
    "TriggerState",
    "UnknownComponentError",
    "UserError",
    "hookimpl",
    "hookspec",
    "parse_growth_spec",
]
