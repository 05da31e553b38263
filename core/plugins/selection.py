"""Load ``plugins.toml``: pick a registered component for each role, with settings.

The file's shape is checked by :mod:`arbor_plugins.settings`; this module adds
what only a running arbor knows: which components are registered, and what
settings each accepts. Everything is checked when the file is loaded, so a
typo fails at start-up with one line, not hours into a training run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from arbor.plugins import Guarded, PluginError, describe_plugin, get_registry
from arbor_plugins import KINDS, Registry, UnknownComponentError, UserError
from arbor_plugins.settings import PluginsFileError, describe_validation_error, parse_plugins_toml

__all__ = ["DEFAULT_PATH", "PluginsConfigError", "Selection", "apply_rope_scaling", "load_plugins_toml",
           "validate_component_settings"]

#: Looked for in the working directory when no path is given.
DEFAULT_PATH = Path("plugins.toml")


class PluginsConfigError(ValueError):
    """``plugins.toml`` cannot be used; the message is one line naming file, field, value and what is allowed."""


@dataclass(frozen=True)
class Choice:
    """The component chosen for one role, with its validated settings."""

    name: str
    component: Any
    settings: BaseModel


@dataclass(frozen=True)
class Selection:
    """The components ``plugins.toml`` chose, by role (component kind).

    A role the file leaves out gives ``None`` from every accessor, so callers
    fall back to their own default (the config's, usually).
    """

    choices: dict[str, Choice] = field(default_factory=dict)
    path: Path | None = None

    def _get(self, kind: str) -> Choice | None:
        if kind not in KINDS:
            raise ValueError(f"unknown role {kind!r}; valid roles: {', '.join(KINDS)}")
        return self.choices.get(kind)

    def component(self, kind: str) -> Any:
        choice = self._get(kind)
        return choice.component if choice else None

    def settings(self, kind: str) -> BaseModel | None:
        choice = self._get(kind)
        return choice.settings if choice else None

    def name(self, kind: str) -> str | None:
        choice = self._get(kind)
        return choice.name if choice else None

    def __bool__(self) -> bool:
        return bool(self.choices)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """``{role: {"name": ..., "settings": {...}}}``, for printing and logs."""
        return {k: {"name": c.name, "settings": c.settings.model_dump()} for k, c in self.choices.items()}


def load_plugins_toml(path: str | Path | None = None, registry: Registry | None = None) -> Selection:
    """Read ``path`` (default ``./plugins.toml`` if present) into a checked :class:`Selection`.

    Without a path and without ``./plugins.toml`` the selection is empty: the
    file is optional. A path given explicitly must exist.
    """
    if path is None:
        if not DEFAULT_PATH.is_file():
            return Selection()
        path = DEFAULT_PATH
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PluginsConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PluginsConfigError(f"{path}: cannot be read: {exc}") from None
    try:
        parsed = parse_plugins_toml(text)
    except PluginsFileError as exc:
        raise PluginsConfigError(f"{path}: {exc}") from None

    if registry is None:
        registry = get_registry()
    choices = {}
    for kind, table in parsed.roles().items():
        try:
            component = registry.get(kind, table.name)
        except UnknownComponentError as exc:
            valid = ", ".join(repr(n) for n in exc.known) or "none are installed"
            raise PluginsConfigError(
                f"{path}: {kind}.name: unknown {kind} {table.name!r}; valid names: {valid}"
            ) from None
        try:
            settings = validate_component_settings(component, kind, table.name, table.settings)
        except ValidationError as exc:
            detail = describe_validation_error(exc, prefix=kind)
            raise PluginsConfigError(f"{path}: {detail}{_accepted(component)}") from None
        except (UserError, PluginError) as exc:
            raise PluginsConfigError(f"{path}: [{kind}] {str(exc).splitlines()[0]}") from None
        choices[kind] = Choice(table.name, component, settings)
    return Selection(choices, path)


def validate_component_settings(component: Any, kind: str, name: str, settings: Any) -> BaseModel:
    """``component.validate_settings(settings)``, the call the plugin guard leaves open so that a
    `ValidationError` (or `UserError`) about the user's settings reaches the user as it is; any other
    exception is the plugin's bug and becomes a one-line `PluginError` naming the plugin and its
    distribution, not a traceback."""
    try:
        return component.validate_settings(settings)
    except (ValidationError, UserError, PluginError):
        raise
    except Exception as exc:
        owner = object.__getattribute__(component, "_owner") if type(component) is Guarded else name
        raise PluginError(f"{describe_plugin(owner)} failed in {kind} {name!r}.validate_settings(): "
                          f"{type(exc).__name__}: {exc}") from exc


def _accepted(component: Any) -> str:
    """What settings a component takes, to append to an error about them."""
    fields = list(getattr(component, "Settings", BaseModel).model_fields)
    return f"; accepted settings: {', '.join(fields)}" if fields else "; this component takes no settings"


def apply_rope_scaling(config, selection: Selection | None) -> bool:
    """Give ``config`` (an `ArborConfig`) the RoPE parameters ``[rope_scaling]`` of ``selection`` makes.

    The chosen component's ``apply(rope_parameters, settings)`` returns the new
    parameters, checked as a user's own would be. They are written into the
    config, so a saved model carries them and loads with the same RoPE anywhere.
    Returns whether anything was applied.
    """
    scaling = selection.component("rope_scaling") if selection is not None else None
    if scaling is None:
        return False
    before = dict(config.rope_parameters)
    changed = scaling.apply(dict(before), selection.settings("rope_scaling"))
    try:
        config.rope_parameters = dict(changed)
        config.standardize_rope_params()
        config._check_rope()
    except Exception as exc:
        config.rope_parameters = before
        raise PluginError(f"rope_scaling {selection.name('rope_scaling')!r} returned invalid RoPE parameters "
                          f"{changed!r}: {exc}") from exc
    return True
