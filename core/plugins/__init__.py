"""The plugin manager: finds plugins through entry points and builds the registry.

Every plugin, built-in or third-party, is a module named by an entry point in
the ``arbor`` group. Built-ins are the entry points of the ``arbor-lm``
distribution itself; they load through the same path as anyone else's plugin,
which is what keeps that path honest.

A third-party plugin that is broken must not take arbor down with it: an import
error, a hook with a typo in its name, or an ``arbor_register`` that raises
gives one :class:`ArborPluginWarning` naming the distribution and the error,
and the plugin is skipped. ``ARBOR_STRICT_PLUGINS=1`` (or ``strict=True``)
turns that into :class:`PluginLoadError`, for CI. Two plugins claiming one
component name is never forgiven: :class:`ComponentConflictError` always.

Environment variables:

``ARBOR_LOAD_PLUGINS``
    unset: load every installed plugin; empty: built-ins only; a
    comma-separated list: built-ins plus the plugins named (by distribution or
    entry-point name).
``ARBOR_STRICT_PLUGINS``
    ``1``/``true``/``yes``: a plugin that fails to load is an error.

The loader, the registry, hook calls and the guard around every call into a
plugin stay in one module because they share its per-process state: the
plugin manager and the record of each loaded plugin, which every error
message reads to name the plugin at fault. `arbor.plugins.selection` reads
``plugins.toml``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy
from pydantic import ValidationError

import arbor_plugins
from arbor_plugins import ComponentConflictError, Registry, hookspecs

__all__ = [
    "BUILTIN_DISTRIBUTION",
    "ArborPluginWarning",
    "Guarded",
    "PluginError",
    "PluginLoadError",
    "call_hook",
    "component_state",
    "get_plugin_manager",
    "get_registry",
    "has_hook_impls",
    "hook_implementers",
    "load_component_state",
    "plugin_infos",
    "reset_plugins",
    "unwrap",
]

#: The distribution whose entry points count as built-in plugins.
BUILTIN_DISTRIBUTION = "arbor-lm"
ENTRY_POINT_GROUP = arbor_plugins.PROJECT_NAME
LOAD_ENV = "ARBOR_LOAD_PLUGINS"
STRICT_ENV = "ARBOR_STRICT_PLUGINS"


class ArborPluginWarning(UserWarning):
    """A plugin could not be loaded and was skipped."""


class PluginLoadError(RuntimeError):
    """A plugin could not be loaded and strict mode is on."""


@dataclass
class _Plugin:
    """What arbor remembers about one entry point it tried to load."""

    distribution: str
    version: str
    entry_point: str
    module: str  # the module the entry point names, e.g. "arbor.model.attention"
    builtin: bool
    label: str  # how conflicts and listings name it: "dist" or "dist (entry point)"
    error: str | None = None
    obj: Any = field(default=None, repr=False)

    @property
    def pm_name(self) -> str:
        return f"{self.distribution}:{self.entry_point}"


@dataclass
class _State:
    pm: pluggy.PluginManager
    plugins: list[_Plugin]  # every entry point tried, loaded or failed
    registry: Registry | None = None


_state: _State | None = None
# Guards the one-time build so two threads importing a model at once cannot load twice.
_lock = threading.RLock()


def _canonical(name: str) -> str:
    """PEP 503 normalisation, so ``Fake_Plug`` in the allow-list matches ``fake-plug``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _strict(strict: bool | None) -> bool:
    if strict is not None:
        return strict
    return os.environ.get(STRICT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _allow_list() -> set[str] | None:
    """Names ``ARBOR_LOAD_PLUGINS`` allows besides the built-ins; None means all."""
    value = os.environ.get(LOAD_ENV)
    if value is None:
        return None
    return {_canonical(n.strip()) for n in value.split(",") if n.strip()}


def _problem(message: str, strict: bool) -> None:
    """Report a plugin problem: an error in strict mode, one warning otherwise."""
    if strict:
        raise PluginLoadError(message)
    warnings.warn(message, ArborPluginWarning, stacklevel=3)


def _failure_message(plugin: _Plugin, stage: str, exc: BaseException) -> str:
    return (
        f"arbor plugin {plugin.distribution!r} (entry point {plugin.entry_point!r} = {plugin.module!r}) "
        f"failed {stage}: {type(exc).__name__}: {exc}; it was skipped "
        f"(uninstall it, or leave it out with {LOAD_ENV})"
    )


def _entry_points() -> list[tuple[importlib.metadata.EntryPoint, str, str]]:
    """(entry point, distribution name, version), built-ins first, then by name.

    Built-ins first so that a third-party plugin clashing with a built-in
    component is the one named second in the conflict error.
    """
    found = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        name = dist.name if dist is not None else "<unknown>"
        version = dist.version if dist is not None else "?"
        found.append((ep, name or "<unknown>", version or "?"))
    found.sort(key=lambda t: (_canonical(t[1]) != BUILTIN_DISTRIBUTION, _canonical(t[1]), t[0].name))
    return found


def _load(strict: bool) -> _State:
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    allow = _allow_list()
    found = _entry_points()
    per_dist: dict[str, int] = {}
    for _, dist, _ in found:
        per_dist[dist] = per_dist.get(dist, 0) + 1

    plugins: list[_Plugin] = []
    matched: set[str] = set()
    for ep, dist, version in found:
        builtin = _canonical(dist) == BUILTIN_DISTRIBUTION
        if not builtin and allow is not None:
            names = {_canonical(dist), _canonical(ep.name)} & allow
            if not names:
                continue
            matched |= names
        label = dist if per_dist[dist] == 1 else f"{dist} ({ep.name})"
        plugin = _Plugin(dist, version, ep.name, ep.module, builtin, label)
        plugins.append(plugin)
        try:
            plugin.obj = ep.load()
        except Exception as exc:  # any failure inside someone else's import
            plugin.error = _failure_message(plugin, "to import", exc)
            _problem(plugin.error, strict)
            continue
        try:
            pm.register(plugin.obj, name=plugin.pm_name)
            unknown = sorted(hc.name for hc in pm.get_hookcallers(plugin.obj) or [] if not hc.has_spec())
            if unknown:
                valid = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("arbor_")))
                raise pluggy.PluginValidationError(
                    plugin.obj, f"implements unknown hook(s) {', '.join(unknown)}; valid hooks: {valid}"
                )
        except Exception as exc:  # a bad hook signature, a hook with a typo
            if pm.is_registered(plugin.obj):
                pm.unregister(plugin.obj)
            plugin.error = _failure_message(plugin, "to register", exc)
            _problem(plugin.error, strict)

    if allow:
        installed = sorted({d for _, d, _ in found if _canonical(d) != BUILTIN_DISTRIBUTION})
        for name in sorted(allow - matched):
            _problem(
                f"{LOAD_ENV} names plugin {name!r}, which is not installed; "
                f"installed plugins: {', '.join(installed) or 'none besides the built-ins'}",
                strict,
            )
    return _State(pm, plugins)


