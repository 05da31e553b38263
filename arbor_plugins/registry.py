"""The registry of named components, by kind.

A component is any object a plugin offers under a name: a substrate, an
attention backend, a trigger... The registry only stores them; what a kind
expects of its components is described in :mod:`arbor_plugins.components`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from arbor_plugins import components

#: The kinds of component arbor knows how to use. Plugins may not invent kinds:
#: a typo in a kind would otherwise register a component nobody ever looks up.
KINDS: tuple[str, ...] = (
    "trigger",
    "insertion_policy",
    "init_scheme",
    "freeze_policy",
    "substrate",
    "attention_backend",
    "rope_scaling",
)


#: The component of each kind that applies when neither the caller nor ``plugins.toml`` names
#: one: arbor's built-ins. Core reads its defaults from here rather than writing names itself.
DEFAULTS: dict[str, str] = {
    "trigger": "schedule",
    "insertion_policy": "middle",
    "init_scheme": "zero",
    "freeze_policy": "none",
    "substrate": "learned",
    "attention_backend": "sdpa",
}


class ComponentConflictError(RuntimeError):
    """Two plugins registered a component of the same kind under the same name."""


class UnknownComponentError(LookupError):
    """A component name was asked for that no loaded plugin registered."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        valid = ", ".join(repr(n) for n in known) or "none are registered"
        super().__init__(f"unknown {kind} {name!r}; valid names: {valid}")


@dataclass(frozen=True)
class Entry:
    """One registered component and the plugin it came from."""

    kind: str
    name: str
    component: Any
    plugin: str


class Registry:
    """Named components by kind, each remembering the plugin that registered it."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        #: Set by the plugin manager while one plugin's ``arbor_register`` runs, so
        #: conflicts and listings can name the plugin without its cooperation.
        self.current_plugin: str = "<unknown>"

    def register(self, kind: str, name: str, component: Any) -> None:
        """Register ``component`` as the ``kind`` called ``name``."""
        if kind not in self._entries:
            raise ValueError(f"unknown component kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"component name must be a non-empty string, got {name!r}")
        base = _base_class(kind)
        if not isinstance(component, base):
            raise TypeError(
                f"{kind} {name!r} registered by {self.current_plugin!r} is a {type(component).__name__}, not an "
                f"instance of arbor_plugins.{base.__name__}; subclass it (see arbor_plugins.components)"
            )
        existing = self._entries[kind].get(name)
        if existing is not None:
            raise ComponentConflictError(
                f"{kind} {name!r} is registered by both {existing.plugin!r} and {self.current_plugin!r}; "
                f"uninstall one of them or restrict loading with ARBOR_LOAD_PLUGINS"
            )
        self._entries[kind][name] = Entry(kind, name, component, self.current_plugin)

    def get(self, kind: str, name: str) -> Any:
        """The component ``kind``/``name``; an error listing valid names if absent."""
        try:
            return self._entries[kind][name].component
        except KeyError:
            if kind not in self._entries:
                raise ValueError(f"unknown component kind {kind!r}; valid kinds: {', '.join(KINDS)}") from None
            raise UnknownComponentError(kind, name, self.names(kind)) from None

    def has(self, kind: str, name: str) -> bool:
        return name in self._entries.get(kind, {})

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        kinds = KINDS if kind is None else (kind,)
        for k in kinds:
            yield from (self._entries[k][n] for n in sorted(self._entries[k]))

    def by_plugin(self, plugin: str) -> list[Entry]:
        return [e for e in self.entries() if e.plugin == plugin]


def _base_class(kind: str) -> type:
    """The class every component of ``kind`` derives from."""
    return {
        "trigger": components.Trigger,
        "insertion_policy": components.InsertionPolicy,
        "init_scheme": components.InitScheme,
        "freeze_policy": components.FreezePolicy,
        "substrate": components.Substrate,
        "attention_backend": components.AttentionBackend,
        "rope_scaling": components.RopeScaling,
    }[kind]
