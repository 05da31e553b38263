"""The arbor plugin contract: hook specifications, the ``hookimpl`` marker,
component base classes and the component registry.

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
from arbor_plugins.hookspecs import PROJECT_NAME, hookimpl, hookspec
from arbor_plugins.registry import DEFAULTS, KINDS, ComponentConflictError, Registry, UnknownComponentError

__all__ = [
    "DEFAULTS",
    "KINDS",
    "PROJECT_NAME",
    "AttentionBackend",
    "Component",
    "ComponentConflictError",
    "Decision",
    "FreezePolicy",
    "InitScheme",
    "InsertionPolicy",
    "NoSettings",
    "Registry",
    "RopeScaling",
    "StrictSettings",
    "Substrate",
    "Trigger",
    "TriggerState",
    "UnknownComponentError",
    "hookimpl",
    "hookspec",
]