def get_plugin_manager(*, strict: bool | None = None) -> pluggy.PluginManager:
    """The process-wide plugin manager, loading every allowed plugin on first use.

    With ``strict`` (default: ``ARBOR_STRICT_PLUGINS``), a plugin that failed to
    load raises :class:`PluginLoadError`, also when the manager was built
    earlier in non-strict mode.
    """
    global _state
    strict = _strict(strict)
    with _lock:
        if _state is None:
            _state = _load(strict)  # raises before caching when strict and broken
        failed = [p for p in _state.plugins if p.error]
        if strict and failed:
            raise PluginLoadError(failed[0].error)
        return _state.pm


def get_registry(*, strict: bool | None = None) -> Registry:
    """The registry of every component the loaded plugins offer, built once.

    Each plugin's ``arbor_register`` runs on its own, into a staging registry,
    with ``current_plugin`` naming that plugin; its components join the shared
    registry only if it succeeded, so a third-party plugin that raises halfway
    leaves nothing behind. A built-in that raises is a bug in arbor and
    propagates.
    """
    with _lock:
        pm = get_plugin_manager(strict=strict)
        strict = _strict(strict)
        assert _state is not None
        if _state.registry is not None:
            return _state.registry
        by_name = {p.pm_name: p for p in _state.plugins}
        registry = Registry()
        for impl in pm.hook.arbor_register.get_hookimpls():
            plugin = by_name.get(impl.plugin_name)
            label = plugin.label if plugin else impl.plugin_name
            staging = Registry()
            staging.current_plugin = label
            try:
                impl.function(**({"registry": staging} if "registry" in impl.argnames else {}))
            except ComponentConflictError:
                raise
            except Exception as exc:
                if plugin is None or plugin.builtin:
                    raise
                plugin.error = _failure_message(plugin, "in arbor_register", exc)
                if strict:  # start clean next time rather than keep a half-built state
                    reset_plugins()
                    raise PluginLoadError(plugin.error) from exc
                pm.unregister(plugin.obj)
                _problem(plugin.error, strict)
                continue
            registry.current_plugin = label
            for entry in staging.entries():
                # Everything arbor later calls on a component goes through the guard.
                guarded = Guarded(entry.component, label, entry.kind, f"{entry.kind} {entry.name!r}")
                registry.register(entry.kind, entry.name, guarded)
        registry.current_plugin = "<unknown>"
        _state.registry = registry
        return registry


def reset_plugins() -> None:
    """Forget the loaded plugins and the registry; the next use loads afresh.

    For tests that change ``ARBOR_LOAD_PLUGINS`` or ``sys.path`` between loads.
    """
    global _state
    with _lock:
        _state = None


def plugin_infos() -> list[dict[str, Any]]:
    """One dict per plugin, as ``arbor plugins --json`` prints them.

    Keys: ``distribution``, ``version``, ``entry_point``, ``module``,
    ``hooks`` (sorted names of hooks it implements), ``components``
    (``{"kind", "name"}`` dicts), ``builtin``; failed plugins also have
    ``error``. Loaded plugins come first, then failed ones.
    """
    registry = get_registry()
    assert _state is not None
    pm = _state.pm
    infos, failed = [], []
    known = {p.pm_name for p in _state.plugins}
    for p in _state.plugins:
        info = {
            "distribution": p.distribution,
            "version": p.version,
            "entry_point": p.entry_point,
            "module": p.module,
            "hooks": [],
            "components": [],
            "builtin": p.builtin,
        }
        if p.error:
            failed.append({**info, "error": p.error})
            continue
        info["hooks"] = sorted(hc.name for hc in pm.get_hookcallers(p.obj) or [])
        info["components"] = [{"kind": e.kind, "name": e.name} for e in registry.by_plugin(p.label)]
        infos.append(info)
    # Plugins registered by hand (pm.register) rather than through an entry point.
    for name, obj in pm.list_name_plugin():
        if name not in known and obj is not None:
            infos.append({
                "distribution": None,
                "version": None,
                "entry_point": None,
                "module": getattr(obj, "__name__", type(obj).__name__),
                "hooks": sorted(hc.name for hc in pm.get_hookcallers(obj) or []),
                "components": [{"kind": e.kind, "name": e.name} for e in registry.by_plugin(name)],
                "builtin": False,
            })
    return infos + failed


def _hook_caller(name: str) -> pluggy.HookCaller:
    caller = getattr(get_plugin_manager().hook, name, None)
    if caller is None or not caller.has_spec():
        valid = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("arbor_")))
        raise ValueError(f"unknown hook {name!r}; valid hooks: {valid}")
    return caller


def call_hook(name: str, **kwargs: Any) -> Any:
    """Call hook ``name`` on every plugin; a list of results (one value for firstresult hooks).

    A hook implementation that raises becomes a `PluginError` naming its plugin and the hook.
    """
    caller = _hook_caller(name)
    try:
        return caller(**kwargs)
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"{describe_plugin(_failing_plugin(caller, exc))} failed in hook {name}: "
                          f"{type(exc).__name__}: {exc}") from exc


def _failing_plugin(caller: pluggy.HookCaller, exc: BaseException) -> str:
    """The plugin whose implementation of ``caller`` raised ``exc``: found by the code objects
    on the traceback, since pluggy re-raises the implementation's own exception."""
    codes = {impl.function.__code__: impl.plugin_name for impl in caller.get_hookimpls()
             if hasattr(impl.function, "__code__")}
    tb, found = exc.__traceback__, "<unknown>"
    while tb is not None:
        found = codes.get(tb.tb_frame.f_code, found)
        if tb.tb_frame.f_code in codes:
            break
        tb = tb.tb_next
    return found


def hook_implementers(name: str) -> list[str]:
    """How the plugins implementing hook ``name`` are named to users (see `describe_plugin`)."""
    return [describe_plugin(impl.plugin_name) for impl in _hook_caller(name).get_hookimpls()]


def component_state(model) -> dict[str, Any]:
    """The training state every plugin keeps for ``model`` (``arbor_state_dict``), merged by key.

    Each implementation is called on its own, so a wrong result is named by its plugin's distribution.
    """
    merged: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for impl in reversed(_hook_caller("arbor_state_dict").get_hookimpls()):  # pluggy's order: last first
        plugin = describe_plugin(impl.plugin_name)
        try:
            part = impl.function(**({"model": model} if "model" in impl.argnames else {}))
        except Exception as exc:
            raise PluginError(f"{plugin} failed in hook arbor_state_dict: {type(exc).__name__}: {exc}") from exc
        if part is not None and not isinstance(part, dict):
            raise PluginError(f"{plugin} returned a {type(part).__name__} from hook arbor_state_dict; "
                              "expected a dict or None")
        for key in part or {}:
            if key in owners:
                raise PluginError(f"hook arbor_state_dict: {owners[key]} and {plugin} both returned the key "
                                  f"{key!r}; each plugin keeps its state under a key of its own")
            owners[key] = plugin
        merged.update(part or {})
    return merged


def load_component_state(model, state: dict[str, Any] | None) -> None:
    """Give every plugin its saved training state back (``arbor_load_state``)."""
    call_hook("arbor_load_state", model=model, state=dict(state or {}))


def has_hook_impls(name: str) -> bool:
    """Whether any loaded plugin implements hook ``name``.

    Lets the model skip the work of preparing hook arguments (detaching
    activations every layer) when nobody listens.
    """
    return bool(_hook_caller(name).get_hookimpls())


# ------------------------------------------------------------------ the guard
class PluginError(RuntimeError):
    """Plugin code failed, or returned something of the wrong kind; the message names the
    plugin, its distribution and version, and the call (the original error is chained)."""


def describe_plugin(label: str) -> str:
    """``'arbor-strategy-x 0.2 (entry point x)'`` for a registry label, as users see it named."""
    if _state is not None:
        for plugin in _state.plugins:
            if label in (plugin.label, plugin.pm_name):
                builtin = ", built into arbor" if plugin.builtin else ""
                return (f"plugin {plugin.distribution!r} {plugin.version} "
                        f"(entry point {plugin.entry_point!r}{builtin})")
    return f"plugin {label!r}"


def _json_table(value: Any) -> str | None:
    if not isinstance(value, dict):
        return f"a {type(value).__name__}, not a dict"
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        return f"a dict that is not JSON ({exc}); trigger state must be plain numbers, strings, lists and dicts"
    return None


def _is(kind: type, what: str):
    return lambda value: None if isinstance(value, kind) else f"a {type(value).__name__}, not {what}"


def _int_list(value: Any) -> str | None:
    ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return None if ok else f"{value!r}, not a list of layer indices"


def _str_list(value: Any) -> str | None:
    ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return None if ok else f"{value!r}, not a list of parameter names"


@functools.cache
def _result_checks() -> dict[str, Callable[[Any], str | None]]:
    """What each call must return, by ``kind.method``."""
    from torch import nn

    return {
        "trigger.start": _is(arbor_plugins.TriggerState, "a TriggerState"),
        "trigger_state.decide": _is(arbor_plugins.Decision, "a Decision"),
        "trigger_state.state_dict": _json_table,
        "insertion_policy.positions": _int_list,
        "init_scheme.default_positions": lambda value: None if value is None else _int_list(value),
        "freeze_policy.apply": lambda value: None if value is None else _str_list(value),
        "substrate.build": _is(nn.Module, "a torch.nn.Module"),
        "attention_backend.is_available": lambda value: None if isinstance(value, tuple) and len(value) == 2
        else f"{value!r}, not an (available, reason) pair",
    }


#: Errors a component raises about the user's settings (a config field, a growth request): they pass
#: through the guard unchanged, since they name what the user must fix.
_USER_ERRORS: tuple[type[BaseException], ...] = (arbor_plugins.UserError, ValidationError)


# Calls whose errors are the user's (bad settings), not the plugin's: they pass through unwrapped.
_UNGUARDED = {"validate_settings"}


class Guarded:
    """A plugin's component (or the state object one returned) whose every method call runs
    under the guard: an exception becomes a `PluginError` naming the plugin and the call, and
    a result of the wrong type is an error too. Attributes read through unchanged."""

    __slots__ = ("_target", "_owner", "_kind", "_what")

    def __init__(self, target: Any, owner: str, kind: str, what: str):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_what", what)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name.startswith("_") or name in _UNGUARDED or not callable(value) or isinstance(value, type):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            where = f"{self._what}.{name}()"
            try:
                result = value(*args, **kwargs)
            except (PluginError, *_USER_ERRORS):
                raise
            except Exception as exc:
                raise PluginError(f"{describe_plugin(self._owner)} failed in {where}: "
                                  f"{type(exc).__name__}: {exc}") from exc
            check = _result_checks().get(f"{self._kind}.{name}")
            problem = check(result) if check is not None else None
            if problem is not None:
                raise PluginError(f"{describe_plugin(self._owner)}: {where} returned {problem}")
            if isinstance(result, arbor_plugins.TriggerState):
                return Guarded(result, self._owner, "trigger_state", f"{self._what} state")
            return result

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target, name, value)

    @property  # type: ignore[misc]
    def __class__(self):  # isinstance(guarded, InitScheme) holds as for the component itself
        return type(self._target)

    def __repr__(self) -> str:
        return f"Guarded({self._target!r})"


def unwrap(component: Any) -> Any:
    """The component behind a `Guarded` proxy (itself when it is not one)."""
    return object.__getattribute__(component, "_target") if type(component) is Guarded else component
